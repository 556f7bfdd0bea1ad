"""Every serve config in `configs/` is deployable as written: Ray's schema and ours accept it, and
each GPU preset's memory split fits its card by the planner's arithmetic (the same numbers its
YAML comments quote)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppConfig
from serve_app.plan import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_OVERHEAD_GIB,
    GIB,
    GPU_PRESETS_MIB,
    MIB,
    SplitPlan,
    engine_problem,
    load_model_shape,
    plan_engine,
    plan_split,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
# A GPU preset's file name starts with its card; the card's memory is the planner's preset.
CARDS = {"h100": "h100-80gb", "h200": "h200-141gb", "a100": "a100-80gb"}
# Each unified baseline and the disaggregated config it is compared with.
BASELINES = {
    "unified-cpu.yaml": "local-cpu.yaml",
    "h100-llama3.1-8b-unified.yaml": "h100-llama3.1-8b-pd.yaml",
}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def app_config(path: Path) -> AppConfig:
    (application,) = load(path)["applications"]
    return AppConfig.model_validate(application["args"])


def gpu_presets() -> list[Path]:
    return [path for path in PRESETS if app_config(path).device == "cuda"]


def card_memory_bytes(path: Path) -> int:
    card = CARDS[path.name.split("-")[0]]
    return GPU_PRESETS_MIB[card] * MIB


def plan_kwargs(cfg: AppConfig) -> dict[str, Any]:
    engine_kwargs = cfg.decode.engine_kwargs
    return {
        "kv_cache_dtype": engine_kwargs.get("kv_cache_dtype", "auto"),
        "context_len": cfg.model.max_model_len,
        "block_size": engine_kwargs.get("block_size", DEFAULT_BLOCK_SIZE),
    }


def test_configs_dir_has_the_presets() -> None:
    names = {path.name for path in PRESETS}
    assert {"local-cpu.yaml", *BASELINES, *BASELINES.values()} <= names
    assert len(gpu_presets()) >= 2


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_passes_rays_schema(path: Path) -> None:
    schema = ServeDeploySchema.model_validate(load(path))
    assert schema.http_options.host == "127.0.0.1"
    assert schema.http_options.port == 8000
    (application,) = schema.applications
    assert application.name == "pd"
    assert application.import_path == "serve_app.app:build_app"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_passes_our_schema(path: Path) -> None:
    cfg = app_config(path)
    assert cfg.prefill.nixl_side_channel_port != cfg.decode.nixl_side_channel_port
    if cfg.device == "cpu":
        assert cfg.model.source == "models/tiny-llama"


@pytest.mark.parametrize("path", gpu_presets(), ids=lambda p: p.name)
def test_gpu_preset_memory_split_fits_its_card(path: Path) -> None:
    cfg = app_config(path)
    model = load_model_shape(cfg.model.source)
    assert model.weight_bytes / GIB == pytest.approx(15, abs=0.1)
    gpu_memory_bytes = card_memory_bytes(path)
    text = path.read_text()
    if cfg.is_unified:
        engine = plan_engine(
            "decode",
            cfg.decode.gpu_memory_utilization,
            model,
            gpu_memory_bytes,
            int(DEFAULT_OVERHEAD_GIB * GIB),
            model.kv_bytes_per_token(),
            cfg.model.max_model_len,
        )
        assert engine_problem(engine, gpu_memory_bytes, cfg.model.max_model_len) is None
        assert cfg.decode.gpu_memory_utilization <= 1 - cfg.memory_headroom
        engines = [engine]
    else:
        plan = plan_split(
            model,
            gpu_memory_bytes,
            cfg.prefill.gpu_memory_utilization,
            cfg.decode.gpu_memory_utilization,
            max_total_share=1 - cfg.memory_headroom,
            **plan_kwargs(cfg),
        )
        assert plan.free_bytes > 4 * GIB
        assert_comments_quote_split(text, plan)
        engines = [plan.prefill, plan.decode]
    for engine in engines:
        # Room for a batch of full-length sequences, not just one.
        assert engine.max_num_seqs >= 8
        assert f"{engine.kv_pool_bytes / GIB:.2f} GiB KV pool" in text
        assert f"{engine.num_kv_tokens:,} tokens" in text
        assert f"= {engine.max_num_seqs} " in text
    assert f"{model.weight_bytes / GIB:.2f}" in text


def assert_comments_quote_split(text: str, plan: SplitPlan) -> None:
    """The YAML comments carry the planner's own figures, so they cannot drift from the numbers."""
    assert f"{plan.kv_bytes_per_token:,} B" in text
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert f"{plan.handoff_bytes_per_request / MIB:.1f} MiB" in text
    assert f"{plan.total_used_bytes / GIB:.2f} GiB" in text
    assert f"{plan.free_bytes / GIB:.2f} GiB free" in text


def test_pd_preset_matches_the_brief() -> None:
    cfg = app_config(CONFIGS / "h100-llama3.1-8b-pd.yaml")
    assert (cfg.prefill.num_gpus, cfg.decode.num_gpus) == (0.8, 0.2)
    assert (cfg.prefill.sm_percentage, cfg.decode.sm_percentage) == (80, 20)
    assert cfg.kv_transfer.ucx_tls == "auto"
    assert cfg.kv_transfer.progress_delay_us is None
    assert cfg.start_order == "prefill_first"


@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_unified_baseline_serves_what_its_pd_config_serves(baseline: str) -> None:
    unified = app_config(CONFIGS / baseline)
    pd = app_config(CONFIGS / BASELINES[baseline])
    assert unified.is_unified and not pd.is_unified
    assert unified.device == pd.device
    assert unified.model == pd.model
    assert unified.decode.num_gpus == 1.0
    assert unified.prefill.num_gpus == 0.0
    assert unified.decode.engine_kwargs["enable_chunked_prefill"] is True
    # behind the same Router: compared side by side, both shed at the same load
    assert unified.router.admission == pd.router.admission
