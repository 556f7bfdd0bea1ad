"""The side-by-side's plan: which configs, model and launchers each system gets, and the order of
rounds. Starting the systems is the benchmark's job (`bench/results/`), not a test's."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve_app.bench.side_by_side import PRESETS, ROOT, prepare_setup, round_order, systems


def test_rounds_rotate_the_order_of_systems() -> None:
    labels = ["unified", "pd", "ray-pd"]
    assert [round_order(labels, n) for n in (1, 2, 3, 4)] == [
        labels, ["pd", "ray-pd", "unified"], ["ray-pd", "unified", "pd"], labels]


def test_cpu_preset_serves_the_tiny_model_everywhere(tmp_path: Path) -> None:
    setup = prepare_setup(PRESETS["cpu"], None, tmp_path)
    assert setup.model_source == str(ROOT / "models" / "tiny-llama")
    assert setup.model_name == "tiny-llama"
    catalog = systems(setup)
    assert catalog["pd"].argv == ["scripts/serve-local", str(ROOT / "configs/local-cpu.yaml")]
    assert catalog["unified"].argv[-1] == str(ROOT / "configs/unified-cpu.yaml")
    for label in ("ray-pd", "direct"):
        argv = catalog[label].argv
        assert argv[argv.index("--config") + 1] == str(setup.pd_config)
        assert argv[argv.index("--model") + 1] == setup.model_source
        assert argv[argv.index("--served-model-name") + 1] == "tiny-llama"
    assert not (tmp_path / "configs").exists()


def test_gpu_preset_with_a_local_model_copies_the_configs(tmp_path: Path) -> None:
    """On an offline GPU box the weights are a local folder: every system must serve it."""
    weights = tmp_path / "Llama-3.1-8B-Instruct"
    weights.mkdir()
    setup = prepare_setup(PRESETS["h100-llama3.1-8b"], str(weights), tmp_path / "out")
    assert setup.model_source == setup.model_name == str(weights)
    for config in (setup.pd_config, setup.unified_config):
        assert config.parent == tmp_path / "out" / "configs"
        args = yaml.safe_load(config.read_text())["applications"][0]["args"]
        assert args["device"] == "cuda" and args["model"]["source"] == str(weights)
    pd_args = yaml.safe_load(setup.pd_config.read_text())["applications"][0]["args"]
    assert pd_args["prefill"]["sm_percentage"] == 80  # the rest of the preset is kept
    assert systems(setup)["ray-pd"].argv[-1] == str(setup.pd_config)
