"""Which pair serves a request: the pairs the router knows of, their health, and the choice.

A pair is the prefill and the decode replica on one node (`serve_app/pairs.py`); the router
learns them from its own handles' request routers (`refresh`), probes each pair's engines, and
picks one pair per request (`choose`): the less loaded of two random whole pairs (both engines
up, decode's KV cache not full), where load is the requests this router has in flight there plus
the engines' own queues, and a nearly full KV cache weighs as much as `KV_FULL_WEIGHT` requests.
With no whole pair left, a pair with one engine up serves whole requests on it (the route policy
sees which); with none, the router answers 503.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.policy.health import LoopStalls, PhaseHealth

KV_FULL_WEIGHT = 32.0
"""The load of a full KV cache, in requests: a pair whose decode cache fills gets fewer."""


@dataclass
class Pair:
    """One pair as a router sees it. `servers`: phase -> handle routed to this pair's node."""

    node_id: str
    servers: dict[str, Any]
    stalls: LoopStalls
    health: dict[str, PhaseHealth] = field(init=False)
    num_queued: dict[str, int] = field(init=False)
    """Calls of this router waiting on each engine (prefill calls, first stream items)."""
    queued_tokens: dict[str, int] = field(init=False)
    """The prompt tokens of those calls: the work waiting on each engine."""
    num_in_flight: int = 0
    """Requests of this router on this pair, from the choice to the stream's end."""
    present: set[str] = field(default_factory=set)
    """The phases with a replica on this node now (the others are down here)."""

    def __post_init__(self) -> None:
        self.health = {phase: PhaseHealth(phase, self.stalls) for phase in self.servers}
        self.num_queued = dict.fromkeys(self.servers, 0)
        self.queued_tokens = dict.fromkeys(self.servers, 0)

    @property
    def name(self) -> str:
        return self.node_id[:12]

    def server(self, phase: str) -> Any:
        """This pair's handle of `phase`; None where the app has no such phase (unified)."""
        return self.servers.get(phase)

    def is_up(self, phase: str) -> bool:
        return phase in self.health and self.health[phase].is_up

    @property
    def is_whole(self) -> bool:
        return all(h.is_up for h in self.health.values())

    @property
    def is_serving(self) -> bool:
        return any(h.is_up for h in self.health.values())

    def load(self) -> float:
        engines = sum(h.num_waiting_reqs + h.num_running_reqs for h in self.health.values())
        kv_usage = max((h.kv_cache_usage for h in self.health.values()), default=0.0)
        return self.num_in_flight + engines + KV_FULL_WEIGHT * kv_usage


class PairSet:
    """The pairs of one app, by node: made as the phases' replicas appear, dropped when a node
    has none left. `phases`: phase -> the deployment handle (its calls unrouted)."""

    def __init__(self, phases: dict[str, Any], stalls: LoopStalls) -> None:
        self.phases = phases
        self.stalls = stalls
        self.pairs: dict[str, Pair] = {}

    def __iter__(self):
        return iter(list(self.pairs.values()))

    def refresh(self, nodes_of: Callable[[Any], set[str]], bind: Callable[[Any, str], Any]) -> None:
        """Meet the pairs of nodes that gained a replica, forget nodes with none; a phase whose
        replica left a node is down there (`nodes_of(handle)`: the nodes of its replicas;
        `bind(handle, node)`: the handle routed to that node). A forgotten pair (scaled away
        whole) gets no new requests; those still on it keep its last health, so they wait for
        their calls, which Serve's request router sends to other pairs (`pairs.py`), instead
        of failing over inside a pair that is gone."""
        nodes = {phase: nodes_of(handle) for phase, handle in self.phases.items()}
        present = set().union(*nodes.values()) if nodes else set()
        for node_id in present - set(self.pairs):
            servers = {phase: bind(handle, node_id) for phase, handle in self.phases.items()}
            self.pairs[node_id] = Pair(node_id, servers, self.stalls)
        for node_id in set(self.pairs) - present:
            del self.pairs[node_id]
        for pair in self.pairs.values():
            pair.present = {phase for phase in self.phases if pair.node_id in nodes[phase]}
            for phase, health in pair.health.items():
                if phase not in pair.present and health.is_up:
                    health.failed(f"no {phase} replica on node {pair.name}")

    def choose(self, is_full: Callable[[Pair], bool] = lambda pair: False) -> Pair | None:
        """Power of two choices among whole, not full pairs; else among pairs with an engine
        up (the route policy then runs the request on that engine)."""
        pairs = list(self.pairs.values())
        candidates = [p for p in pairs if p.is_whole and not is_full(p)]
        candidates = candidates or [p for p in pairs if p.is_serving]
        if not candidates:
            return None
        return min(random.sample(candidates, min(2, len(candidates))), key=Pair.load)

    def is_serving(self) -> bool:
        return any(pair.is_serving for pair in self.pairs.values())

    def reasons(self) -> str:
        """Why no engine can serve, pair by pair."""
        if not self.pairs:
            return "no engine replica is running"
        return "; ".join(
            f"{phase} on {pair.name}: {health.reason or 'up'}"
            for pair in self.pairs.values()
            for phase, health in pair.health.items()
        )
