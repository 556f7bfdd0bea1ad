"""Plots and comparison tables from synthetic results files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from serve_app.bench.__main__ import main
from serve_app.bench.compare import format_comparison, load_summaries, print_comparison
from serve_app.bench.plots import plot_results
from serve_app.bench.records import RequestRecord, load_runs, run_payload, save_json
from serve_app.bench.stats import SLO, find_goodput, summarize

SLO_USED = SLO(ttft_ms=200, tpot_ms=20)


def synthetic_records(rate: float, slowdown: float, seed: int) -> list[RequestRecord]:
    """Latencies that grow with the rate, scaled per system by `slowdown`."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(40):
        ttft = float(rng.gamma(2.0, 0.02 * rate * slowdown))
        tpot = float(rng.gamma(4.0, 0.002 * rate * slowdown))
        records.append(
            RequestRecord(
                f"r{index}",
                start_s=index / rate,
                ttft_s=ttft,
                itl_s=[tpot] * 15,
                e2e_s=ttft + 15 * tpot,
                prompt_tokens=64,
                output_tokens=16,
            )
        )
    records.append(RequestRecord("failed", start_s=0.0, e2e_s=0.01, error="HTTP 503: busy"))
    return records


def write_sweep(path: Path, label: str, slowdown: float) -> None:
    runs = []
    pairs = []
    for seed, rate in enumerate((1.0, 2.0, 4.0, 8.0)):
        records = synthetic_records(rate, slowdown, seed)
        pairs.append((rate, records))
        runs.append(run_payload(rate, 40 / rate, summarize(records, 40 / rate, SLO_USED), records))
    goodput = find_goodput(pairs, SLO_USED).to_json()
    save_json(path, {"kind": "sweep", "label": label, "goodput": goodput, "runs": runs})


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "unified.json", tmp_path / "pd.json"]
    write_sweep(paths[0], "unified", slowdown=1.0)
    write_sweep(paths[1], "pd", slowdown=0.5)
    return paths


def test_plots_are_written(results: list[Path], tmp_path: Path) -> None:
    written = plot_results(results, tmp_path / "plots")
    names = sorted(path.name for path in written)
    assert names == [
        "latency_cdf.png",
        "slo_attainment_vs_rate.png",
        "tpot_vs_rate.png",
        "ttft_vs_rate.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


def test_plot_command_with_slo_override(results: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cli_plots"
    argv = ["plot", *map(str, results), "--out", str(out), "--slo-ttft-ms", "50", "--cdf-rate", "2"]
    assert main(argv) == 0
    assert len(list(out.glob("*.png"))) == 4


def test_comparison_table_has_ratios(results: list[Path]) -> None:
    summaries = load_summaries(results, rate=4.0)
    assert list(summaries) == ["unified", "pd"]
    buffer = io.StringIO()
    text = print_comparison(summaries, baseline="unified", file=buffer)
    assert buffer.getvalue() == text + "\n"
    header, *rows = text.splitlines()
    assert header.split() == ["metric", "unified", "pd", "pd/unified"]
    ttft_p50 = next(row for row in rows if row.startswith("TTFT p50"))
    unified, pd_value = summaries["unified"]["ttft_ms"]["p50"], summaries["pd"]["ttft_ms"]["p50"]
    assert ttft_p50.split()[-1] == f"{pd_value / unified:.2f}x"
    assert any(row.startswith("goodput") for row in rows)
    with pytest.raises(ValueError):
        format_comparison(summaries, baseline="missing")


def test_compare_command_defaults_to_first_label(results: list[Path], capsys) -> None:
    assert main(["compare", *map(str, results)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["metric", "unified", "pd", "pd/unified"]


def test_sweep_file_round_trip(results: list[Path]) -> None:
    runs = load_runs(results[0])
    assert [run.request_rate for run in runs] == [1.0, 2.0, 4.0, 8.0]
    assert all(run.label == "unified" for run in runs)
    assert runs[0].records[-1].error == "HTTP 503: busy"
    assert runs[0].summary["num_errors"] == 1
