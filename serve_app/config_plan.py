"""The memory planner applied to a serve config at build time (`AppConfig`'s last validator).

A `device: cuda` config is checked before any engine starts, so `serve run` / `serve deploy`
refuses a split that vLLM would refuse (or, worse, half-start) minutes later:

1. the card's memory: `gpu:` (a preset of `plan.GPU_PRESETS_MIB`, e.g. `h100-80gb`) or
   `gpu_memory_gib:`. Neither given: the check is skipped with a WARNING that says what to set;
   the planner does not guess the card (the machine that builds the app is often not the one
   that runs it, and a config that deployed before keeps deploying).
2. the architecture: `model.source`'s `config.json` (a local folder, or the Hugging Face cache,
   read offline), else a built-in shape (`llama-3.1-8b`, ...). Unknown: skipped with a WARNING.
3. each engine (prefill and decode; unified mode: decode's only) gets
   `share * card - weights - overhead` for its KV pool (`gpu_memory_utilization`; unset means
   vLLM's default), or its fixed `kv_cache_memory_bytes`; the pool must hold one sequence of
   `model.max_model_len` (default: the model's `max_position_embeddings`), and both engines
   together must stay within `1 - memory_headroom` of the card.

A refusal is a `PlanError` (a ValueError, so pydantic reports it as the config's error) whose
message carries the arithmetic: weights, KV bytes per token, each pool, and what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app.plan import (
    DEFAULT_BLOCK_SIZE,
    GIB,
    GPU_PRESETS_MIB,
    MIB,
    ModelShape,
    PlanError,
    kv_dtype_bytes,
    load_model_shape,
    normalize_dtype,
)

if TYPE_CHECKING:
    from serve_app.config import AppConfig

logger = logging.getLogger(__name__)

# vLLM 0.32's `CacheConfig.gpu_memory_utilization` default, used when a phase sets neither a
# share nor a fixed pool.
VLLM_DEFAULT_MEMORY_SHARE = 0.92


@dataclass(frozen=True)
class EngineBudget:
    """One engine's slice of the card, as the config asks for it and as the planner sees it."""

    role: str
    field: str
    """The config field that sets the slice (`decode.gpu_memory_utilization`, ...)."""
    memory_share: float
    budget_bytes: int
    kv_pool_bytes: int
    kv_bytes_per_token: int
    num_kv_tokens: int
    is_fixed_pool: bool
    is_vllm_default: bool = False
    """Neither a share nor a pool is set: vLLM's default share applies."""


@dataclass(frozen=True)
class AppPlan:
    """Every engine of one config on its card."""

    gpu: str
    gpu_memory_bytes: int
    model: ModelShape
    context_len: int
    context_field: str
    """Where `context_len` comes from: `model.max_model_len` or the model's own."""
    overhead_bytes: int
    max_total_share: float
    engines: tuple[EngineBudget, ...]

    @property
    def total_bytes(self) -> int:
        return sum(engine.budget_bytes for engine in self.engines)


def check_app_memory(cfg: AppConfig) -> AppPlan | None:
    """The plan of a `device: cuda` config; None when it is not checked (CPU, or unknowable).

    Raises PlanError (a ValueError) when an engine or the two together do not fit.
    """
    if cfg.device != "cuda":
        return None
    gpu = _gpu_memory(cfg)
    model = _model_shape(cfg)
    if gpu is None or model is None:
        return None
    context_len = cfg.model.max_model_len or model.max_position_embeddings
    if context_len is None:
        _warn(f"memory plan skipped: {cfg.model.source} states no max_position_embeddings; "
                   "set model.max_model_len")
        return None
    plan = plan_app(cfg, gpu[0], gpu[1], model, context_len)
    problems = [_engine_problem(plan, engine) for engine in plan.engines]
    problems = [p for p in (*problems, _total_problem(plan)) if p]
    if problems:
        raise PlanError(format_refusal(plan, problems))
    return plan


def plan_app(
    cfg: AppConfig, gpu: str, gpu_memory_bytes: int, model: ModelShape, context_len: int
) -> AppPlan:
    overhead = int(cfg.engine_overhead_gib * GIB)
    engines = tuple(
        _engine_budget(cfg, role, model, gpu_memory_bytes, overhead) for role in cfg.engine_phases
    )
    context_field = ("model.max_model_len" if cfg.model.max_model_len else
                     "the model's max_position_embeddings; model.max_model_len is unset")
    return AppPlan(gpu, gpu_memory_bytes, model, context_len, context_field, overhead,
                   1.0 - cfg.memory_headroom, engines)


def _engine_budget(
    cfg: AppConfig, role: str, model: ModelShape, gpu_memory_bytes: int, overhead: int
) -> EngineBudget:
    phase = cfg.phase(role)
    kwargs = phase.engine_kwargs
    kv_per_token = model.kv_bytes_per_token(
        kv_dtype_bytes(str(kwargs.get("kv_cache_dtype", "auto")), model)
    )
    block_size = int(kwargs.get("block_size") or DEFAULT_BLOCK_SIZE)
    if phase.kv_cache_memory_bytes is not None:
        pool = phase.kv_cache_memory_bytes
        budget = model.weight_bytes + overhead + pool
        share, field, fixed = budget / gpu_memory_bytes, f"{role}.kv_cache_memory_bytes", True
    else:
        share = phase.gpu_memory_utilization or VLLM_DEFAULT_MEMORY_SHARE
        budget = int(share * gpu_memory_bytes)
        pool = budget - model.weight_bytes - overhead
        field, fixed = f"{role}.gpu_memory_utilization", False
    num_tokens = max(pool, 0) // (kv_per_token * block_size) * block_size
    is_default = phase.kv_cache_memory_bytes is None and phase.gpu_memory_utilization is None
    return EngineBudget(role, field, share, budget, pool, kv_per_token, num_tokens, fixed,
                        is_default)


def _engine_problem(plan: AppPlan, engine: EngineBudget) -> str | None:
    """Why this engine's pool cannot hold one `context_len` sequence (vLLM refuses to start)."""
    if engine.num_kv_tokens >= plan.context_len:
        return None
    seq_bytes = plan.context_len * engine.kv_bytes_per_token
    missing = seq_bytes - max(engine.kv_pool_bytes, 0)
    if engine.is_fixed_pool:
        fix = f"raise {engine.field} to at least {math.ceil(seq_bytes / MIB) * MIB:,}"
    else:
        need = plan.model.weight_bytes + plan.overhead_bytes + seq_bytes
        fix = f"raise {engine.field} to at least {_round_up(need / plan.gpu_memory_bytes)}"
    tokens = engine.num_kv_tokens
    lower = f" or lower model.max_model_len to at most {tokens:,}" if tokens >= 16 else ""
    return (f"{engine.role}: KV pool {_gib(engine.kv_pool_bytes)} holds {tokens:,} tokens, less "
            f"than one {plan.context_len:,}-token sequence ({plan.context_len:,} x "
            f"{engine.kv_bytes_per_token:,} B = {_gib(seq_bytes)}): {_gib(missing)} missing; "
            f"{fix}{lower}")


def _total_problem(plan: AppPlan) -> str | None:
    limit = plan.max_total_share * plan.gpu_memory_bytes
    if plan.total_bytes <= limit + 1:
        return None
    parts = " + ".join(_gib(engine.budget_bytes) for engine in plan.engines)
    return (f"the engines together take {parts} = {_gib(plan.total_bytes)}, more than "
            f"{plan.max_total_share:g} (1 - memory_headroom) of the card = {_gib(int(limit))}: "
            f"{_gib(plan.total_bytes - int(limit))} missing; lower "
            f"{' or '.join(engine.field for engine in plan.engines)}")


def format_refusal(plan: AppPlan, problems: list[str]) -> str:
    """The arithmetic, then what does not fit, one line each."""
    model = plan.model
    lines = [
        f"the memory plan does not fit on gpu {plan.gpu} ({_gib(plan.gpu_memory_bytes)}; "
        "serve_app/config_plan.py):",
        f"  weights: {model.num_params:,} params x {model.dtype_bytes} B ({model.dtype}) = "
        f"{_gib(model.weight_bytes)} per engine (each engine loads its own copy); overhead "
        f"{_gib(plan.overhead_bytes)} per engine (engine_overhead_gib)",
        f"  context: {plan.context_len:,} tokens ({plan.context_field})",
    ]
    for engine in plan.engines:
        kv_bytes = engine.kv_bytes_per_token // (2 * model.num_layers * model.num_kv_heads
                                                 * model.head_dim)
        lines.append(
            f"  {engine.role}: KV {engine.kv_bytes_per_token:,} B/token (2 x "
            f"{model.num_layers} layers x {model.num_kv_heads} KV heads x {model.head_dim} "
            f"head dim x {kv_bytes} B); " + _slice(plan, engine)
        )
    lines += [f"  refused: {problem}" for problem in problems]
    return "\n".join(lines)


def _slice(plan: AppPlan, engine: EngineBudget) -> str:
    pool = (f"{_gib(engine.kv_pool_bytes)} KV pool = {engine.num_kv_tokens:,} tokens = "
            f"{engine.num_kv_tokens // plan.context_len} sequences of {plan.context_len:,}")
    if engine.is_fixed_pool:
        return (f"{engine.field} {engine.kv_pool_bytes:,} B = {pool}; with weights and overhead "
                f"{_gib(engine.budget_bytes)} = {engine.memory_share:.3f} of the card")
    unset = " (unset: vLLM's default)" if engine.is_vllm_default else ""
    return (f"{engine.field} {engine.memory_share:g}{unset} x {_gib(plan.gpu_memory_bytes)} = "
            f"{_gib(engine.budget_bytes)} - {_gib(plan.model.weight_bytes)} weights - "
            f"{_gib(plan.overhead_bytes)} overhead = {pool}")


def _gpu_memory(cfg: AppConfig) -> tuple[str, int] | None:
    if cfg.gpu is not None:
        return cfg.gpu, GPU_PRESETS_MIB[cfg.gpu] * MIB
    if cfg.gpu_memory_gib is not None:
        return f"of {cfg.gpu_memory_gib:g} GiB", int(cfg.gpu_memory_gib * GIB)
    _warn(f"memory plan skipped: set `gpu:` ({', '.join(sorted(GPU_PRESETS_MIB))}) or "
               "`gpu_memory_gib:` so the build can check that both engines fit on the card")
    return None


def _model_shape(cfg: AppConfig) -> ModelShape | None:
    source = cfg.model.source
    try:
        model = read_model_shape(source)
    except ValueError as error:
        _warn(f"memory plan skipped: {error}")
        return None
    if model is None:
        _warn(f"memory plan skipped: no config.json for {source} here (not a local folder, "
                   "not in the Hugging Face cache, not a built-in shape)")
        return None
    if cfg.model.dtype != "auto":
        model = dataclasses.replace(model, dtype=normalize_dtype(cfg.model.dtype))
    elif model.dtype == "float32":
        model = dataclasses.replace(model, dtype="bfloat16")  # vLLM's "auto" downcasts FP32
    return model


def read_model_shape(source: str) -> ModelShape | None:
    """A local folder or config.json, a built-in name, or the Hugging Face cache (offline)."""
    try:
        return load_model_shape(source)
    except ValueError as error:
        if Path(source).exists() or "built-in architecture" not in str(error):
            raise
    cached = _cached_hf_config(source)
    if cached is None:
        return None
    return ModelShape.from_hf_config(json.loads(Path(cached).read_text()), name=source)


def _cached_hf_config(repo_id: str) -> str | None:
    if repo_id.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache  # only for ids not known here

    found = try_to_load_from_cache(repo_id, "config.json")
    return found if isinstance(found, str) else None


def _warn(message: str) -> None:
    logger.warning(message)


def _round_up(value: float) -> float:
    return math.ceil(value * 100 - 1e-9) / 100


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB"
