"""The only module that imports vLLM: start an engine, serve OpenAI requests on it, report on it.

Each server replica owns one `Engine`: a vLLM `AsyncLLM` plus vLLM's own OpenAI serving layer
(`init_app_state`), so chat templating, tokenization, validation, sampling defaults, streaming and
usage accounting are vLLM's, exactly as in `vllm serve`, with `kv_transfer_params` passed through.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from argparse import Namespace
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import AppConfig
from serve_app.kv_transfer import check_side_channel_free, kv_transfer_config
from serve_app.ops.tracing import engine_tracing_kwargs
from serve_app.partition import phase_memory_kwargs
from serve_app.vllm_plugin import OWNER_PID_ENV

logger = logging.getLogger(__name__)


def engine_argv(cfg: AppConfig, role: str) -> list[str]:
    """vLLM command-line arguments of the `role` engine (parsed by vLLM's own parser)."""
    model = cfg.model
    kwargs: dict[str, Any] = {
        "model": model.source,
        "served_model_name": model.name,
        "dtype": model.dtype,
        "kv_transfer_config": None if cfg.is_unified else kv_transfer_config(cfg, role),
        # Prefix caching on decode would make a cached prompt skip the NIXL read; the handoff
        # and its accounting stay exact without it. Users can turn it back on per phase.
        "enable_prefix_caching": False,
    }
    if model.max_model_len is not None:
        kwargs["max_model_len"] = model.max_model_len
    kwargs.update(phase_memory_kwargs(cfg, role))
    kwargs.update(engine_tracing_kwargs(cfg.telemetry.tracing))
    kwargs.update(cfg.phase(role).engine_kwargs)
    return _to_argv(kwargs)


def _to_argv(kwargs: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


# Where vLLM keeps what this module uses, newest first: the CPU build here is 0.32, the GPU box
# runs 0.26 (the last release on its torch, ../shared/GPU.md), and these moved in between.
VLLM_NAMES: dict[str, tuple[str, ...]] = {
    "make_arg_parser": ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"),
    "init_app_state": ("vllm.entrypoints.launchers.api_server.app_state",
                       "vllm.entrypoints.openai.api_server"),
    "create_error_response": ("vllm.entrypoints.serve.exception_handling.error_response",
                              "vllm.entrypoints.serve.utils.error_response"),
    "UsageInfo": ("vllm.entrypoints.serve.engine.protocol",
                  "vllm.entrypoints.openai.engine.protocol"),
}


def vllm_name(name: str) -> Any:
    """`name` from the first module of `VLLM_NAMES[name]` this vLLM has. A module that exists
    but fails to import (a dependency missing) raises: only a missing module is skipped."""
    import importlib

    for module_path in VLLM_NAMES[name]:
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as error:
            if error.name is None or not module_path.startswith(error.name):
                raise
            continue
        return getattr(module, name)
    raise ImportError(f"{name}: none of {VLLM_NAMES[name]} in this vLLM")


def parse_engine_args(argv: list[str]) -> Namespace:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    make_arg_parser = vllm_name("make_arg_parser")

    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)


@dataclass
class TransferCounters:
    """NIXL transfer totals of one engine, summed over its lifetime."""

    num_transfers: int = 0
    num_failed_transfers: int = 0
    num_kv_expired_reqs: int = 0
    bytes_transferred: int = 0
    transfer_seconds: float = 0.0

    def add(self, data: dict[str, list[Any]]) -> None:
        self.num_transfers += len(data.get("transfer_duration", []))
        self.num_failed_transfers += len(data.get("num_failed_transfers", []))
        self.num_kv_expired_reqs += len(data.get("num_kv_expired_reqs", []))
        self.bytes_transferred += int(sum(data.get("bytes_transferred", [])))
        self.transfer_seconds += float(sum(data.get("transfer_duration", [])))


@dataclass
class EngineStats:
    """What a replica reports about its engine (`stats()` on both servers)."""

    transfers: TransferCounters = field(default_factory=TransferCounters)
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_finished_requests: int = 0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0


def _stats_logger_factory(stats: EngineStats) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Collector(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                stats.num_running_reqs = scheduler_stats.num_running_reqs
                stats.num_waiting_reqs = scheduler_stats.num_waiting_reqs
                stats.kv_cache_usage = scheduler_stats.kv_cache_usage
                if scheduler_stats.kv_connector_stats:
                    stats.transfers.add(scheduler_stats.kv_connector_stats)
            if iteration_stats is not None:
                stats.num_prompt_tokens += iteration_stats.num_prompt_tokens
                stats.num_generation_tokens += iteration_stats.num_generation_tokens
                stats.num_finished_requests += len(iteration_stats.finished_requests)

        def log_engine_initialized(self) -> None:
            pass

    return _Collector


class Engine:
    """One vLLM engine with vLLM's OpenAI serving layer on top."""

    def __init__(self, cfg: AppConfig, role: str) -> None:
        self.cfg = cfg
        self.role = role
        self.stats = EngineStats()
        self._state: Any = None
        self._engine: Any = None

    async def start(self) -> None:
        # Before vLLM's imports: a cause found here fails the replica in a second, not a minute.
        if not self.cfg.is_unified:
            check_side_channel_free(self.cfg, self.role)  # a taken port would hang the start
        # The engine's processes (EngineCore, workers) die with this one (vllm_plugin).
        os.environ[OWNER_PID_ENV] = str(os.getpid())
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        init_app_state = vllm_name("init_app_state")

        started = time.monotonic()
        args = parse_engine_args(engine_argv(self.cfg, self.role))
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        self._engine = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            disable_log_stats=False,
            stat_loggers=[_stats_logger_factory(self.stats)],
        )
        state = State()
        tasks = await self._engine.get_supported_tasks()
        await init_app_state(self._engine, state, args, supported_tasks=tasks)
        self._state = state
        logger.info("%s engine started in %.1f s", self.role, time.monotonic() - started)

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    @functools.cached_property
    def kv_signature(self) -> str:
        """What two engines must share for one to read the other's KV blocks: model weights,
        dtype, KV layout and block size, and the vLLM that lays them out."""
        import hashlib

        import vllm

        config = self._engine.vllm_config
        model, cache, parallel = config.model_config, config.cache_config, config.parallel_config
        parts = (
            vllm.__version__, model.model, model.revision, str(model.dtype), cache.cache_dtype,
            cache.block_size, model.get_num_layers(parallel), model.get_num_kv_heads(parallel),
            model.get_head_size(),
        )
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    @property
    def max_model_len(self) -> int:
        return int(self._engine.model_config.max_model_len)

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes of one KV block over all layers (K and V), as NIXL moves them (full
        attention: one KV cache group, what both engines here run)."""
        from vllm.utils.torch_utils import get_kv_cache_torch_dtype

        config = self._engine.vllm_config
        model, cache, parallel = config.model_config, config.cache_config, config.parallel_config
        dtype = get_kv_cache_torch_dtype(cache.cache_dtype, model.dtype)
        per_token = (
            2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel)
            * model.get_head_size() * dtype.itemsize
        )
        return int(per_token * cache.block_size)

    async def create(self, endpoint: str, request: Any, context: Any = None) -> Any:
        """Run one OpenAI request: a response model, an `ErrorResponse`, or an SSE generator.

        `context` (from `request_context`) carries trace headers into vLLM and its usage out.

        vLLM's HTTP layer turns the exceptions of request validation (prompt too long, bad
        sampling parameters) into error responses; without that layer it is done here, with
        vLLM's own mapping from exception to status.
        """
        create_error_response = vllm_name("create_error_response")

        try:
            if endpoint == "chat":
                return await self._state.openai_serving_chat.create_chat_completion(
                    request, context
                )
            return await self._state.openai_serving_completion.create_completion(request, context)
        except Exception as exc:  # noqa: BLE001 - becomes an OpenAI error with vLLM's status
            return create_error_response(exc)

    async def list_models(self) -> dict[str, Any]:
        models = await self._state.openai_serving_models.show_available_models()
        return models.model_dump()

    async def check_health(self) -> None:
        await self._engine.check_health()

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def release_remote_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        """Tell the connector that a handed-off request will never run here, so the prefill
        engine frees the blocks it holds for it now instead of when their lease expires."""
        await self._engine.notify_kv_transfer_request_rejected(request_id, kv_transfer_params)

    async def num_unfinished_requests(self) -> int:
        return int(self._engine.output_processor.get_num_unfinished_requests())

    async def all_blocks_free(self) -> bool:
        """True when no KV block is allocated (resetting the prefix cache only succeeds then)."""
        return bool(await self._engine.reset_prefix_cache())


def request_context(trace_headers: dict[str, str] | None = None) -> Any:
    """A stand-in for the HTTP request vLLM's serving layer reads when it has one: the trace
    headers (vLLM's spans then join the trace) in, the final usage (`final_usage`) out."""
    from starlette.requests import Request

    headers = [(k.lower().encode(), v.encode()) for k, v in (trace_headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


def final_usage(context: Any) -> dict[str, Any] | None:
    """The usage vLLM recorded for the request run with `context`, once it is done."""
    metadata = getattr(context.state, "request_metadata", None)
    usage = getattr(metadata, "final_usage_info", None)
    return usage.model_dump() if usage is not None else None


async def iterate_sse(generator: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yield vLLM's SSE events, closing vLLM's generator (and so aborting) on any exit."""
    try:
        async for event in generator:
            yield event
    finally:
        await generator.aclose()  # type: ignore[attr-defined]
