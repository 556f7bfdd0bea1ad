"""Plots and comparison tables from synthetic results files."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest

from serve_app.bench.__main__ import main
from serve_app.bench.compare import (
    format_comparison,
    load_summaries,
    metric_rows,
    print_comparison,
)
from serve_app.bench.plots import plot_results
from serve_app.bench.pool import pool_results
from serve_app.bench.records import (
    RequestRecord,
    load_goodput,
    load_runs,
    read_json,
    results_name,
    run_payload,
    save_json,
)
from serve_app.bench.report import format_summary, format_sweep
from serve_app.bench.stats import SLO, find_goodput, slo_attainment, summarize
from serve_app.bench.verdict import (
    Figures,
    MixedFigures,
    load_figures,
    load_mixed_figures,
    mixed_rounds_table,
    mixed_target_lines,
    rounds_table,
    target_lines,
)

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


def test_gzipped_results_read_as_plain_ones(tmp_path: Path) -> None:
    """A `.gz` name is written gzipped (the same bytes each time); every reader takes it, and a
    `.json` name finds its `.json.gz` where only that exists (the committed results)."""
    write_run(tmp_path / "r1.json.gz", [0.1, 0.3], duration_s=2.0)
    raw = (tmp_path / "r1.json.gz").read_bytes()
    assert gzip.decompress(raw).startswith(b"{")
    write_run(tmp_path / "r1.json.gz", [0.1, 0.3], duration_s=2.0)
    assert (tmp_path / "r1.json.gz").read_bytes() == raw
    write_run(tmp_path / "r2.json", [0.2, 0.4, 0.5], duration_s=3.0)
    assert main(["pool", str(tmp_path / "r1.json"), str(tmp_path / "r2.json"),
                 "--save", str(tmp_path / "pooled.json.gz")]) == 0
    (run,) = load_runs(tmp_path / "pooled.json")
    assert len(run.records) == 5 and run.duration_s == 5.0
    assert read_json(tmp_path / "pooled.json.gz") == read_json(tmp_path / "pooled.json")
    assert results_name(tmp_path / "pd-mixed.json.gz") == "pd-mixed"
    assert results_name("pd-mixed.json") == "pd-mixed"
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


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


# mixed workloads ------------------------------------------------------------------------------

MIXED_SLO = SLO(ttft_ms=200, tpot_ms=20, per_class={"doc": SLO(ttft_ms=800)})


def mixed_records(rate: float, slowdown: float, seed: int) -> list[RequestRecord]:
    """Chats (short prompts, long answers) and docs (long prompts, short answers)."""
    records = synthetic_records(rate, slowdown, seed)[:-1]
    for index, record in enumerate(records):
        record.class_name = "doc" if index % 5 == 0 else "chat"
        if record.class_name == "doc":
            record.ttft_s *= 3
            record.e2e_s = record.ttft_s + 3 * record.itl_s[0]
            record.itl_s, record.output_tokens = record.itl_s[:3], 4
    return records


def write_mixed(path: Path, kind: str, label: str, slowdown: float) -> None:
    config = {"slo": MIXED_SLO.to_json()}
    if kind == "run":
        records = mixed_records(6.0, slowdown, 0)
        payload = run_payload(6.0, 10.0, summarize(records, 10.0, MIXED_SLO), records)
        save_json(path, {"kind": "run", "label": label, "config": config, **payload})
        return
    runs, pairs = [], []
    for seed, rate in enumerate((1.0, 2.0, 4.0, 8.0)):
        records = mixed_records(rate, slowdown, seed)
        pairs.append((rate, records))
        runs.append(run_payload(rate, 40 / rate, summarize(records, 40 / rate, MIXED_SLO), records))
    save_json(path, {"kind": "sweep", "label": label, "config": config, "runs": runs,
                     "goodput": find_goodput(pairs, MIXED_SLO).to_json()})


def test_mixed_results_report_compare_and_plot_per_class(tmp_path: Path) -> None:
    paths = [tmp_path / "unified.json", tmp_path / "pd.json"]
    write_mixed(paths[0], "sweep", "unified", slowdown=1.0)
    write_mixed(paths[1], "sweep", "pd", slowdown=0.5)
    (run,) = [r for r in load_runs(paths[0]) if r.request_rate == 4.0]
    assert {r.class_name for r in run.records} == {"chat", "doc"}
    text = format_summary(run.summary)
    assert "class chat: 32 requests (0 failed)" in text
    assert "class doc: 8 requests (0 failed), 0.80 req/s, SLO TTFT <= 800 ms and TPOT <= 20 ms" in text
    sweep_lines = format_sweep([(4.0, run.summary)], None).splitlines()
    assert sweep_lines[3].split()[:3] == ["rate", "(req/s)", "class"]
    assert [line.split()[1] for line in sweep_lines[4:]] == ["chat", "doc"]
    rows = dict(metric_rows([run.summary]))
    assert rows["doc TTFT p99 (ms)"] == [run.summary["classes"]["doc"]["ttft_ms"]["p99"]]
    assert {"chat TPOT p50 (ms)", "chat ITL p90 (ms)", "doc SLO attainment"} <= set(rows)
    written = {path.name for path in plot_results(paths, tmp_path / "plots")}
    for suffix in ("", "_chat", "_doc"):
        assert {f"latency_cdf{suffix}.png", f"ttft_vs_rate{suffix}.png",
                f"tpot_vs_rate{suffix}.png", f"slo_attainment_vs_rate{suffix}.png"} <= written
    assert len(written) == 12


def test_pooled_mixed_rounds_keep_classes_and_class_slos(tmp_path: Path) -> None:
    write_mixed(tmp_path / "r1.json", "sweep", "pd", slowdown=0.5)
    write_mixed(tmp_path / "r2.json", "sweep", "pd", slowdown=1.0)
    pooled = pool_results([tmp_path / "r1.json", tmp_path / "r2.json"])
    summary = pooled["runs"][0]["summary"]
    assert summary["classes"]["doc"]["num_requests"] == 16
    assert summary["classes"]["doc"]["slo"] == {"ttft_ms": 800, "tpot_ms": 20}
    records = [RequestRecord.from_dict(r) for r in pooled["runs"][0]["records"]]
    assert summary["slo_attainment"] == slo_attainment(records, MIXED_SLO)


def mixed_figures(ttft: float, tpot: float, goodput: float | None, errors: int = 0,
                  shed: int = 0):
    ttft, tpot = float(ttft), float(tpot)
    return MixedFigures(ttft_p99_ms=ttft, tpot_p99_ms=tpot, e2e_p50_ms=100.0, e2e_p99_ms=300.0,
                        ttft_p99_by_class={"chat": ttft / 2, "doc": ttft},
                        tpot_p99_by_class={"chat": tpot, "doc": tpot / 2},
                        goodput_rps=goodput, num_requests=360, num_errors=errors,
                        num_shed=shed)


def test_mixed_targets_against_unified_and_ray_pd() -> None:
    pooled = {"unified": mixed_figures(140, 3.5, 5.0), "pd": mixed_figures(120, 3.0, 6.0),
              "ray-pd": mixed_figures(400, 6.5, 4.0), "pd-nocond": mixed_figures(270, 13.0, 4.0, 1)}
    lines = mixed_target_lines(pooled, "unified", ["pd", "pd-nocond"])
    assert [line.split("]")[0] for line in lines[:4]] == ["- [met"] * 4, lines
    assert lines[0] == ("- [met] pd: TTFT P99 of the mixed run: 120.00 ms vs unified 140.00, "
                        "ray-pd 400.00 ms (target: no worse than unified and ray-pd)")
    assert "goodput on the mix: 6.00 req/s vs unified 5.00 req/s, ratio 1.20" in lines[2]
    assert [line.split("]")[0] for line in lines[4:]] == ["- [NOT met"] * 4, lines
    assert lines[7] == ("- [NOT met] pd-nocond: requests lost: 1 of 360 (target 0); 0 more "
                        "refused with 429/503 and Retry-After past capacity")
    # refusals that tell the client to come back are answers, not losses
    shedding = {**pooled, "pd": mixed_figures(120, 3.0, 6.0, errors=30, shed=30)}
    assert mixed_target_lines(shedding, "unified")[3] == (
        "- [met] pd: requests lost: 0 of 360 (target 0); 30 more refused with 429/503 and "
        "Retry-After past capacity")
    no_base_goodput = {**pooled, "unified": mixed_figures(140, 3.5, None)}
    assert "vs unified below the lowest rate" in mixed_target_lines(no_base_goodput, "unified")[2]
    assert mixed_target_lines(pooled, "pd") == []


def test_mixed_rounds_table_and_figures_from_files(tmp_path: Path) -> None:
    write_mixed(tmp_path / "mixed.json", "run", "pd", slowdown=0.5)
    write_mixed(tmp_path / "mixed-sweep.json", "sweep", "pd", slowdown=0.5)
    got = load_mixed_figures({k: tmp_path / f"{k}.json" for k in ("mixed", "mixed-sweep")})
    summary = json.loads((tmp_path / "mixed.json").read_text())["summary"]
    assert got.ttft_p99_ms == summary["ttft_ms"]["p99"]
    assert got.tpot_p99_by_class["doc"] == summary["classes"]["doc"]["tpot_ms"]["p99"]
    assert got.e2e_p99_ms == summary["e2e_ms"]["p99"]
    assert got.goodput_rps == load_goodput(tmp_path / "mixed-sweep.json")
    assert (got.num_requests, got.num_errors) == (40 + 4 * 40, 0)
    per_round = {"unified": [mixed_figures(140, 3.5, 5.0), mixed_figures(150, 4.0, 4.0)],
                 "pd": [mixed_figures(120, 3.0, 6.0), mixed_figures(100, 2.0, 6.0)]}
    table = mixed_rounds_table(per_round, ["round 1", "pooled"])
    rows = {line.split("  ")[0]: line.split()[-2:] for line in table.splitlines()}
    assert rows["pd doc TTFT p99 (ms)"] == ["120.00", "100.00"]
    assert rows["unified chat TPOT p99 (ms)"] == ["3.50", "4.00"]
    assert rows["pd goodput (req/s)"] == ["6.00", "6.00"]
    with pytest.raises(ValueError, match="one MixedFigures per column"):
        mixed_rounds_table(per_round, ["pooled"])
