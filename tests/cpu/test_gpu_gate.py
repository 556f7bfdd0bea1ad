"""The MPS correctness gate's logic on CPU tensors: the shapes it checks, a right result passing,
a deliberately wrong one refused with a message naming the SM cap, shape, dtype, error and
threshold, and its place in a replica's start (after the MPS preflight, before the engine)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch

from serve_app.config import AppConfig
from serve_app.gpu_gate import (
    DEFAULT_THRESHOLD,
    GemmGateError,
    GemmShape,
    check_gemm,
    gate_command,
    layer_shapes,
    run_gate,
)
from serve_app.mps import MpsNotRunningError
from serve_app.plan import BUILTIN_MODELS, load_model_shape
from serve_app.servers import _EngineServer
from tests.cpu.conftest import ROOT, TINY_MODEL, app_args
from tests.cpu.test_partition import gpu_args

TINY_SHAPES = layer_shapes(load_model_shape(str(TINY_MODEL)), m_values=(1, 16))


def wrong_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What a bad kernel returns for one shape only (16 x 128 x 256): the right product with a
    quarter of its columns zeroed."""
    product = torch.matmul(a, b)
    if a.shape == (16, 128) and b.shape[1] == 256:
        product[:, : product.shape[1] // 4] = 0
    return product


def test_shapes_are_the_layers_of_the_model() -> None:
    shapes = layer_shapes(BUILTIN_MODELS["llama-3.1-8b"], m_values=(1, 256))
    assert shapes == [
        GemmShape("hidden x hidden", 1, 4096, 4096),
        GemmShape("hidden x intermediate", 1, 4096, 14336),
        GemmShape("intermediate x hidden", 1, 14336, 4096),
        GemmShape("hidden x hidden", 256, 4096, 4096),
        GemmShape("hidden x intermediate", 256, 4096, 14336),
        GemmShape("intermediate x hidden", 256, 14336, 4096),
    ]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_right_result_passes(dtype: str) -> None:
    results = run_gate(TINY_SHAPES, dtype, "cpu", sm_percentage=20)
    assert len(results) == len(TINY_SHAPES)
    for result in results:
        # Rounding the product to 16 bits costs ~2^-9 relative; FP32 is exact up to the order.
        assert 0 <= result.rel_error < (1e-5 if dtype == "float32" else 4e-3)
        assert result.device == "cpu" and result.dtype == dtype


def test_a_wrong_result_is_refused_with_everything_named() -> None:
    # Zeroing a quarter of C's columns leaves error sqrt(1/4) = 0.5 in expectation.
    bad_shape = GemmShape("hidden x intermediate", 16, 128, 256)
    assert bad_shape in TINY_SHAPES
    result = check_gemm(bad_shape, "bfloat16", "cpu", matmul=wrong_matmul)
    assert result.rel_error == pytest.approx(0.5, abs=0.1)
    with pytest.raises(GemmGateError) as refused:
        run_gate(TINY_SHAPES, "bfloat16", "cpu", sm_percentage=20, matmul=wrong_matmul)
    message = str(refused.value)
    for fragment in ("SM cap 20%", "a bfloat16 GEMM hidden x intermediate M=16 x K=128 x N=256 "
                     "on cpu has relative Frobenius error 0.", f"threshold {DEFAULT_THRESHOLD:g}",
                     f"(1 of {len(TINY_SHAPES)} products over it: 16x128x256)",
                     "mps.gemm_check: false", "25, 30, 50 and 100 passed"):
        assert fragment in message, f"{fragment!r} not in: {message}"
    # Every product's figures stay with the refusal (a scan of caps reads them from the report).
    assert [r.shape for r in refused.value.results] == list(TINY_SHAPES)
    assert [r.shape for r in refused.value.results if r.rel_error > DEFAULT_THRESHOLD] == [
        bad_shape]


def test_nan_results_are_refused() -> None:
    with pytest.raises(GemmGateError, match="error nan"):
        run_gate(TINY_SHAPES[:1], "bfloat16", "cpu", sm_percentage=80,
                 matmul=lambda a, b: torch.full((a.shape[0], b.shape[1]), float("nan")))


def test_cli_passes_on_cpu_tensors_with_the_models_dtype() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serve_app.gpu_gate", "--model", str(TINY_MODEL), "--device",
         "cpu", "--m", "1,8", "--sm-percentage", "80", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["sm_percentage"] == 80
    assert {r["dtype"] for r in report["results"]} == {"bfloat16"}  # tiny-llama's config.json
    assert [r["shape"]["m"] for r in report["results"]] == [1, 1, 1, 8, 8, 8]


def test_only_capped_gpu_replicas_are_gated() -> None:
    cfg = AppConfig.model_validate(gpu_args())
    command = gate_command(cfg, "decode")
    assert command is not None
    assert command[command.index("--sm-percentage") + 1] == "20"
    assert command[command.index("--device") + 1] == "cuda"
    assert gate_command(AppConfig.model_validate(gpu_args(mps={"gemm_check": False})), "decode") \
        is None
    uncapped = AppConfig.model_validate(gpu_args(decode={"sm_percentage": None}))
    assert gate_command(uncapped, "decode") is None
    assert gate_command(AppConfig.model_validate(app_args()), "prefill") is None


class _Replica(_EngineServer):
    role = "prefill"


def test_replica_start_runs_the_preflight_first() -> None:
    replica = _Replica()
    with pytest.raises(MpsNotRunningError):
        asyncio.run(replica._start_engine(AppConfig.model_validate(gpu_args())))
    assert not hasattr(replica, "engine")


def test_replica_start_runs_the_gate_before_the_engine() -> None:
    # No MPS daemon here (allowed, with a warning), and no CUDA device: the gate's child
    # process refuses, so the engine is never constructed.
    cfg = AppConfig.model_validate(gpu_args(mps={"allow_unpartitioned": True}))
    replica = _Replica()
    with pytest.raises(GemmGateError, match="prefill: MPS correctness gate cannot run: torch "
                       "sees no CUDA device"):
        asyncio.run(replica._start_engine(cfg))
    assert not hasattr(replica, "engine")
