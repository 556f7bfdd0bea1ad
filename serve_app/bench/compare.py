"""Side-by-side comparison of several systems' summaries, with ratios to a baseline.

    print_comparison({"unified": s1, "pd": s2}, baseline="unified")

Each non-baseline system gets a value column and a `label/baseline` ratio column (value divided
by the baseline's value): below 1x is better for latencies, above 1x for throughput, attainment
and goodput. Summaries of a mixed workload add the P50 / P90 / P99 latencies, throughput and SLO
attainment of each class (rows named `CLASS ...`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from serve_app.bench.records import RunResult, load_goodput, load_runs
from serve_app.bench.report import fmt, format_table

LATENCY_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))
LATENCY_STATS = ("mean", "p50", "p90", "p99")
CLASS_LATENCY_STATS = ("p50", "p90", "p99")
CLASS_SCALAR_METRICS = (
    ("request_throughput_rps", "requests/s"),
    ("num_errors", "errors"),
    ("slo_attainment", "SLO attainment"),
)
SCALAR_METRICS = (
    ("request_throughput_rps", "requests/s"),
    ("output_token_throughput_tps", "output tokens/s"),
    ("num_errors", "errors"),
    ("slo_attainment", "SLO attainment"),
    ("slo_goodput_rps", "requests/s within SLO"),
    ("goodput_rps", "goodput (req/s, sweep)"),
)


def metric_rows(summaries: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Any]]]:
    """(row name, one value per summary) for every metric at least one summary has."""
    rows = []
    for key, name in LATENCY_METRICS:
        for stat in LATENCY_STATS:
            values = [(summary.get(key) or {}).get(stat) for summary in summaries]
            rows.append((f"{name} {stat} (ms)", values))
    for key, name in SCALAR_METRICS:
        values = [summary.get(key) for summary in summaries]
        if any(value is not None for value in values):
            rows.append((name, values))
    return rows + class_rows(summaries)


def class_rows(summaries: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Any]]]:
    """The per-class rows of mixed-workload summaries (none for uniform workloads)."""
    names: list[str] = []
    for summary in summaries:
        names += [name for name in summary.get("classes") or {} if name not in names]
    rows = []
    for class_name in names:
        parts = [(summary.get("classes") or {}).get(class_name) or {} for summary in summaries]
        for key, name in LATENCY_METRICS:
            for stat in CLASS_LATENCY_STATS:
                values = [(part.get(key) or {}).get(stat) for part in parts]
                rows.append((f"{class_name} {name} {stat} (ms)", values))
        for key, name in CLASS_SCALAR_METRICS:
            values = [part.get(key) for part in parts]
            if any(value is not None for value in values):
                rows.append((f"{class_name} {name}", values))
    return rows


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def format_comparison(summaries: Mapping[str, Mapping[str, Any]], baseline: str) -> str:
    if baseline not in summaries:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(summaries)}")
    others = [label for label in summaries if label != baseline]
    order = [baseline, *others]
    header = ["metric", baseline]
    for label in others:
        header += [label, f"{label}/{baseline}"]
    rows = []
    for name, values in metric_rows([summaries[label] for label in order]):
        row = [name, fmt(values[0])]
        for value in values[1:]:
            row += [fmt(value), ratio(value, values[0])]
        rows.append(row)
    return format_table(header, rows)


def print_comparison(
    summaries: Mapping[str, Mapping[str, Any]], baseline: str, file: TextIO | None = None
) -> str:
    """Print the comparison table (to stdout by default) and return it."""
    text = format_comparison(summaries, baseline)
    print(text, file=file or sys.stdout)
    return text


def load_summaries(paths: Sequence[str | Path], rate: float | None = None) -> dict[str, dict]:
    """label -> summary from results files; a sweep contributes one run plus its goodput.

    From a sweep the run at `rate` is taken, or its highest-rate run when `rate` is None.
    Repeated labels get a `#2`, `#3`, ... suffix.
    """
    summaries: dict[str, dict] = {}
    for path in paths:
        run = pick_run(load_runs(path), rate)
        summary = dict(run.summary)
        summary["goodput_rps"] = load_goodput(path)
        summaries[_unique(run.label, summaries)] = summary
    return summaries


def pick_run(runs: Sequence[RunResult], rate: float | None) -> RunResult:
    if rate is None:
        return max(runs, key=lambda run: run.x_rate)
    for run in runs:
        if run.request_rate is not None and math.isclose(run.request_rate, rate):
            return run
    raise ValueError(f"no run at rate {rate}; rates: {[run.request_rate for run in runs]}")


def _unique(label: str, taken: Mapping[str, Any]) -> str:
    candidate, number = label, 1
    while candidate in taken:
        number += 1
        candidate = f"{label}#{number}"
    return candidate
