"""Pairs: one prefill and one decode engine on one GPU, `pairs` of them across a Ray cluster.

Placement. Each phase's deployment runs `pairs` replicas, at most one per Ray node
(`max_replicas_per_node: 1`), on a cluster of one-GPU Ray nodes (a multi-GPU host runs one Ray
node per GPU, README "Pairs"). A node then holds at most one prefill and one decode engine, on its
one GPU, so no GPU ever holds two pairs' shares. Ray's fractional `num_gpus` alone guarantees
neither (two 0.2 decode replicas packed on one card leave no room for a 0.8 prefill:
`tests/cpu/test_pairs.py` shows it), and no Ray mechanism places the replicas of two deployments
together, so each decode replica checks at start that the prefill replica of its own node runs on
its own GPU (`check_same_gpu`) and refuses to start otherwise, naming both placements: a split
pair fails loudly in `serve status` instead of serving slowly. Where the cluster has as many such
nodes as pairs, every node holds one whole pair (one replica of each phase per node, as many nodes
as replicas); `RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1` makes Serve fill a node before the next.

Routing. A pair is named by its node id. Both server deployments route with `PairRequestRouter`
(Serve's custom request router): a call made through `on_pair(handle, node_id)` goes to the replica
on that node, so the Router sends a request's prefill and decode into one pair. Calls without a
pair (handle callers, the first probes) go to any replica, the lesser loaded of two. A call for a
node whose replica has left (the pair was scaled away, or the replica died) goes to any replica
too, instead of waiting for one that may never come back: a request that chose the pair just
before it left still gets answered (its blocks are read across pairs, or recomputed). A call for
a node this process has not yet seen a replica on waits for it (a decode replica waits so for its
node's prefill engine to start).

NIXL side-channel ports are claimed per host (`kv_transfer.claim_side_channel`): each engine
takes the first of its phase's `pairs` ports that no other replica on its host holds, so several
Ray nodes on one host never share one, even after Serve renumbers the replica ranks on a
scale-down. Engine ids name the host and the port, so they are unique across the cluster too
(decode keys what it learnt of a prefill engine by its id, and reads across pairs happen).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import RequestRouter

REQUEST_ROUTER = "serve_app.pairs:PairRequestRouter"

_replica_nodes: dict[tuple[str, str], dict[str, str]] = {}
"""(app, deployment) -> {replica id: node id}, as this process's request routers last saw them."""


class PairSplit(RuntimeError):
    """A decode replica found no prefill engine on its own GPU."""


def on_pair(handle: Any, node_id: str) -> Any:
    """`handle` with its calls routed to the replica on `node_id`. The node travels in Serve's
    per-call routing key (`multiplexed_model_id`): nothing here is multiplexed, the key is what
    Serve hands a custom request router."""
    return handle.options(multiplexed_model_id=node_id)


def replica_nodes(app_name: str, deployment: str) -> dict[str, str]:
    """{replica id: node id} of `deployment`'s running replicas, as seen by a request router of
    this process (empty until a handle of this process has called `deployment`)."""
    return dict(_replica_nodes.get((app_name, deployment), {}))


class PairRequestRouter(RequestRouter):
    """Routes a call made through `on_pair` to the replica on that node; waits (backing off) while
    it has none yet, so the caller's own deadline decides. Other calls, and calls for a node
    whose replica has left: the less loaded of two random replicas (Serve's own choice between
    the candidates)."""

    _gone_nodes: frozenset[str] = frozenset()
    """Nodes that had a replica of this deployment, as this router saw it, and have none now."""

    def _pair_node(self, pending: PendingRequest) -> str:
        """The node `pending` must run on; "" for any (no pair, or its node's replica left)."""
        node_id = pending.metadata.multiplexed_model_id
        return "" if node_id in self._gone_nodes else node_id

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        node_id = self._pair_node(pending_request) if pending_request else ""
        if node_id:
            chosen = [r for r in candidate_replicas if r.node_id == node_id]
        else:
            chosen = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        if pending_request is not None:
            # This is the whole choice: if the replica is busy or not there yet, Serve must
            # back off before asking again, not retry in a tight loop on the router's thread.
            pending_request.routing_context.should_backoff = True
        return [chosen] if chosen else []

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: Any = None
    ) -> None:
        """Give `replica` to the oldest waiting call that may run there (no pair, or its pair
        is the replica's node). Serve's default gives it to the call with the chooser's
        internal request id, which every call made while serving one request shares (the
        router's probes and a request's prefill and decode calls): all but one would wait."""
        for pending in self._pending_requests_to_fulfill:
            node_id = self._pair_node(pending)
            if pending.future.done() or (node_id and node_id != replica.node_id):
                continue
            self._pending_requests_to_fulfill.remove(pending)
            self._cancel_routing_task_for_pending_request(pending)
            self._record_queue_wait_time(pending)
            pending.future.set_result(replica)
            self._remove_pending_request_from_indices(pending)
            return

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        # Serve ships this class by value (cloudpickle): its own module globals are a copy, so
        # the registry is reached through the imported module.
        from serve_app import pairs

        key = (self._deployment_id.app_name, self._deployment_id.name)
        before = set(pairs._replica_nodes.get(key, {}).values())
        pairs._replica_nodes[key] = {r.replica_id.unique_id: r.node_id for r in replicas}
        now = {r.node_id for r in replicas}
        self._gone_nodes = frozenset((self._gone_nodes | before) - now)


@dataclass(frozen=True)
class Placement:
    """Where a replica runs: its Ray node, the GPU ids Ray assigned it (logical ids on a CPU
    machine whose Ray has `GPU` resources), and those GPUs' UUIDs on a real GPU."""

    node_id: str
    gpu_ids: tuple[str, ...]
    gpu_uuids: tuple[str, ...] = ()

    def describe(self) -> str:
        gpus = ",".join(self.gpu_uuids or self.gpu_ids) or "none"
        return f"node {self.node_id[:12]} GPU {gpus}"


def current_placement() -> Placement:
    import ray

    context = ray.get_runtime_context()
    gpu_ids = tuple(str(i) for i in context.get_accelerator_ids().get("GPU", []))
    return Placement(context.get_node_id(), gpu_ids, _gpu_uuids(gpu_ids))


def _gpu_uuids(gpu_ids: tuple[str, ...]) -> tuple[str, ...]:
    """The UUIDs of Ray's GPU ids (physical indices on the node), where NVML answers."""
    if not gpu_ids:
        return ()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return tuple(
                str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(int(i))))
                for i in gpu_ids
            )
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML (CPU machine): Ray's ids are all there is
        return ()


def check_same_gpu(prefill: Placement, decode: Placement) -> None:
    """Raise `PairSplit` unless both engines of a pair are on one node and one GPU."""
    if prefill.node_id != decode.node_id or prefill.gpu_ids != decode.gpu_ids:
        raise PairSplit(
            f"pair split across GPUs: prefill on {prefill.describe()}, decode on "
            f"{decode.describe()}; each pair's engines must share one GPU: run one Ray node per "
            "GPU (README, \"Pairs\")"
        )


def pair_capacity(nodes: list[dict[str, Any]], gpus_per_pair: float) -> int:
    """How many pairs a cluster can place: one per alive node with at least `gpus_per_pair` of
    GPU (`ray.nodes()` entries); a node without GPUs holds none."""
    return sum(
        1
        for node in nodes
        if node.get("Alive") and node.get("Resources", {}).get("GPU", 0.0) + 1e-9 >= gpus_per_pair
    )


PACK_SCHEDULING_ENV = "RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY"


def warn_unless_packed() -> None:
    """Autoscaled pairs run on fewer GPU nodes than the cluster has, where Serve's default
    (spread) scheduling puts a pair's two replicas on two nodes: the decode replica then waits
    for a prefill replica on its own node. Pack scheduling places them together. Warn where this
    process (the build: on the cluster under `serve run`/`serve deploy` of a config file) does
    not have it; Serve's controller reads it from the head's `ray start` environment."""
    import logging
    import os

    if os.environ.get(PACK_SCHEDULING_ENV, "0").lower() not in ("1", "true"):
        logging.getLogger("ray.serve").warning(
            "pairs: an autoscaling range needs %s=1 in the environment of `ray start` on the "
            "head, or a pair's prefill and decode replicas may land on different nodes "
            "(README, \"Pairs\")", PACK_SCHEDULING_ENV,
        )


def check_cluster_holds(num_pairs: int, gpus_per_pair: float, field: str = "pairs") -> None:
    """At build time, on the cluster the app is built on: refuse `pairs` it cannot place
    (Serve would leave the extra replicas pending with no error). `field`: the setting that
    asks for `num_pairs` (`pairs`, or an autoscaling range's `pairs.min`; its `max` may wait
    for the cluster to grow). Nothing to check where no Ray is connected (`serve build`)."""
    import ray

    if num_pairs <= 1 or not ray.is_initialized():
        return
    nodes = ray.nodes()
    capacity = pair_capacity(nodes, gpus_per_pair)
    if capacity < num_pairs:
        gpus = ", ".join(
            f"{n.get('NodeManagerAddress')}: {n.get('Resources', {}).get('GPU', 0):g} GPU"
            for n in nodes
            if n.get("Alive")
        )
        raise ValueError(
            f"{field}: {num_pairs} pairs need {num_pairs} Ray nodes with a GPU each (one pair per "
            f"node, on its GPU); this cluster can place {capacity} ({gpus}). Start one Ray node "
            f"per GPU, add nodes, or lower {field} (1.."
            f"{max(capacity, 1)})"
        )
