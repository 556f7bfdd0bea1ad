"""Plots and comparison tables from synthetic results files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from serve_app.bench.__main__ import main
from serve_app.bench.compare import format_comparison, load_summaries, print_comparison
from serve_app.bench.plots import plot_results
from serve_app.bench.pool import pool_results
from serve_app.bench.records import RequestRecord, load_goodput, load_runs, run_payload, save_json
from serve_app.bench.stats import SLO, find_goodput, summarize
from serve_app.bench.verdict import Figures, load_figures, rounds_table, target_lines

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
    config = {"slo": {"ttft_ms": SLO_USED.ttft_ms, "tpot_ms": SLO_USED.tpot_ms}}
    save_json(path, {"kind": "sweep", "label": label, "config": config, "goodput": goodput,
                     "runs": runs})


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


def write_run(path: Path, ttfts_s: list[float], duration_s: float) -> None:
    records = [
        RequestRecord(f"{path.stem}-{i}", start_s=i, ttft_s=t, itl_s=[0.01], e2e_s=t + 0.01,
                      output_tokens=2)
        for i, t in enumerate(ttfts_s)
    ]
    summary = summarize(records, duration_s, SLO_USED)
    config = {"slo": {"ttft_ms": SLO_USED.ttft_ms, "tpot_ms": SLO_USED.tpot_ms}}
    save_json(path, {"kind": "run", "label": "pd", "config": config,
                     **run_payload(float("inf"), duration_s, summary, records)})


def test_pooled_rounds_count_every_request_once(tmp_path: Path) -> None:
    write_run(tmp_path / "r1.json", [0.1, 0.3], duration_s=2.0)
    write_run(tmp_path / "r2.json", [0.2, 0.4, 0.5], duration_s=3.0)
    pooled_path = tmp_path / "pooled.json"
    assert main(["pool", str(tmp_path / "r1.json"), str(tmp_path / "r2.json"),
                 "--save", str(pooled_path)]) == 0
    (run,) = load_runs(pooled_path)
    assert run.label == "pd" and len(run.records) == 5
    assert run.duration_s == 5.0
    assert run.summary["request_throughput_rps"] == 1.0  # 5 requests over 2 s + 3 s
    assert run.summary["ttft_ms"]["p50"] == pytest.approx(300.0)  # median of all five
    assert run.summary["slo_attainment"] == pytest.approx(2 / 5)  # TTFT SLO 200 ms
    rounds = json.loads(pooled_path.read_text())["rounds"]
    assert [r["summary"]["num_requests"] for r in rounds] == [2, 3]


def test_pooled_sweeps_search_goodput_again(tmp_path: Path) -> None:
    """A rate that passes in one round and misses in the other is judged on all its records."""
    fast, slow = tmp_path / "fast.json", tmp_path / "slow.json"
    write_sweep(fast, "pd", slowdown=0.5)
    write_sweep(slow, "pd", slowdown=1.0)
    pooled = pool_results([fast, slow])
    assert [run["request_rate"] for run in pooled["runs"]] == [1.0, 2.0, 4.0, 8.0]
    assert all(run["summary"]["num_requests"] == 82 for run in pooled["runs"])
    by_round = [load_goodput(fast), load_goodput(slow)]
    pairs = [(run["request_rate"], [RequestRecord.from_dict(r) for r in run["records"]])
             for run in pooled["runs"]]
    assert pooled["goodput"] == find_goodput(pairs, SLO_USED).to_json()
    assert by_round == [2.0, 1.0]  # rate 2 passes in the fast round only
    attainment = dict(map(tuple, pooled["goodput"]["attainment_by_rate"]))
    assert attainment[2.0] < 0.9 and pooled["goodput"]["goodput_rps"] == 1.0
    assert [r["goodput"]["goodput_rps"] for r in pooled["rounds"]] == by_round


def test_pool_refuses_mixed_labels(tmp_path: Path, results: list[Path]) -> None:
    with pytest.raises(ValueError, match="one label"):
        pool_results(results)


def figures(ttft: float, tpot: float, c8: float, errors: int = 0) -> Figures:
    return Figures(ttft_p50_ms=float(ttft), tpot_p50_ms=float(tpot),
                   e2e_p50_ms=float(ttft) + 31 * float(tpot), c8_rps=float(c8), goodput_rps=4.0,
                   num_requests=100, num_errors=errors)


def test_targets_checked_against_ray_pd() -> None:
    pooled = {"unified": figures(80, 4.0, 10.0), "pd": figures(100, 3.6, 7.0),
              "ray-pd": figures(150, 4.4, 6.9)}
    lines = target_lines(pooled, "unified")
    assert len(lines) == 4 and all(line.startswith("- [met]") for line in lines), lines
    assert "pd 20.00 ms, ray-pd 70.00 ms, ratio 0.29" in lines[0]
    worse = {**pooled, "pd": figures(120, 4.5, 6.0, errors=1)}
    assert [line.split("]")[0] for line in target_lines(worse, "unified")] == ["- [NOT met"] * 4
    assert target_lines({"unified": pooled["unified"], "pd": pooled["pd"]}, "unified") == []


def test_rounds_table_shows_every_round_and_the_pooled_figures() -> None:
    per_round = {"unified": [figures(80, 4, 10), figures(90, 4, 9), figures(85, 4, 9.5)],
                 "pd": [figures(100, 3, 7), figures(120, 3, 6), figures(110, 3, 6.5)],
                 "ray-pd": [figures(150, 4, 7), figures(160, 4, 6), figures(155, 4, 6.5)]}
    table = rounds_table(per_round, "unified", ["round 1", "round 2", "pooled"])
    lines = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    assert lines["pd added TTFT p50 c1 (ms)"][-3:] == ["20.00", "30.00", "25.00"]
    assert lines["pd/ray-pd added TTFT"][-3:] == ["0.29", "0.43", "0.36"]
    with pytest.raises(ValueError, match="one Figures per column"):
        rounds_table(per_round, "unified", ["round 1", "pooled"])


def test_figures_of_one_system_from_its_three_files(tmp_path: Path) -> None:
    write_run(tmp_path / "c1.json", [0.1, 0.3, 0.2], duration_s=3.0)
    write_run(tmp_path / "c8.json", [0.5, 0.6], duration_s=0.5)
    write_sweep(tmp_path / "sweep.json", "pd", slowdown=0.5)
    got = load_figures({kind: tmp_path / f"{kind}.json" for kind in ("c1", "c8", "sweep")})
    assert got.ttft_p50_ms == pytest.approx(200.0)
    assert got.e2e_p50_ms == pytest.approx(210.0)
    assert got.c8_rps == pytest.approx(4.0)  # 2 requests in 0.5 s
    assert got.goodput_rps == load_goodput(tmp_path / "sweep.json")
    assert (got.num_requests, got.num_errors) == (3 + 2 + 4 * 41, 4)  # one failure per rate
