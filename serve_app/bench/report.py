"""Plain-text tables for one run's summary and for a sweep (with one block per class of a mix)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve_app.bench.stats import PERCENTILES, GoodputResult

LATENCY_ROWS = (
    ("ttft_ms", "TTFT (ms)"),
    ("tpot_ms", "TPOT (ms)"),
    ("itl_ms", "ITL (ms)"),
    ("e2e_ms", "E2E (ms)"),
)


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, widths fitted to the content."""
    widths = [max(len(str(row[col])) for row in [header, *rows]) for col in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(cell).rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"requests: {summary['num_requests']} ({summary['num_completed']} ok, "
        f"{summary['num_errors']} failed) in {summary['duration_s']:.2f} s",
        f"throughput: {summary['request_throughput_rps']:.2f} req/s, "
        f"{summary['output_token_throughput_tps']:.1f} output tok/s",
    ]
    if summary.get("slo_attainment") is not None:
        lines.append(
            f"{_slo_text(summary['slo'])}: attainment {summary['slo_attainment']:.1%}, "
            f"{summary['slo_goodput_rps']:.2f} req/s within SLO"
        )
    lines.append(_latency_table(summary))
    lines += [f"  {count} x {error}" for error, count in (summary.get("errors") or {}).items()]
    for name, part in (summary.get("classes") or {}).items():
        lines += ["", _class_line(name, part), _latency_table(part)]
    return "\n".join(lines)


def _latency_table(summary: dict[str, Any]) -> str:
    header = ["metric", "mean", *[f"p{q}" for q in PERCENTILES]]
    rows = [[name, *_latency_cells(summary[key])] for key, name in LATENCY_ROWS]
    return format_table(header, rows)


def _class_line(name: str, summary: dict[str, Any]) -> str:
    line = (
        f"class {name}: {summary['num_requests']} requests ({summary['num_errors']} failed), "
        f"{summary['request_throughput_rps']:.2f} req/s"
    )
    if summary.get("slo_attainment") is not None:
        line += f", {_slo_text(summary['slo'])}: attainment {summary['slo_attainment']:.1%}"
    return line


def format_sweep(
    runs: Sequence[tuple[float, dict[str, Any]]], goodput: GoodputResult | None
) -> str:
    header = [
        "rate (req/s)",
        "req/s",
        "TTFT p50",
        "TTFT p90",
        "TPOT p50",
        "TPOT p90",
        "errors",
        "SLO attain.",
    ]
    rows = [_sweep_row(rate, summary) for rate, summary in runs]
    lines = [format_table(header, rows)]
    class_rows = [
        [f"{rate:g}", name, *_sweep_row(rate, part)[1:]]
        for rate, summary in runs
        for name, part in (summary.get("classes") or {}).items()
    ]
    if class_rows:
        lines += ["", format_table([header[0], "class", *header[1:]], class_rows)]
    if goodput is not None:
        value = goodput.goodput_rps
        text = f"{value:g} req/s" if value is not None else "below the lowest tested rate"
        lines.append(f"goodput ({goodput.target:.0%} SLO attainment): {text}")
    return "\n".join(lines)


def _latency_cells(stats: dict[str, Any]) -> list[str]:
    return [fmt(stats.get("mean")), *[fmt(stats.get(f"p{q}")) for q in PERCENTILES]]


def _sweep_row(rate: float, summary: dict[str, Any]) -> list[str]:
    attainment = summary.get("slo_attainment")
    return [
        f"{rate:g}",
        fmt(summary["request_throughput_rps"]),
        fmt(summary["ttft_ms"]["p50"]),
        fmt(summary["ttft_ms"]["p90"]),
        fmt(summary["tpot_ms"]["p50"]),
        fmt(summary["tpot_ms"]["p90"]),
        str(summary["num_errors"]),
        "-" if attainment is None else f"{attainment:.1%}",
    ]


def _slo_text(slo: dict[str, Any]) -> str:
    parts = []
    if slo.get("ttft_ms") is not None:
        parts.append(f"TTFT <= {slo['ttft_ms']:g} ms")
    if slo.get("tpot_ms") is not None:
        parts.append(f"TPOT <= {slo['tpot_ms']:g} ms")
    return "SLO " + " and ".join(parts)
