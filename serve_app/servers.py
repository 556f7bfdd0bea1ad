"""The two engine deployments: `PrefillServer` and `DecodeServer`.

Each replica owns one vLLM engine (`engine.Engine`) on its share of the GPU; its NIXL port is the
first of its phase's pair ports free on its host (`kv_transfer.claim_side_channel`), and the pair
it serves is the one on its node (`pairs.py`). Start order: the decode replica starts its engine
only after the prefill replica of its node has started its own, so the two never profile GPU
memory at the same time (vllm issue 55827); Serve restarts keep that order because the wait is in the decode
constructor. That wait also checks that both are on one GPU (`pairs.check_same_gpu`).

A deployment's `user_config` (`EngineUpdate`) changes a phase's engine in place: the replica stops
taking calls (its probe fails, so the router routes around it), lets running requests finish,
stops the engine and starts one with the new arguments; the Router and the other phase keep
serving. Restarts on one node take turns (a file lock): two phases changed in one `serve
deploy` never leave the pair without an engine, and never profile GPU memory at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from ray import serve

from serve_app.config import AppConfig, EngineUpdate
from serve_app.ops.telemetry import ServerTelemetry
from serve_app.ops.tracing import end as end_span
from serve_app.pairs import (
    PairSplit,
    Placement,
    check_same_gpu,
    current_placement,
    on_pair,
    replica_nodes,
)
from serve_app.protocol import Endpoint, KVTransferParams, PrefillResult
from serve_app.streams import coalesce_ready

logger = logging.getLogger("ray.serve")
START_WAIT_S = 1800.0
SETTLE_S = 5.0
"""After taking the restart turn: time for the router to see the phase that restarted before
this one goes down."""
PORT_FREE_WAIT_S = 60.0


class EngineRestarting(RuntimeError):
    """A call reached a replica whose engine is restarting for a new configuration."""


def _user_config() -> Any:
    """This replica's `user_config`: Serve passes it to `reconfigure` only after `__init__`,
    so the first engine starts with it from here instead of starting twice."""
    try:
        return serve.get_replica_context()._deployment_config.user_config
    except Exception:  # noqa: BLE001 - not in a replica (tests), or Serve's internals moved
        return None


@contextlib.asynccontextmanager
async def restart_turn(app_name: str) -> AsyncIterator[None]:
    """One engine restart at a time on this node for `app_name` (an flock), then `SETTLE_S`
    for the router to see the engine that restarted before this one goes down."""
    import fcntl
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"pd-serve-restart-{app_name}.lock")
    with open(path, "a") as lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        try:
            await asyncio.sleep(SETTLE_S)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


async def _wait_port_free(cfg: AppConfig, role: str) -> None:
    """The old engine's processes let go of the NIXL side-channel port as they exit."""
    from serve_app.kv_transfer import check_side_channel_free

    if cfg.is_unified:
        return
    deadline = time.monotonic() + PORT_FREE_WAIT_S
    while True:
        try:
            return check_side_channel_free(cfg, role)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


class _EngineServer:
    role = ""

    async def _start_engine(self, cfg: AppConfig) -> None:
        from serve_app.kv_transfer import claim_side_channel

        if cfg.is_unified:
            return await self._start_on_port(cfg)
        # The first pair port free on this host, held until this replica ends or fails to start.
        cfg, self.port_claim = claim_side_channel(cfg, self.role)
        try:
            await self._start_on_port(cfg)
        except BaseException:
            self.port_claim.close()
            raise

    async def _start_on_port(self, cfg: AppConfig) -> None:
        from serve_app.engine import Engine
        from serve_app.gpu_gate import gate_replica
        from serve_app.kv_transfer import kv_transfer_env
        from serve_app.model_source import with_local_model
        from serve_app.mps import preflight

        if not cfg.is_unified:
            os.environ.update(kv_transfer_env(cfg, self.role))  # inherited by EngineCore
        self.cfg = cfg
        self.engine_start_began = time.time()
        self.telemetry = ServerTelemetry(cfg, self.role)
        if cfg.device == "cuda":
            phase = cfg.phase(self.role)
            preflight(phase.sm_percentage, cfg.mps.pipe_dir, cfg.mps.allow_unpartitioned)
            # Under an SM cap cuBLAS has returned wrong numbers: check before loading anything.
            await gate_replica(cfg, self.role)
        # An s3:// model is copied to this node's disk once (a file lock), then loaded from it.
        self.local_cfg = await asyncio.to_thread(with_local_model, cfg)
        self.update = EngineUpdate.model_validate(_user_config() or {})
        self.restarting: str | None = None
        self.cfg = self.update.apply(self.local_cfg, self.role)
        self.engine = Engine(self.cfg, self.role)
        await self.engine.start()
        self.engine_ready_at = time.time()

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve's hook for a new `user_config`: restart the engine in place with it."""
        update = EngineUpdate.model_validate(user_config or {})
        if update == self.update:
            return  # the first call, right after __init__ started the engine with it
        from serve_app.engine import Engine

        async with restart_turn(serve.get_replica_context().app_name):
            self.restarting = f"{self.role} engine is restarting for a new configuration"
            try:
                await self._drain(update.drain_timeout_s)
                logger.warning("%s engine restarts with %s", self.role, update.engine_kwargs)
                self.engine.shutdown()
                await _wait_port_free(self.local_cfg, self.role)
                # An engine that fails to start with the new arguments fails `reconfigure`:
                # Serve then replaces the replica, whose start fails the same way, naming the
                # cause in `serve status`; the other phase serves meanwhile.
                cfg = update.apply(self.local_cfg, self.role)
                self.engine = Engine(cfg, self.role)
                await self.engine.start()
                self.cfg, self.update = cfg, update
                self.engine_ready_at = time.time()
            finally:
                self.restarting = None

    async def _drain(self, timeout_s: float) -> None:
        """Wait (up to `timeout_s`) until the engine has no request left: new calls are refused
        from now on, and the router stops sending them once its probe fails."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and await self.engine.num_unfinished_requests():
            await asyncio.sleep(0.2)

    def _refuse_while_restarting(self) -> None:
        if self.restarting:
            raise EngineRestarting(self.restarting)

    async def check_health(self) -> None:
        """Called by Serve every `health_check_period_s`; an engine error restarts the replica.
        A restart in place is not an error (the router routes around it)."""
        if not self.restarting:
            await self.engine.check_health()

    async def placement(self) -> Placement:
        """Where this replica runs (node, GPU). Answers once the engine is up: Serve routes
        no call to a replica before its constructor returns."""
        return current_placement()

    async def list_models(self) -> dict[str, Any]:
        return await self.engine.list_models()

    async def probe(self) -> dict[str, Any]:
        """The router's health probe: the engine is alive, and how loaded it is."""
        self._refuse_while_restarting()
        await self.engine.check_health()
        stats = self.engine.stats
        return {
            "kv_cache_usage": stats.kv_cache_usage,
            "num_waiting_reqs": stats.num_waiting_reqs,
            "num_running_reqs": stats.num_running_reqs,
            "kv_signature": self.engine.kv_signature,
        }

    async def generate(
        self,
        endpoint: Endpoint,
        request: Any,
        kv_signature: str | None = None,
        trace: dict[str, str] | None = None,
    ) -> AsyncIterator[Any]:
        """`_generate` in the `decode` span (a child of the Router's, named by `trace`), with
        a `kv_handoff` child until the first item when the request reads prefill's blocks."""
        from serve_app.engine import final_usage, request_context

        self._refuse_while_restarting()
        decode = self.telemetry.start_decode(trace, request, self.engine.kv_bytes_per_block)
        context = request_context(decode.engine_headers)
        items = self._generate(endpoint, request, kv_signature, context)
        try:
            async for item in items:
                decode.item(item)
                yield item
        except BaseException as exc:
            decode.failed(exc)
            raise
        finally:
            await items.aclose()
            decode.end(final_usage(context))

    async def _generate(
        self, endpoint: Endpoint, request: Any, kv_signature: str | None, context: Any
    ) -> AsyncIterator[Any]:
        """Stream one request: SSE text (one or more events per item), or one response /
        `ErrorResponse` object. Either engine can run a whole request (no `kv_transfer_params`);
        decode also continues a handed-off one.

        `kv_signature` is the prefill engine's (`Engine.kv_signature`): a handoff between
        engines whose KV layouts differ (a rollout in progress) must not read the blocks, so
        the request is run whole here and prefill's blocks are released.

        Closing this generator (client gone, router cancelled) closes vLLM's, which aborts the
        request in the engine and frees its blocks.
        """
        params = getattr(request, "kv_transfer_params", None)
        if params and kv_signature is not None and kv_signature != self.engine.kv_signature:
            logger.warning("KV layouts differ (%s vs %s): running %s whole", kv_signature,
                           self.engine.kv_signature, request.request_id)
            with contextlib.suppress(Exception):  # best effort: the lease frees them too
                await self.engine.release_remote_kv(f"release-{request.request_id}", params)
            request = request.model_copy(update={"kv_transfer_params": None})
        result = await self.engine.create(endpoint, request, context)
        if not hasattr(result, "__aiter__"):
            yield result
            return
        # Events that pile up while the hops to the client are busy travel as one item.
        events = coalesce_ready(result)
        try:
            async for text in events:
                yield text
        finally:
            await events.aclose()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics of this replica, pushed to the controller where
        `pairs` autoscales (`policy/autoscale.py`); Serve never calls it otherwise."""
        from serve_app.policy.autoscale import KV_USAGE_METRIC

        engine = getattr(self, "engine", None)
        return {KV_USAGE_METRIC: engine.stats.kv_cache_usage if engine is not None else 0.0}

    async def stats(self) -> dict[str, Any]:
        return {
            **asdict(self.engine.stats),
            "engine_start_began": self.engine_start_began,
            "engine_ready_at": self.engine_ready_at,
            "pid": os.getpid(),
        }

    async def metrics(self) -> list[Any]:
        """This replica's Prometheus families (vLLM's `vllm:*` and its own), for the Router's
        `GET /metrics`, which adds the phase label."""
        return self.telemetry.families()

    async def leak_report(self) -> dict[str, Any]:
        """What the engine still holds: unfinished requests and whether every KV block is free."""
        return {
            "num_unfinished_requests": await self.engine.num_unfinished_requests(),
            "all_blocks_free": await self.engine.all_blocks_free(),
        }

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        telemetry = getattr(self, "telemetry", None)
        if telemetry is not None:
            telemetry.shutdown()  # exports the spans still waiting


async def _prefill_of_node(prefill: Any, here: Placement, num_pairs: int) -> Placement:
    """The placement of the prefill replica on this node, once its engine is up. Raises
    `PairSplit` as soon as `num_pairs` prefill replicas (the most there can be) run and none on
    this node."""
    call = asyncio.ensure_future(on_pair(prefill, here.node_id).placement.remote())
    deadline = time.monotonic() + START_WAIT_S
    try:
        while time.monotonic() < deadline:
            done, _ = await asyncio.wait({call}, timeout=1.0)
            if done:
                return call.result()
            nodes = set(replica_nodes(prefill.app_name, prefill.deployment_name).values())
            if len(nodes) >= num_pairs and here.node_id not in nodes:
                raise PairSplit(
                    f"pair split: decode on {here.describe()} has no prefill replica on its "
                    f"node (prefill runs on nodes {', '.join(n[:12] for n in sorted(nodes))}); "
                    "give the app as many one-GPU Ray nodes as pairs, or set "
                    "RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1 (README, \"Pairs\")"
                )
        raise TimeoutError(f"no prefill replica started on this node in {START_WAIT_S:g} s")
    finally:
        call.cancel()


@serve.deployment(name="PrefillServer", health_check_period_s=10, health_check_timeout_s=60)
class PrefillServer(_EngineServer):
    role = "prefill"

    async def __init__(self, cfg: dict[str, Any]) -> None:
        await self._start_engine(AppConfig.model_validate(cfg))

    async def prefill(
        self, endpoint: Endpoint, request: Any, trace: dict[str, str] | None = None
    ) -> PrefillResult | Any:
        """Run the prompt (`max_tokens=1`) and keep its blocks for decode.

        Returns a `PrefillResult`, or vLLM's `ErrorResponse` when the request is invalid here
        (prompt too long, bad sampling parameters): then no block was kept. `trace`: the
        Router's trace context (W3C headers); the `prefill` span is its child.
        """
        from serve_app.engine import request_context

        self._refuse_while_restarting()
        span = self.telemetry.span("prefill", trace, {"pd.request_id": request.request_id})
        try:
            answer = await self._prefill(
                endpoint, request, request_context(self.telemetry.engine_headers(span))
            )
        except BaseException as exc:
            end_span(span, 500, type(exc).__name__)
            raise
        self.telemetry.end_prefill(span, answer)
        return answer

    async def _prefill(self, endpoint: Endpoint, request: Any, context: Any) -> Any:
        response = await self.engine.create(endpoint, request, context)
        params = getattr(response, "kv_transfer_params", None)
        if params is None:
            return response  # ErrorResponse
        choice = response.choices[0]
        token_ids = getattr(choice, "token_ids", None) or []
        return PrefillResult(
            request_id=response.id,
            kv_transfer_params=KVTransferParams.model_validate(params),
            num_prompt_tokens=response.usage.prompt_tokens,
            first_token_id=token_ids[0] if len(token_ids) == 1 else None,
            first_text=getattr(choice, "text", None) or "",
            finish_reason=choice.finish_reason,
            prompt_token_ids=getattr(choice, "prompt_token_ids", None)
            or getattr(response, "prompt_token_ids", None),
            max_model_len=self.engine.max_model_len,
        )


@serve.deployment(name="DecodeServer", health_check_period_s=10, health_check_timeout_s=60)
class DecodeServer(_EngineServer):
    role = "decode"

    async def __init__(self, cfg: dict[str, Any], prefill: Any = None) -> None:
        app_cfg = AppConfig.model_validate(cfg)
        if prefill is None:  # unified mode: a whole engine of its own
            await self._start_engine(app_cfg)
            return
        # The pair's prefill replica is the one on this node; it answers once it is up.
        here = current_placement()
        if app_cfg.start_order == "prefill_first":
            logger.info("decode waits for the prefill engine of its node")
            check_same_gpu(await _prefill_of_node(prefill, here, app_cfg.max_pairs), here)
            await self._start_engine(app_cfg)
        else:
            await self._start_engine(app_cfg)
            check_same_gpu(await _prefill_of_node(prefill, here, app_cfg.max_pairs), here)

    async def release_remote_kv(self, request_id: str, params: KVTransferParams) -> None:
        """Free prefill's blocks for a request that will never decode (client left between)."""
        # A distinct id: the release is a pre-aborted request of its own in the engine.
        await self.engine.release_remote_kv(f"release-{request_id}", params.model_dump())
