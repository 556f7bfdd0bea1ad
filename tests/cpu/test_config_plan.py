"""The memory planner guards every GPU build: `build_app` (what `serve run` / `serve deploy` call)
refuses a `device: cuda` config whose split cannot fit, with the planner's arithmetic in the
error; the shipped presets pass; CPU configs and configs without a card are not refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.app import build_app
from serve_app.config import AppConfig
from serve_app.config_plan import check_app_memory
from serve_app.plan import GIB, MIB
from tests.cpu.conftest import app_args
from tests.cpu.test_partition import preset_args
from tests.cpu.test_plan import LLAMA_8B_HF_CONFIG, LLAMA_8B_KV_PER_TOKEN, LLAMA_8B_PARAMS

H100_BYTES = 81559 * MIB
WEIGHTS_GIB = f"{LLAMA_8B_PARAMS * 2 / GIB:.2f} GiB"  # 14.96 GiB


def pd_args(**overrides: Any) -> dict[str, Any]:
    return preset_args("h100-llama3.1-8b-pd.yaml", **overrides)


def refusal(args: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as error:
        build_app(args)
    return str(error.value)


@pytest.mark.parametrize("preset", ["h100-llama3.1-8b-pd.yaml", "h100-llama3.1-8b-unified.yaml"])
def test_shipped_h100_presets_pass_the_plan(preset: str) -> None:
    cfg = AppConfig.model_validate(preset_args(preset))
    assert cfg.gpu == "h100-80gb"
    plan = check_app_memory(cfg)
    assert plan is not None and plan.gpu_memory_bytes == H100_BYTES
    assert [engine.role for engine in plan.engines] == list(cfg.engine_phases)
    for engine in plan.engines:
        assert engine.num_kv_tokens // plan.context_len >= 8
    build_app(preset_args(preset))


def test_decode_share_too_small_for_its_weights_is_refused_at_build() -> None:
    message = refusal(pd_args(decode={"gpu_memory_utilization": 0.2}))
    # 0.2 * 79.65 GiB = 15.93 GiB - 14.96 weights - 2.00 overhead = -1.03 GiB: no KV pool at all.
    for fragment in (
        "does not fit on gpu h100-80gb (79.65 GiB",
        f"{LLAMA_8B_PARAMS:,} params x 2 B (bfloat16) = {WEIGHTS_GIB} per engine",
        f"KV {LLAMA_8B_KV_PER_TOKEN:,} B/token (2 x 32 layers x 8 KV heads x 128 head dim x 2 B)",
        "prefill.gpu_memory_utilization 0.35 x 79.65 GiB = 27.88 GiB - 14.96 GiB weights - "
        "2.00 GiB overhead = 10.92 GiB KV pool = 89,440 tokens",
        "decode.gpu_memory_utilization 0.2 x 79.65 GiB = 15.93 GiB",
        "= -1.03 GiB KV pool = 0 tokens",
        "refused: decode: KV pool -1.03 GiB holds 0 tokens, less than one 8,192-token sequence "
        "(8,192 x 131,072 B = 1.00 GiB): 1.00 GiB missing; "
        "raise decode.gpu_memory_utilization to at least 0.23",
    ):
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert "refused: prefill" not in message


def test_pool_shorter_than_max_model_len_is_refused_at_build() -> None:
    # Unified baseline, fixed 2 GiB pool = 16,384 tokens, but a 131,072-token context: 16 GiB.
    args = preset_args(
        "h100-llama3.1-8b-unified.yaml",
        model={"max_model_len": 131072},
        decode={"gpu_memory_utilization": None, "kv_cache_memory_bytes": 2 * GIB},
    )
    message = refusal(args)
    for fragment in (
        "context: 131,072 tokens (model.max_model_len)",
        f"{WEIGHTS_GIB} per engine",
        "decode.kv_cache_memory_bytes 2,147,483,648 B = 2.00 GiB KV pool = 16,384 tokens",
        "refused: decode: KV pool 2.00 GiB holds 16,384 tokens, less than one 131,072-token "
        "sequence (131,072 x 131,072 B = 16.00 GiB): 14.00 GiB missing",
        f"raise decode.kv_cache_memory_bytes to at least {16 * GIB:,}",
        "or lower model.max_model_len to at most 16,384",
    ):
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_unset_shares_mean_vllms_default_and_two_of_them_do_not_fit() -> None:
    unset = {"gpu_memory_utilization": None}
    message = refusal(pd_args(prefill=unset, decode=unset))
    assert "prefill.gpu_memory_utilization 0.92 (unset: vLLM's default) x 79.65 GiB" in message
    # 2 * int(0.92 * 79.65 GiB) = 146.55 GiB against 0.95 * 79.65 = 75.67 GiB.
    assert "the engines together take 73.28 GiB + 73.28 GiB = 146.55 GiB, more than 0.95 " \
        "(1 - memory_headroom) of the card = 75.67 GiB: 70.89 GiB missing; lower " \
        "prefill.gpu_memory_utilization or decode.gpu_memory_utilization" in message


def test_model_max_len_unset_uses_the_models_own(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({**LLAMA_8B_HF_CONFIG, "max_position_embeddings": 131072})
    )
    message = refusal(pd_args(model={"source": str(tmp_path), "max_model_len": None}))
    assert "context: 131,072 tokens (the model's max_position_embeddings" in message
    assert "refused: prefill: KV pool 10.92 GiB holds 89,440 tokens" in message


def test_a_card_by_size_and_a_local_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_HF_CONFIG))
    args = pd_args(gpu=None, gpu_memory_gib=141.0, model={"source": str(tmp_path)})
    plan = check_app_memory(AppConfig.model_validate(args))
    assert plan is not None and plan.gpu_memory_bytes == 141 * GIB
    assert plan.model.num_params == LLAMA_8B_PARAMS


def test_without_a_card_the_plan_is_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    args = pd_args(gpu=None, decode={"gpu_memory_utilization": 0.2})
    with caplog.at_level(logging.WARNING, logger="serve_app.config_plan"):
        cfg = AppConfig.model_validate(args)
    assert check_app_memory(cfg) is None
    assert "memory plan skipped: set `gpu:` (a100-80gb, h100-80gb, h200-141gb" in caplog.text
    assert "or `gpu_memory_gib:`" in caplog.text


def test_unknown_model_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    args = pd_args(model={"source": "nobody/no-such-model-here"})
    with caplog.at_level(logging.WARNING, logger="serve_app.config_plan"):
        assert check_app_memory(AppConfig.model_validate(args)) is None
    assert "no config.json for nobody/no-such-model-here" in caplog.text


def test_cpu_configs_are_not_planned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="serve_app.config_plan"):
        assert check_app_memory(AppConfig.model_validate(app_args())) is None
    assert "memory plan" not in caplog.text


def test_gpu_field_is_validated() -> None:
    with pytest.raises(ValidationError, match="unknown gpu 'h100'; allowed: a100-80gb, h100-80gb"):
        AppConfig.model_validate(pd_args(gpu="h100"))
    with pytest.raises(ValidationError, match="gpu and gpu_memory_gib are exclusive"):
        AppConfig.model_validate(pd_args(gpu_memory_gib=80.0))
