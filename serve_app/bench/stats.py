"""Percentiles, run summaries, SLO attainment and goodput. Pure functions over records.

Definitions (all latencies in the summary are milliseconds):

- Percentiles use linear interpolation between closest ranks, numpy's default
  (`method="linear"`, Hyndman & Fan type 7): sort the n values as x[0..n-1], let
  h = (n - 1) * q / 100; the q-th percentile is x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] -
  x[floor(h)]). For [10, 20, 30, 40] P90 is 37.
- TTFT and E2E: one value per successful request. TPOT: (E2E - TTFT) / (output_tokens - 1) per
  successful request with more than one output token. ITL: every gap between successive content
  chunks of every successful request, pooled.
- Throughput divides by the run's duration (first release to last completion): requests and
  output tokens of successful requests only.
- SLO attainment: the fraction of *all* requests (failures count as misses) with TTFT <= the TTFT
  SLO and TPOT <= the TPOT SLO. An SLO left unset is not checked; a request with one output token
  has no TPOT and passes that check.
- Goodput (DistServe): the highest tested request rate whose SLO attainment is at least the
  target (0.9 by default).
- Mixed workloads: a summary of records that carry a `class_name` also has `classes`, one
  summary per class (same definitions, over that class's requests and the whole run's
  duration). An SLO may set other limits per class (`SLO.per_class`); each request is judged by
  its class's limits, so the overall attainment and goodput count every class by its own SLO.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_app.bench.records import RequestRecord

PERCENTILES = (50, 90, 99)
MAX_ERROR_KINDS = 5


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with numpy's default linear interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def latency_stats_ms(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """Count, mean and percentiles in ms of latencies given in seconds (None when empty)."""
    values_ms = [value * 1000 for value in values_s]
    stats: dict[str, float | int | None] = {"count": len(values_ms)}
    stats["mean"] = sum(values_ms) / len(values_ms) if values_ms else None
    for q in PERCENTILES:
        stats[f"p{q}"] = percentile(values_ms, q) if values_ms else None
    return stats


@dataclass(frozen=True)
class SLO:
    """Latency limits; `per_class` replaces them for one class of a mix (a limit left `None`
    there keeps the overall one)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    per_class: Mapping[str, SLO] = field(default_factory=dict)

    @property
    def is_set(self) -> bool:
        has_own = self.ttft_ms is not None or self.tpot_ms is not None
        return has_own or any(slo.is_set for slo in self.per_class.values())

    def for_class(self, name: str | None) -> SLO:
        """The limits a request of class `name` is judged by."""
        own = self.per_class.get(name) if name is not None else None
        if own is None:
            return SLO(self.ttft_ms, self.tpot_ms)
        return SLO(
            ttft_ms=self.ttft_ms if own.ttft_ms is None else own.ttft_ms,
            tpot_ms=self.tpot_ms if own.tpot_ms is None else own.tpot_ms,
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms}
        if self.per_class:
            data["per_class"] = {name: slo.to_json() for name, slo in self.per_class.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> SLO:
        data = data or {}
        per_class = {
            name: cls.from_json(raw) for name, raw in (data.get("per_class") or {}).items()
        }
        return cls(ttft_ms=data.get("ttft_ms"), tpot_ms=data.get("tpot_ms"), per_class=per_class)


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    if not record.is_success:
        return False
    slo = slo.for_class(record.class_name)
    if slo.ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > slo.ttft_ms):
        return False
    tpot_s = record.tpot_s
    return slo.tpot_ms is None or tpot_s is None or tpot_s * 1000 <= slo.tpot_ms


def slo_attainment(records: Sequence[RequestRecord], slo: SLO) -> float | None:
    """Fraction of all requests meeting every set SLO; None without records or SLOs."""
    if not records or not slo.is_set:
        return None
    return sum(meets_slo(record, slo) for record in records) / len(records)


def records_duration_s(records: Sequence[RequestRecord]) -> float:
    """Run start to last completion, from the records alone."""
    ends = [record.start_s + (record.e2e_s or 0.0) for record in records]
    return max(ends, default=0.0)


def class_names(records: Sequence[RequestRecord]) -> list[str]:
    """The mix classes among `records`, sorted (empty for a workload without classes)."""
    return sorted({record.class_name for record in records if record.class_name is not None})


def summarize(
    records: Sequence[RequestRecord], duration_s: float | None = None, slo: SLO | None = None
) -> dict[str, Any]:
    slo = slo or SLO()
    duration_s = records_duration_s(records) if duration_s is None else duration_s
    summary = _summarize_group(records, duration_s, slo)
    names = class_names(records)
    if names:
        summary["classes"] = {
            name: _summarize_group(
                [record for record in records if record.class_name == name],
                duration_s,
                slo.for_class(name),
            )
            for name in names
        }
    return summary


SHED_STATUSES = ("HTTP 429:", "HTTP 503:")


def is_shed(record: RequestRecord) -> bool:
    """Refused with a retryable status (429 or 503): an answer that says "back off", not a
    lost request."""
    return record.error is not None and record.error.startswith(SHED_STATUSES)


def _summarize_group(
    records: Sequence[RequestRecord], duration_s: float, slo: SLO
) -> dict[str, Any]:
    done = [record for record in records if record.is_success]
    total_output = sum(record.output_tokens for record in done)
    num_meeting = sum(meets_slo(record, slo) for record in records) if slo.is_set else None
    return {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_errors": len(records) - len(done),
        "num_shed": sum(is_shed(record) for record in records),
        "errors": _error_kinds(records),
        "duration_s": duration_s,
        "total_prompt_tokens": sum(record.prompt_tokens or 0 for record in done),
        "total_output_tokens": total_output,
        "request_throughput_rps": _per_second(len(done), duration_s),
        "output_token_throughput_tps": _per_second(total_output, duration_s),
        "ttft_ms": latency_stats_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": latency_stats_ms([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": latency_stats_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": latency_stats_ms([r.e2e_s for r in done if r.e2e_s is not None]),
        "slo": slo.to_json(),
        "slo_attainment": slo_attainment(records, slo),
        "slo_goodput_rps": None if num_meeting is None else _per_second(num_meeting, duration_s),
    }


@dataclass(frozen=True)
class GoodputResult:
    """`goodput_rps` is None when even the lowest tested rate misses the target."""

    goodput_rps: float | None
    target: float
    attainment_by_rate: list[tuple[float, float]]

    def to_json(self) -> dict[str, Any]:
        return {
            "goodput_rps": self.goodput_rps,
            "target": self.target,
            "attainment_by_rate": [list(pair) for pair in self.attainment_by_rate],
        }


def find_goodput(
    runs: Sequence[tuple[float, Sequence[RequestRecord]]],
    slo: SLO,
    target: float = 0.9,
    require_all_lower: bool = True,
) -> GoodputResult:
    """The highest rate with SLO attainment >= target, from (rate, records) pairs.

    With `require_all_lower` (the default) every lower tested rate must pass too, so a lucky
    pass above a failing rate does not count: goodput is the last rate before the first miss.
    """
    if not slo.is_set:
        raise ValueError("goodput needs a TTFT SLO, a TPOT SLO or both")
    if not 0 < target <= 1:
        raise ValueError(f"attainment target must be within (0, 1], got {target}")
    attainment = sorted((rate, slo_attainment(records, slo) or 0.0) for rate, records in runs)
    goodput = None
    for rate, fraction in attainment:
        if fraction >= target:
            goodput = rate
        elif require_all_lower:
            break
    return GoodputResult(goodput_rps=goodput, target=target, attainment_by_rate=attainment)


def _per_second(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


def _error_kinds(records: Sequence[RequestRecord]) -> dict[str, int]:
    """The most common error strings (first 200 characters) with their counts."""
    kinds = Counter((record.error or "")[:200] for record in records if not record.is_success)
    return dict(kinds.most_common(MAX_ERROR_KINDS))
