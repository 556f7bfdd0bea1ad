"""Autoscaled pairs leave whole on three nodes: the replicas Serve stops are on the same node.

The policy gives prefill and decode the same target in the same controller iteration
(`policy/autoscale.py`), but Serve picks which replicas to stop, for each deployment on its own.
It orders the nodes once, for every deployment alike (not the head, then the fewest replicas of
any deployment, ties in one shared order), and takes each deployment's replicas from the first
node that has one: where every node holds one whole pair, that is the same node for both. With
two nodes the head rule alone decides (`test_pairs_autoscale.py`); this shows the tie between
two equal non-head nodes resolved alike, 3 -> 2 pairs, then 2 -> 1.

The servers are stand-ins with the app's own deployment options and policy: which replicas Serve
stops depends on those and on the cluster, not on the engines, and six tiny engines do not fit
this machine's memory beside the test session.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ray import serve

from serve_app.app import _server_options
from serve_app.config import AppConfig
from serve_app.policy.autoscale import KV_USAGE_METRIC
from tests.cpu.conftest import app_args

PHASES = ("PrefillServer", "DecodeServer")
APP = "scale-down"
HOLD_S = 2.0
"""How long each stand-in call holds its replica: Serve counts the clients' calls as running."""


@serve.deployment
class PhaseStandIn:
    async def __call__(self) -> None:
        await asyncio.sleep(HOLD_S)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return {KV_USAGE_METRIC: 0.0}


@pytest.fixture(scope="module")
def three_nodes(ray_cluster: None) -> Iterator[None]:
    """The session's head and two more loopback nodes, one logical GPU each."""
    from serve_app.bench.pairs import join_loopback_node

    nodes = [join_loopback_node()[0] for _ in range(2)]
    yield
    for node in nodes:
        node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)


def stand_in_app(cfg: AppConfig) -> Any:
    """The two servers' deployments as `build_app` declares them, minus the pair router (no
    Router here: the test's handles call them) and minus the engines."""
    servers = []
    for role, name in zip(("prefill", "decode"), PHASES, strict=True):
        options = _server_options(cfg, role)
        options.pop("request_router_config")
        servers.append(PhaseStandIn.options(name=name, **options).bind())
    return Ingress.bind(*servers)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ingress:
    def __init__(self, prefill: Any, decode: Any) -> None:
        self.servers = (prefill, decode)

    async def __call__(self) -> None:
        await asyncio.gather(*(server.remote() for server in self.servers))


class Clients:
    """Threads each calling both phases (through the ingress) one call after another."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.threads: list[tuple[threading.Thread, threading.Event]] = []

    def resize(self, num: int) -> None:
        while len(self.threads) > num:
            thread, stop = self.threads.pop()
            stop.set()
            thread.join()
        while len(self.threads) < num:
            stop = threading.Event()
            thread = threading.Thread(target=self._run, args=(stop,))
            thread.start()
            self.threads.append((thread, stop))

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.handle.remote().result()


def replica_nodes() -> dict[str, dict[str, set[str]]]:
    """Each server deployment's replicas' nodes, by replica state."""
    from ray.serve.context import _get_global_client

    deployments = _get_global_client().get_serve_details()["applications"][APP]["deployments"]
    nodes: dict[str, dict[str, set[str]]] = {}
    for name in PHASES:
        by_state: dict[str, set[str]] = {}
        for replica in deployments[name]["replicas"]:
            by_state.setdefault(replica["state"], set()).add(replica.get("node_id") or "unplaced")
        nodes[name] = by_state
    return nodes


def wait_for_running(num: int, seen: list, timeout_s: float = 120.0) -> dict[str, set[str]]:
    """Poll until each phase has `num` replicas, all RUNNING; return their nodes by phase."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = replica_nodes()
        seen.append(nodes)
        if all(set(nodes[p]) == {"RUNNING"} and len(nodes[p]["RUNNING"]) == num for p in PHASES):
            return {p: nodes[p]["RUNNING"] for p in PHASES}
        if time.monotonic() > deadline:
            raise AssertionError(f"not {num} running replicas per phase: {nodes}")
        time.sleep(0.5)


def stopping_apart(seen: list) -> list:
    """Samples in which the two phases were stopping replicas on different nodes."""
    def stopping(nodes: dict, phase: str) -> set[str]:
        return nodes[phase].get("STOPPING", set())

    return [
        nodes for nodes in seen
        if stopping(nodes, PHASES[0]) and stopping(nodes, PHASES[1])
        and stopping(nodes, PHASES[0]) != stopping(nodes, PHASES[1])
    ]


def test_a_scale_down_stops_both_replicas_of_one_pair(three_nodes: None, http_port: int) -> None:
    pairs = {"min": 1, "max": 3, "target_ongoing_per_pair": 2, "upscale_delay_s": 1,
             "downscale_delay_s": 3, "look_back_period_s": 2, "drain_timeout_s": 5}
    cfg = AppConfig.model_validate(app_args(pairs=pairs))
    handle = serve.run(stand_in_app(cfg), name=APP, route_prefix=None)
    clients = Clients(handle)
    seen: list = []
    whole: Callable[[dict[str, set[str]]], bool] = lambda n: n[PHASES[0]] == n[PHASES[1]]  # noqa: E731
    try:
        clients.resize(6)  # 6 calls at each phase: 3 pairs
        three = wait_for_running(3, seen)
        assert whole(three) and len(three[PHASES[0]]) == 3, three
        clients.resize(4)  # 2 pairs: one of the two non-head nodes goes, a tie
        two = wait_for_running(2, seen)
        assert whole(two), two
        clients.resize(0)  # 1 pair
        one = wait_for_running(1, seen)
        assert whole(one), one
        assert not stopping_apart(seen)
    finally:
        clients.resize(0)
        serve.delete(APP)
