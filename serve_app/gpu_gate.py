"""MPS correctness gate: a replica with an SM cap checks its GEMMs before its engine starts.

Under an MPS SM cap (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`) cuBLAS picks kernels for fewer SMs,
and some picks have returned wrong numbers: SGLang-Omni measured a BF16 GEMM with relative
error 0.92 at some SM limits (H200, PyTorch 2.13, CUDA 13) and now checks every capped process
at start. So does this app: a replica whose phase sets `sm_percentage` (and keeps
`mps.gemm_check: true`, the default) runs, after the MPS preflight and before its engine:

1. the shapes the model's layers use: M x hidden x hidden (q/o projections), M x hidden x
   intermediate (gate/up), M x intermediate x hidden (down), for a few M (one decode token up
   to a prefill chunk), from the model's `config.json` (or a built-in shape);
2. inputs drawn in FP32 on the CPU with a fixed seed and rounded to the model's dtype; the
   reference is the FP32 CPU product of those same rounded inputs;
3. the product on the device in the model's dtype, compared by relative Frobenius error
   `||C - R||_F / ||R||_F`; above `threshold` (1e-2, SGLang-Omni's) the replica refuses to
   start with the SM percentage, shape, dtype, error and threshold in the message.

The replica runs the check in a child process (`python -m serve_app.gpu_gate`, which inherits
the replica's MPS environment): the check's CUDA context and memory are gone before vLLM
profiles the card. On a CPU the same logic runs on CPU tensors (`device="cpu"`), which is how
it is tested without a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.plan import ModelShape, normalize_dtype

if TYPE_CHECKING:
    from serve_app.config import AppConfig

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 1e-2
DEFAULT_M_VALUES = (1, 32, 256)
# SGLang-Omni's shape, for a model whose config.json cannot be read before the engine fetches it.
FALLBACK_SHAPE = (512, 1024, 1024)
_SEED = 0


class GemmGateError(RuntimeError):
    """The gate refused to let the engine start (wrong GEMM results, or it could not run).
    `results`: every product checked, when the refusal is for wrong numbers."""

    def __init__(self, message: str, results: Sequence[GemmResult] = ()) -> None:
        super().__init__(message)
        self.results = list(results)


# What the gate found on a real card (bench/results/gpu-20261204): which caps to try first.
MEASURED_CAPS = ("on an H200 with driver 580.159 and PyTorch 2.11+cu130, 25, 30, 50 and 100 "
                 "passed; 20, 40, 60, 70, 75 and 80 were refused")


@dataclass(frozen=True)
class GemmShape:
    """One product `(m x k) @ (k x n)`, named after the layer that uses it."""

    layer: str
    m: int
    k: int
    n: int

    def __str__(self) -> str:
        return f"{self.layer} M={self.m} x K={self.k} x N={self.n}"


@dataclass(frozen=True)
class GemmResult:
    shape: GemmShape
    dtype: str
    device: str
    rel_error: float
    seconds: float


def layer_shapes(model: ModelShape, m_values: Sequence[int] = DEFAULT_M_VALUES) -> list[GemmShape]:
    """The GEMMs of one decoder layer of `model`, for each number of rows `m`."""
    hidden, intermediate = model.hidden_size, model.intermediate_size
    layers = [("hidden x hidden", hidden, hidden), ("hidden x intermediate", hidden, intermediate),
              ("intermediate x hidden", intermediate, hidden)]
    return [GemmShape(name, m, k, n) for m in m_values for name, k, n in layers]


def relative_error(result: Any, reference: Any) -> float:
    """`||result - reference||_F / ||reference||_F`, both FP32 tensors on the CPU."""
    import torch

    return float(torch.linalg.norm(result - reference) / torch.linalg.norm(reference))


def check_gemm(
    shape: GemmShape,
    dtype: str,
    device: str,
    matmul: Callable[[Any, Any], Any] | None = None,
) -> GemmResult:
    """One product on `device` in `dtype` against the FP32 CPU product of the same inputs.

    `matmul` replaces `torch.matmul` for the device product (tests pass a wrong one).
    """
    import torch

    torch_dtype = getattr(torch, normalize_dtype(dtype))
    generator = torch.Generator().manual_seed(_SEED + shape.m * 7 + shape.k * 3 + shape.n)
    a = torch.randn(shape.m, shape.k, generator=generator).to(torch_dtype)
    b = (torch.randn(shape.k, shape.n, generator=generator) / shape.k**0.5).to(torch_dtype)
    reference = a.float() @ b.float()
    started = time.perf_counter()
    product = (matmul or torch.matmul)(a.to(device), b.to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    error = relative_error(product.float().cpu(), reference)
    return GemmResult(shape, normalize_dtype(dtype), device, error, seconds)


def run_gate(
    shapes: Sequence[GemmShape],
    dtype: str,
    device: str,
    *,
    sm_percentage: int | None,
    threshold: float = DEFAULT_THRESHOLD,
    matmul: Callable[[Any, Any], Any] | None = None,
) -> list[GemmResult]:
    """Check every shape; raise GemmGateError naming the worst one if any is over `threshold`."""
    if device.startswith("cuda"):
        _require_cuda()
    results = [check_gemm(shape, dtype, device, matmul) for shape in shapes]
    failed = [r for r in results if not r.rel_error <= threshold]  # NaN fails too
    if failed:
        raise GemmGateError(refusal_message(failed, threshold, sm_percentage, len(results)),
                            results)
    return results


def refusal_message(
    failed: Sequence[GemmResult], threshold: float, sm_percentage: int | None, num_checked: int
) -> str:
    worst = max(failed, key=lambda r: r.rel_error if r.rel_error == r.rel_error else float("inf"))
    cap = f"SM cap {sm_percentage}%" if sm_percentage is not None else "no SM cap"
    return (
        f"MPS correctness gate: at {cap} (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), a {worst.dtype} "
        f"GEMM {worst.shape} on {worst.device} has relative Frobenius error "
        f"{worst.rel_error:.3g} against the FP32 CPU reference, over the threshold "
        f"{threshold:g} ({len(failed)} of {num_checked} products over it: "
        f"{', '.join(f'{r.shape.m}x{r.shape.k}x{r.shape.n}' for r in failed)}). The engine is "
        "not started: cuBLAS returns wrong numbers at this SM cap. Try another sm_percentage "
        f"({MEASURED_CAPS}), or set mps.gemm_check: false to start anyway."
    )


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise GemmGateError(
            "MPS correctness gate cannot run: torch sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={visible}); a device: cuda replica needs its GPU"
        )


def gate_shapes(model_source: str, dtype: str, m_values: Sequence[int]) -> tuple[list, str]:
    """The model's layer shapes and dtype (`auto`: the model's), or the fallback shape."""
    from serve_app.config_plan import read_model_shape

    try:
        model = read_model_shape(model_source)
    except ValueError as error:
        logger.warning("gate: %s; checking the fallback shape", error)
        model = None
    if dtype == "auto":
        dtype = model.dtype if model is not None else "bfloat16"
        dtype = "bfloat16" if dtype == "float32" else dtype  # vLLM's auto downcasts FP32
    if model is None:
        m, k, n = FALLBACK_SHAPE
        logger.warning("gate: no config.json for %s yet; checking %dx%dx%d", model_source, m, k, n)
        return [GemmShape("fallback", m, k, n)], dtype
    return layer_shapes(model, m_values), dtype


# --- the replica's side: run the check in a child process -------------------------------------


def gate_command(cfg: AppConfig, role: str) -> list[str] | None:
    """The child's command line, or None when this replica is not gated."""
    phase = cfg.phase(role)
    if cfg.device != "cuda" or phase.sm_percentage is None or not cfg.mps.gemm_check:
        return None
    return [sys.executable, "-m", "serve_app.gpu_gate", "--model", cfg.model.source,
            "--dtype", cfg.model.dtype, "--device", "cuda", "--role", role,
            "--sm-percentage", str(phase.sm_percentage), "--json"]


async def gate_replica(cfg: AppConfig, role: str) -> None:
    """Called by a replica after the MPS preflight, before its engine starts."""
    command = gate_command(cfg, role)
    if command is None:
        return
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    child = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await child.communicate()
    report = _parse_report(stdout.decode())
    if child.returncode != 0 or not report.get("passed"):
        tail = stderr.decode().strip().splitlines()[-5:]
        raise GemmGateError(f"{role}: " + (report.get("error") or "\n".join(tail)
                                           or f"gate exited {child.returncode}"))
    logger.info("%s: MPS correctness gate passed at SM cap %s%%: %d products, worst error %.2e",
                role, cfg.phase(role).sm_percentage, len(report["results"]),
                max(r["rel_error"] for r in report["results"]))


def _parse_report(text: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


# --- CLI ---------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve_app.gpu_gate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="model folder, config.json or built-in name (plan.BUILTIN_MODELS)")
    parser.add_argument("--dtype", default="auto", help="auto (the model's), bfloat16, float16")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--m", default=",".join(map(str, DEFAULT_M_VALUES)),
                        help="rows of each product, comma-separated")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--sm-percentage", type=int, default=None,
                        help="for the message; default: $CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    parser.add_argument("--role", default="gate")
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """0: passed; 1: refused (or cannot run); 2: bad arguments."""
    args = _parse_args(argv)
    sm = args.sm_percentage
    if sm is None and os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "").isdigit():
        sm = int(os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"])
    try:
        m_values = [int(m) for m in args.m.split(",")]
        shapes, dtype = gate_shapes(args.model, args.dtype, m_values)
        results = run_gate(shapes, dtype, args.device, sm_percentage=sm, threshold=args.threshold)
    except GemmGateError as error:
        return _report(args, {"passed": False, "error": str(error), "sm_percentage": sm,
                              "threshold": args.threshold, "results": _rows(error.results)}, 1)
    except ValueError as error:
        return _report(args, {"passed": False, "error": str(error)}, 2)
    report = {"passed": True, "sm_percentage": sm, "threshold": args.threshold,
              "results": _rows(results)}
    return _report(args, report, 0)


def _rows(results: Sequence[GemmResult]) -> list[dict[str, Any]]:
    return [{**asdict(r), "shape": asdict(r.shape)} for r in results]


def _report(args: argparse.Namespace, report: dict[str, Any], code: int) -> int:
    if args.json:
        print(json.dumps(report, indent=2))
    if code:
        print(f"refused: {report['error']}", file=sys.stderr)
    else:
        worst = max(r["rel_error"] for r in report["results"])
        print(f"{args.role}: gate passed, {len(report['results'])} products, worst relative "
              f"error {worst:.2e} (threshold {args.threshold:g})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
