"""The side-by-side's plan: which configs, model and launchers each system gets, and the order of
rounds. Starting the systems is the benchmark's job (`bench/results/`), not a test's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app.bench.cli import build_parser as bench_parser
from serve_app.bench.cli import check_args
from serve_app.bench.side_by_side import (
    PRESETS,
    ROOT,
    extra_systems,
    headline,
    parse_plan,
    pool_rounds,
    prepare_setup,
    report,
    round_order,
    systems,
    write_summary,
)
from serve_app.bench.side_by_side_workloads import describe_workload, round_path, workload_steps
from serve_app.bench.verdict import MIXED_KINDS


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


MIX = "chat:0.8:64:128,doc:0.2:1700:8"


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_mixed_workload_commands_and_an_extra_system(tmp_path: Path) -> None:
    plan = parse_plan(["--preset", "cpu", "--out", str(tmp_path), "--mix", MIX,
                       "--class-slo", "doc:2000:-", "--rates", "3,6,9",
                       "--extra-system", "pd-nocond=configs/local-cpu.yaml"])
    assert plan.labels == ["unified", "pd", "ray-pd", "pd-nocond"]
    assert plan.kinds == MIXED_KINDS
    assert plan.catalog["pd-nocond"].argv == [
        "scripts/serve-local", str(ROOT / "configs/local-cpu.yaml")]
    assert plan.catalog["pd-nocond"].argv[0] == plan.catalog["pd"].argv[0]  # started like pd
    steps = workload_steps("pd-nocond", plan.opts, "http://127.0.0.1:8000",
                           plan.setup.model_name, plan.setup.model_source, 2)
    assert [step.kind for step in steps] == [None, "mixed", "mixed-sweep"]
    warmup, mixed, sweep = (step.args for step in steps)
    for args in (warmup, mixed, sweep):
        assert (flag(args, "--mix"), flag(args, "--class-slo")) == (MIX, "doc:2000:-")
        assert flag(args, "--tokenizer") == str(ROOT / "models" / "tiny-llama")
        assert "--input-len" not in args and "--concurrency" not in args
        parsed = bench_parser().parse_args(args)  # the load generator accepts every command
        check_args(parsed)
    assert warmup[0] == "run" and "--save" not in warmup
    assert (flag(warmup, "--num-requests"), flag(warmup, "--request-rate")) == ("60", "6.0")
    assert flag(warmup, "--seed") == "1"  # not the measured prompts
    assert (flag(mixed, "--num-requests"), flag(mixed, "--request-rate")) == ("200", "6.0")
    assert flag(mixed, "--save") == str(tmp_path / "rounds" / "pd-nocond-mixed.r2.json.gz")
    assert sweep[0] == "sweep" and flag(sweep, "--rates") == "3,6,9"
    assert flag(sweep, "--save") == str(tmp_path / "rounds" / "pd-nocond-mixed-sweep.r2.json.gz")
    text = describe_workload(plan.opts)
    assert "`chat` 80% (64-token prompts, 128 output tokens)" in text
    assert "60 warm-up requests (not counted), then 200 at Poisson 6 req/s" in text


def test_uniform_workloads_stay_the_default(tmp_path: Path) -> None:
    plan = parse_plan(["--preset", "cpu", "--out", str(tmp_path), "--systems", "unified,pd"])
    assert plan.labels == ["unified", "pd"] and plan.kinds == ("c1", "c8", "sweep")
    steps = workload_steps("pd", plan.opts, "http://127.0.0.1:8000", "tiny-llama", "tok", 1)
    assert [step.kind for step in steps] == [None, "c1", "c8", "sweep"]
    assert [flag(step.args, "--input-len") for step in steps] == ["256"] * 4
    assert [flag(steps[1].args, "--concurrency"), flag(steps[2].args, "--concurrency")] == [
        "1", "8"]
    assert "--mix" not in steps[3].args


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mix", "chat:0.8:64:128,doc:0.2:0:8"], "input_len must be an integer >= 1, got '0'"),
        (["--class-slo", "doc:2000:-"], "--class-slo needs --mix"),
        (["--mix", MIX, "--class-slo", "img:2000:-"], "--class-slo names img, not a class"),
        (["--mix", MIX, "--num-mixed", "0"], "--num-mixed must be at least 1"),
        (["--extra-system", "configs/local-cpu.yaml"], "must look like LABEL=CONFIG"),
        (["--extra-system", "pd=configs/local-cpu.yaml"], "label 'pd' is already taken"),
        (["--extra-system", "a=configs/local-cpu.yaml", "--extra-system",
          "a=configs/unified-cpu.yaml"], "label 'a' is already taken"),
        (["--extra-system", "x=configs/missing.yaml"], "missing.yaml is not a valid serve config"),
    ],
)
def test_bad_side_by_side_options_exit_with_a_clear_error(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_plan(["--preset", "cpu", "--out", str(tmp_path), *extra])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_extra_system_on_another_port_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs/local-cpu.yaml").read_text())
    data["http_options"]["port"] = 8100
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="serves on port 8100; the side-by-side talks to 8000"):
        extra_systems([f"other={tmp_path / 'other.yaml'}"], None, tmp_path, ["pd"])


def test_mixed_summary_from_round_files(tmp_path: Path) -> None:
    """Pooling, headline, tables, plots and README of a mixed side-by-side, on synthetic rounds."""
    from tests.cpu.test_bench_reports import write_mixed

    plan = parse_plan(["--preset", "cpu", "--out", str(tmp_path), "--mix", MIX, "--rounds", "2",
                       "--extra-system", "pd-nocond=configs/local-cpu.yaml"])
    (tmp_path / "rounds").mkdir()
    slowdowns = {"unified": 1.0, "pd": 0.5, "ray-pd": 2.0, "pd-nocond": 1.5}
    for label, slowdown in slowdowns.items():
        for round_no in (1, 2):
            for kind, shape in (("mixed", "run"), ("mixed-sweep", "sweep")):
                path = round_path(tmp_path, label, kind, round_no)
                write_mixed(path, shape, label, slowdown * round_no)
    labels = plan.labels
    pool_rounds(labels, tmp_path, 2, plan.kinds)
    table, verdicts = headline(labels, tmp_path, 2, plan.kinds, ["pd", "pd-nocond"])
    assert "pd-nocond doc TPOT p99 (ms)" in table
    assert len(verdicts) == 8 and verdicts[0].startswith("- [met] pd: TTFT P99")
    sections = report(labels, tmp_path, {}, ["--mix", MIX], plan.kinds)
    assert [kind for kind, _ in sections] == ["mixed", "mixed-sweep"]
    assert "doc TTFT p99 (ms)" in sections[0][1]
    assert (tmp_path / "plots" / "ttft_vs_rate_doc.png").exists()
    write_summary(plan.opts, plan.setup, sections, ["--mix", MIX], (table, verdicts),
                  plan.catalog, labels)
    summary = (tmp_path / "README.md").read_text()
    assert "## Mixed workload at 6 req/s (overall and per class)" in summary
    assert "- `pd-nocond`: this app served from `configs/local-cpu.yaml`" in summary
    assert "`*-mixed.json.gz`, `*-mixed-sweep.json.gz`" in summary
