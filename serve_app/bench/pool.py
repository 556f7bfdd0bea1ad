"""Pool the results files of repeated rounds of one system into one results file.

    python -m serve_app.bench pool pd-c1.r1.json pd-c1.r2.json pd-c1.r3.json --save pd-c1.json

On a small shared machine one run of a system can be 20-40% off the next one of the same
system, more than the differences between the systems. The side-by-side therefore runs every
system several times, interleaved, and compares the pooled records: every request of every
round counts once, durations add up (so throughput is the rounds' total requests over their
total time), and a sweep's runs are pooled rate by rate before goodput is searched again.

The pooled file has the shape of its inputs (`kind` "run" or "sweep", see `records`) plus
`rounds`: per input file its path, start time and summary (a sweep: its goodput), so the spread
between rounds stays visible next to the pooled figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve_app.bench.records import RequestRecord, read_json, run_payload
from serve_app.bench.stats import SLO, find_goodput, summarize

DEFAULT_ATTAINMENT_TARGET = 0.9


def pool_results(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The pooled results payload of `paths` (same kind and label, in round order)."""
    if not paths:
        raise ValueError("nothing to pool: no results files given")
    files = [read_json(path) for path in paths]
    kinds = {data.get("kind", "run") for data in files}
    labels = {data.get("label") for data in files}
    if len(kinds) != 1 or len(labels) != 1:
        raise ValueError(f"pool files of one kind and one label, got kinds {kinds}, labels {labels}")
    first = files[0]
    slo = SLO.from_json((first.get("config") or {}).get("slo"))
    header = {key: first[key] for key in ("kind", "label", "command", "config") if key in first}
    header["started_at"] = first.get("started_at")
    if kinds == {"sweep"}:
        return {**header, **_pool_sweeps(files, slo), "rounds": _rounds(paths, files)}
    records, duration_s = _concat([(data, data.get("duration_s")) for data in files])
    payload = run_payload(
        _rate(first.get("request_rate")), duration_s, summarize(records, duration_s, slo), records
    )
    return {**header, **payload, "rounds": _rounds(paths, files)}


def _pool_sweeps(files: Sequence[dict[str, Any]], slo: SLO) -> dict[str, Any]:
    by_rate: dict[float, list[tuple[dict[str, Any], float | None]]] = {}
    for data in files:
        for run in data["runs"]:
            by_rate.setdefault(float(run["request_rate"]), []).append((run, run.get("duration_s")))
    runs, pairs = [], []
    for rate in sorted(by_rate):
        records, duration_s = _concat(by_rate[rate])
        runs.append(run_payload(rate, duration_s, summarize(records, duration_s, slo), records))
        pairs.append((rate, records))
    goodput = None
    if slo.is_set:
        target = (files[0].get("goodput") or {}).get("target", DEFAULT_ATTAINMENT_TARGET)
        goodput = find_goodput(pairs, slo, target).to_json()
    return {"goodput": goodput, "runs": runs}


def _concat(
    runs: Sequence[tuple[dict[str, Any], float | None]],
) -> tuple[list[RequestRecord], float]:
    records: list[RequestRecord] = []
    duration_s = 0.0
    for run, duration in runs:
        records += [RequestRecord.from_dict(item) for item in run.get("records", [])]
        duration_s += float(duration or 0.0)
    return records, duration_s


def _rate(value: float | None) -> float:
    return float("inf") if value is None else float(value)


def _rounds(paths: Sequence[str | Path], files: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rounds = []
    for path, data in zip(paths, files, strict=True):
        entry: dict[str, Any] = {"source": str(path), "started_at": data.get("started_at")}
        if data.get("kind") == "sweep":
            entry["goodput"] = data.get("goodput")
        else:
            entry["summary"] = data.get("summary")
        rounds.append(entry)
    return rounds
