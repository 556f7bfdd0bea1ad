"""Memory planner: how one GPU's memory divides between the prefill and the decode engine.

    python -m serve_app.plan llama-3.1-8b --gpu h100-80gb \
        --prefill-memory-share 0.45 --decode-memory-share 0.45 --context-len 8192

Each engine is a separate vLLM process, so each holds its own copy of the weights. A memory share
is a fraction of the whole card, like vLLM's `gpu_memory_utilization`; within it an engine keeps
its weights, a runtime reserve (`overhead`) and, in what is left, its paged KV cache:

    kv_pool = share * gpu_memory - weight_bytes - overhead
    kv_bytes_per_token = 2 (K and V) * layers * kv_heads * head_dim * kv_dtype_bytes

A split is refused (`PlanError`) when a pool cannot hold one sequence of the context length
(vLLM refuses to start then) or when the shares add up to more than the headroom limit.

The computation is pure (`ModelShape`, `plan_split`, `min_memory_share`) so config validators
can call it; the CLI only parses, prints and sets the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1 << 30
MIB = 1 << 20

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
_DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "fp8_inc": "fp8",
}

# Total memory as nvidia-smi reports it (MiB). vLLM multiplies gpu_memory_utilization by the
# total that cudaMemGetInfo reports, which can be a few hundred MiB less: pass
# --gpu-memory-gib with that figure to plan to the byte.
GPU_PRESETS_MIB: dict[str, int] = {
    "h100-80gb": 81559,
    "h200-141gb": 143771,
    "a100-80gb": 81920,
    "l40s-48gb": 46068,  # AWS g6e
}

DEFAULT_GPU_MEMORY_GIB = 80.0
# Per engine, outside weights and KV: the activation peak of vLLM's profiling forward pass
# (grows with max_num_batched_tokens; ~0.5-1 GiB for an 8B model at 8k tokens), CUDA graphs
# (~0.3-1 GiB), and non-torch allocations (CUDA context, cuBLAS/NCCL workspaces, NIXL/UCX
# registration buffers). 2 GiB covers an 8B model with default settings; calibrate against the
# "Available KV cache memory" line that vLLM logs at start-up.
DEFAULT_OVERHEAD_GIB = 2.0
# Both shares together stay under this fraction of the card: the MPS server, memory that
# vLLM does not account for and allocator fragmentation live in the rest.
DEFAULT_MAX_TOTAL_SHARE = 0.95
DEFAULT_BLOCK_SIZE = 16


class PlanError(ValueError):
    """A split that cannot fit on the card; the message says why and what to change."""


def normalize_dtype(name: str) -> str:
    """Return the canonical dtype name for `name` (e.g. "bf16" -> "bfloat16")."""
    key = name.strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        allowed = sorted(set(DTYPE_BYTES) | set(_DTYPE_ALIASES))
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(allowed)}")
    return key


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a dense decoder-only transformer (Llama/Qwen2/Mistral family) that fix its
    weight and KV cache memory."""

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    is_tied_embeddings: bool
    dtype: str = "bfloat16"
    has_qkv_bias: bool = False
    has_o_bias: bool = False
    has_mlp_bias: bool = False
    max_position_embeddings: int | None = None
    """The model's own context length (vLLM's `max_model_len` when the config sets none)."""

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str = "custom") -> ModelShape:
        """Read the shape from a Hugging Face `config.json` dict.

        Raises ValueError for missing fields and for architectures this formula does not
        describe (mixture of experts, multi-head latent attention, quantized checkpoints).
        """
        text_config = config.get("text_config")
        if isinstance(text_config, Mapping) and "hidden_size" in text_config:
            config = text_config
        _reject_unsupported(config, name)
        missing = [
            key
            for key in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "vocab_size",
            )
            if key not in config
        ]
        if missing:
            raise ValueError(f"{name}: config lacks {', '.join(missing)}")
        num_heads = int(config["num_attention_heads"])
        has_attention_bias = bool(config.get("attention_bias", False))
        return cls(
            name=name,
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // num_heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            is_tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            dtype=normalize_dtype(str(config.get("dtype") or config.get("torch_dtype") or "bf16")),
            # Qwen2 puts a bias on q, k and v without saying so in its config.
            has_qkv_bias=has_attention_bias or config.get("model_type") == "qwen2",
            has_o_bias=has_attention_bias,
            has_mlp_bias=bool(config.get("mlp_bias", False)),
            max_position_embeddings=config.get("max_position_embeddings"),
        )

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def num_params_per_layer(self) -> int:
        """q, k, v, o projections, gate/up/down MLP and the two RMSNorms of one layer."""
        q_dim = self.num_attention_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q_dim + 2 * kv_dim) + q_dim * self.hidden_size
        attention += (q_dim + 2 * kv_dim) * self.has_qkv_bias + self.hidden_size * self.has_o_bias
        mlp = 3 * self.hidden_size * self.intermediate_size
        mlp += (2 * self.intermediate_size + self.hidden_size) * self.has_mlp_bias
        norms = 2 * self.hidden_size
        return attention + mlp + norms

    @property
    def num_params(self) -> int:
        """Embeddings + layers + final norm + lm_head (unless tied to the embeddings)."""
        embedding = self.vocab_size * self.hidden_size
        lm_head = 0 if self.is_tied_embeddings else embedding
        return embedding + self.num_layers * self.num_params_per_layer + self.hidden_size + lm_head

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    def kv_bytes_per_token(self, kv_dtype_bytes: int | None = None) -> int:
        """K and V of every layer for one token; `None` means the model's own dtype."""
        dtype_bytes = self.dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _reject_unsupported(config: Mapping[str, Any], name: str) -> None:
    for key, what in (
        ("num_local_experts", "mixture-of-experts"),
        ("num_experts", "mixture-of-experts"),
        ("n_routed_experts", "mixture-of-experts"),
        ("kv_lora_rank", "multi-head latent attention"),
        ("quantization_config", "quantized"),
    ):
        if config.get(key):
            raise ValueError(f"{name}: {what} models are not supported by this planner ({key})")


BUILTIN_MODELS: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape(
        name="llama-3.1-8b",
        hidden_size=4096,
        num_layers=32,
        num_attention_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        is_tied_embeddings=False,
        max_position_embeddings=131072,
    ),
    "qwen2.5-7b": ModelShape(
        name="qwen2.5-7b",
        hidden_size=3584,
        num_layers=28,
        num_attention_heads=28,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=18944,
        vocab_size=152064,
        is_tied_embeddings=False,
        has_qkv_bias=True,
        max_position_embeddings=32768,
    ),
    "llama-3.2-1b": ModelShape(
        name="llama-3.2-1b",
        hidden_size=2048,
        num_layers=16,
        num_attention_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128256,
        is_tied_embeddings=True,
        max_position_embeddings=131072,
    ),
}
_MODEL_ALIASES: dict[str, str] = {
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "qwen/qwen2.5-7b": "qwen2.5-7b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b",
    "meta-llama/llama-3.2-1b-instruct": "llama-3.2-1b",
}


def load_model_shape(spec: str) -> ModelShape:
    """A model directory, a `config.json` path, or a built-in name (case-insensitive)."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        return ModelShape.from_hf_config(config, name=str(spec))
    key = spec.lower()
    key = _MODEL_ALIASES.get(key, key)
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]
    raise ValueError(
        f"model {spec!r} is neither a directory with config.json, a config.json file, nor a "
        f"built-in architecture ({', '.join(BUILTIN_MODELS)})"
    )


def kv_dtype_bytes(kv_cache_dtype: str, model: ModelShape) -> int:
    """Bytes per KV element: "auto" is the model's dtype, as in vLLM's `kv_cache_dtype`."""
    if kv_cache_dtype == "auto":
        return model.dtype_bytes
    return DTYPE_BYTES[normalize_dtype(kv_cache_dtype)]


@dataclass(frozen=True)
class EnginePlan:
    """One engine's slice of the card."""

    role: str
    memory_share: float
    budget_bytes: int
    weight_bytes: int
    overhead_bytes: int
    kv_pool_bytes: int
    num_kv_tokens: int
    max_num_seqs: int
    min_memory_share: float


@dataclass(frozen=True)
class SplitPlan:
    """Both engines on one card, and the KV handoff between them."""

    model: ModelShape
    num_params: int
    gpu_memory_bytes: int
    kv_cache_dtype: str
    kv_bytes_per_token: int
    block_size: int
    context_len: int
    prompt_len: int
    handoff_bytes_per_request: int
    max_total_share: float
    prefill: EnginePlan
    decode: EnginePlan

    @property
    def total_share(self) -> float:
        return self.prefill.memory_share + self.decode.memory_share

    @property
    def total_used_bytes(self) -> int:
        return self.prefill.budget_bytes + self.decode.budget_bytes

    @property
    def free_bytes(self) -> int:
        return self.gpu_memory_bytes - self.total_used_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field plus the derived totals."""
        data = dataclasses.asdict(self)
        data.update(
            total_share=round(self.total_share, 6),
            total_used_bytes=self.total_used_bytes,
            free_bytes=self.free_bytes,
        )
        return data


def _kv_tokens(kv_pool_bytes: int, kv_bytes_per_token: int, block_size: int) -> int:
    """vLLM allocates the pool in whole blocks of `block_size` tokens."""
    if kv_pool_bytes <= 0:
        return 0
    return kv_pool_bytes // (kv_bytes_per_token * block_size) * block_size


def _round_up(value: float, ndigits: int = 2) -> float:
    scale = 10**ndigits
    return math.ceil(value * scale - 1e-9) / scale


def min_memory_share(
    model: ModelShape,
    gpu_memory_bytes: int,
    overhead_bytes: int,
    kv_bytes_per_token: int,
    context_len: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> float:
    """The smallest share (rounded up to 0.01) whose pool holds one `context_len` sequence."""
    min_kv = math.ceil(context_len / block_size) * block_size * kv_bytes_per_token
    return _round_up((model.weight_bytes + overhead_bytes + min_kv) / gpu_memory_bytes)


def plan_engine(
    role: str,
    memory_share: float,
    model: ModelShape,
    gpu_memory_bytes: int,
    overhead_bytes: int,
    kv_bytes_per_token: int,
    context_len: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> EnginePlan:
    """One engine's numbers; no checks (see `engine_problem`)."""
    budget = int(memory_share * gpu_memory_bytes)
    kv_pool = budget - model.weight_bytes - overhead_bytes
    num_kv_tokens = _kv_tokens(kv_pool, kv_bytes_per_token, block_size)
    return EnginePlan(
        role=role,
        memory_share=memory_share,
        budget_bytes=budget,
        weight_bytes=model.weight_bytes,
        overhead_bytes=overhead_bytes,
        kv_pool_bytes=kv_pool,
        num_kv_tokens=num_kv_tokens,
        max_num_seqs=num_kv_tokens // context_len,
        min_memory_share=min_memory_share(
            model, gpu_memory_bytes, overhead_bytes, kv_bytes_per_token, context_len, block_size
        ),
    )


def engine_problem(engine: EnginePlan, gpu_memory_bytes: int, context_len: int) -> str | None:
    """Why this engine cannot start, or None when its pool holds a `context_len` sequence."""
    if engine.max_num_seqs >= 1:
        return None
    shortfall = (
        "" if engine.kv_pool_bytes <= 0 else f", less than one {context_len}-token sequence needs"
    )
    return (
        f"{engine.role}: memory share {engine.memory_share:g} of {_gib(gpu_memory_bytes)} = "
        f"{_gib(engine.budget_bytes)} leaves {_gib(engine.kv_pool_bytes)} for KV after "
        f"{_gib(engine.weight_bytes)} weights and {_gib(engine.overhead_bytes)} overhead"
        f"{shortfall}; raise --{engine.role}-memory-share to at least "
        f"{engine.min_memory_share:.2f}"
    )


def _check_inputs(
    prefill_share: float,
    decode_share: float,
    context_len: int,
    prompt_len: int,
    max_total_share: float,
    block_size: int,
) -> None:
    for flag, share in (("prefill", prefill_share), ("decode", decode_share)):
        if not 0.0 < share <= 1.0:
            raise ValueError(f"--{flag}-memory-share must be in (0, 1], got {share}")
    if not 0.0 < max_total_share <= 1.0:
        raise ValueError(f"--max-total-share must be in (0, 1], got {max_total_share}")
    if context_len < 1 or block_size < 1:
        raise ValueError("--context-len and --block-size must be at least 1")
    if not 1 <= prompt_len <= context_len:
        raise ValueError(
            f"--prompt-len must be in [1, --context-len={context_len}], got {prompt_len}"
        )


def plan_split(
    model: ModelShape,
    gpu_memory_bytes: int,
    prefill_memory_share: float,
    decode_memory_share: float,
    *,
    kv_cache_dtype: str = "auto",
    context_len: int = 8192,
    prompt_len: int = 2048,
    overhead_bytes: int = int(DEFAULT_OVERHEAD_GIB * GIB),
    max_total_share: float = DEFAULT_MAX_TOTAL_SHARE,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> SplitPlan:
    """Plan both engines on one card.

    Raises ValueError for malformed inputs and PlanError (a ValueError) when the split does
    not fit; the PlanError message lists every problem, one a line.
    """
    _check_inputs(
        prefill_memory_share,
        decode_memory_share,
        context_len,
        prompt_len,
        max_total_share,
        block_size,
    )
    kv_per_token = model.kv_bytes_per_token(kv_dtype_bytes(kv_cache_dtype, model))
    engines = [
        plan_engine(
            role,
            share,
            model,
            gpu_memory_bytes,
            overhead_bytes,
            kv_per_token,
            context_len,
            block_size,
        )
        for role, share in (("prefill", prefill_memory_share), ("decode", decode_memory_share))
    ]
    plan = SplitPlan(
        model=model,
        num_params=model.num_params,
        gpu_memory_bytes=gpu_memory_bytes,
        kv_cache_dtype=kv_cache_dtype,
        kv_bytes_per_token=kv_per_token,
        block_size=block_size,
        context_len=context_len,
        prompt_len=prompt_len,
        handoff_bytes_per_request=prompt_len * kv_per_token,
        max_total_share=max_total_share,
        prefill=engines[0],
        decode=engines[1],
    )
    problems = [engine_problem(engine, gpu_memory_bytes, context_len) for engine in engines]
    problems.append(_total_problem(plan))
    if any(problems):
        raise PlanError("\n".join(problem for problem in problems if problem))
    return plan


def _total_problem(plan: SplitPlan) -> str | None:
    if plan.total_share <= plan.max_total_share + 1e-9:
        return None
    return (
        f"prefill + decode memory shares {plan.prefill.memory_share:g} + "
        f"{plan.decode.memory_share:g} = {plan.total_share:.2f} exceed the limit "
        f"{plan.max_total_share:g} of the card ({_gib(plan.total_used_bytes)} of "
        f"{_gib(plan.gpu_memory_bytes)}); lower them, or raise --max-total-share (at most 1.0)"
    )


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB"


def format_table(plan: SplitPlan, num_pairs: int = 1) -> str:
    """The human-readable report: one pair on one GPU, then `num_pairs` pairs' totals."""
    model = plan.model
    rows = [
        ("memory share", lambda e: f"{e.memory_share:g}"),
        ("budget", lambda e: _gib(e.budget_bytes)),
        ("weights", lambda e: _gib(e.weight_bytes)),
        ("overhead", lambda e: _gib(e.overhead_bytes)),
        ("KV pool", lambda e: _gib(e.kv_pool_bytes)),
        ("KV tokens", lambda e: f"{e.num_kv_tokens:,}"),
        (f"max seqs @ {plan.context_len}", lambda e: f"{e.max_num_seqs:,}"),
        ("min memory share", lambda e: f"{e.min_memory_share:.2f}"),
    ]
    kv_dtype = model.dtype if plan.kv_cache_dtype == "auto" else plan.kv_cache_dtype
    lines = [
        f"model      {model.name}: {plan.num_params / 1e9:.3f} B params "
        f"({plan.num_params:,}), {model.dtype}",
        f"GPU        {_gib(plan.gpu_memory_bytes)}",
        f"KV cache   {kv_dtype}, {plan.kv_bytes_per_token:,} B/token, block {plan.block_size}",
        "",
        f"{'one pair, one GPU':<20}{'prefill':>14}{'decode':>14}",
    ]
    lines += [f"{label:<20}{cell(plan.prefill):>14}{cell(plan.decode):>14}" for label, cell in rows]
    lines += [
        "",
        f"handoff per request ({plan.prompt_len:,}-token prompt): "
        f"{plan.handoff_bytes_per_request / MIB:.1f} MiB",
        f"total used: {_gib(plan.total_used_bytes)} of {_gib(plan.gpu_memory_bytes)} "
        f"(share {plan.total_share:.2f}, limit {plan.max_total_share:g}), "
        f"free {_gib(plan.free_bytes)}",
    ]
    if num_pairs > 1:
        totals = cluster_totals(plan, num_pairs)
        lines.append(
            f"cluster: {num_pairs} pairs on {num_pairs} GPUs: KV tokens prefill "
            f"{totals['prefill_kv_tokens']:,}, decode {totals['decode_kv_tokens']:,}; decode "
            f"max seqs @ {plan.context_len} {totals['decode_max_seqs']:,}"
        )
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.plan",
        description="Split one GPU's memory between a prefill and a decode vLLM engine.",
    )
    parser.add_argument(
        "model", help=f"model directory, config.json, or one of: {', '.join(BUILTIN_MODELS)}"
    )
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--gpu-memory-gib", type=float, help=f"default {DEFAULT_GPU_MEMORY_GIB:g}")
    gpu.add_argument("--gpu", choices=sorted(GPU_PRESETS_MIB), help="preset card memory")
    parser.add_argument("--prefill-memory-share", type=float, default=0.45)
    parser.add_argument("--decode-memory-share", type=float, default=0.45)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (model dtype), bf16, fp8")
    parser.add_argument("--context-len", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument(
        "--overhead-gib",
        type=float,
        default=DEFAULT_OVERHEAD_GIB,
        help="per-engine reserve for activations, CUDA graphs and non-torch memory",
    )
    parser.add_argument("--max-total-share", type=float, default=DEFAULT_MAX_TOTAL_SHARE)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument(
        "--pairs", type=int, default=1, help="pairs in the cluster, one per GPU: adds totals"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def _gpu_memory_bytes(args: argparse.Namespace) -> int:
    if args.gpu:
        return GPU_PRESETS_MIB[args.gpu] * MIB
    gib = DEFAULT_GPU_MEMORY_GIB if args.gpu_memory_gib is None else args.gpu_memory_gib
    if gib <= 0:
        raise ValueError(f"--gpu-memory-gib must be positive, got {gib}")
    return int(gib * GIB)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 when the split fits, 1 when refused, 2 for bad arguments."""
    args = _parse_args(argv)
    try:
        plan = plan_split(
            load_model_shape(args.model),
            _gpu_memory_bytes(args),
            args.prefill_memory_share,
            args.decode_memory_share,
            kv_cache_dtype=args.kv_cache_dtype,
            context_len=args.context_len,
            prompt_len=args.prompt_len,
            overhead_bytes=int(args.overhead_gib * GIB),
            max_total_share=args.max_total_share,
            block_size=args.block_size,
        )
    except PlanError as error:
        return _refuse(str(error), args.json, exit_code=1)
    except ValueError as error:
        return _refuse(str(error), args.json, exit_code=2)
    if args.pairs < 1:
        return _refuse(f"--pairs must be at least 1, got {args.pairs}", args.json, exit_code=2)
    if args.json:
        print(json.dumps({**plan.to_dict(), "cluster": cluster_totals(plan, args.pairs)}, indent=2))
    else:
        print(format_table(plan, args.pairs))
    return 0


def cluster_totals(plan: SplitPlan, num_pairs: int) -> dict[str, int]:
    """What `num_pairs` pairs, one per GPU, hold together (the plan is one GPU's)."""
    return {
        "pairs": num_pairs,
        "gpus": num_pairs,
        "gpu_memory_bytes": plan.gpu_memory_bytes * num_pairs,
        "prefill_kv_tokens": plan.prefill.num_kv_tokens * num_pairs,
        "decode_kv_tokens": plan.decode.num_kv_tokens * num_pairs,
        "decode_max_seqs": plan.decode.max_num_seqs * num_pairs,
    }


def _refuse(message: str, as_json: bool, exit_code: int) -> int:
    if as_json:
        print(json.dumps({"error": message, "problems": message.splitlines()}, indent=2))
    print(f"refused: {message}" if exit_code == 1 else f"error: {message}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
