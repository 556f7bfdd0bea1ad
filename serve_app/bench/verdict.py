"""The headline figures of a side-by-side, round by round, and the project's targets checked.

Targets (issue "A serving benchmark users trust"), this app (`pd`) against Ray Serve LLM's
prefill/decode app (`ray-pd`), both measured against the unified engine in the same run:

- TTFT added over the unified engine at concurrency 1 (P50): at most half of Ray's,
- TPOT at concurrency 1 (P50): no worse than Ray's,
- throughput at concurrency 8: no lower than Ray's,
- no request lost, in any workload of any round.

Mixed workloads (issue "Prove the point", side-by-side `--mix`): the "mixed" run (N requests of
the mix at one Poisson rate) and the "mixed-sweep" (the mix at several rates, for goodput). For
this app (`pd`, and any extra system such as `pd-nocond`), on the pooled figures:

- TTFT P99 and TPOT P99 of the mixed run: no worse than the unified engine's and Ray Serve
  LLM's (`ray-pd`, where it ran),
- goodput on the mix: at least 1.2x the unified engine's,
- no request lost.

Every figure is shown per round and pooled (`pool`), so a reader sees whether a verdict holds in
each round or only on average.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from serve_app.bench.records import read_json
from serve_app.bench.report import fmt, format_table

KINDS = ("c1", "c8", "sweep")
MIXED_KINDS = ("mixed", "mixed-sweep")
TTFT_OVERHEAD_TARGET = 0.5
GOODPUT_GAIN_TARGET = 1.2


@dataclass(frozen=True)
class Figures:
    """One system in one round (or pooled over the rounds)."""

    ttft_p50_ms: float | None
    tpot_p50_ms: float | None
    e2e_p50_ms: float | None
    c8_rps: float | None
    goodput_rps: float | None
    num_requests: int
    num_errors: int


def load_figures(files: Mapping[str, str | Path]) -> Figures:
    """Figures from one system's `c1`, `c8` and `sweep` results files."""
    data = {kind: read_json(files[kind]) for kind in KINDS}
    c1, c8 = data["c1"]["summary"], data["c8"]["summary"]
    sweep_runs = [run["summary"] for run in data["sweep"]["runs"]]
    summaries = [c1, c8, *sweep_runs]
    return Figures(
        ttft_p50_ms=(c1.get("ttft_ms") or {}).get("p50"),
        tpot_p50_ms=(c1.get("tpot_ms") or {}).get("p50"),
        e2e_p50_ms=(c1.get("e2e_ms") or {}).get("p50"),
        c8_rps=c8.get("request_throughput_rps"),
        goodput_rps=(data["sweep"].get("goodput") or {}).get("goodput_rps"),
        num_requests=sum(int(s.get("num_requests") or 0) for s in summaries),
        num_errors=sum(int(s.get("num_errors") or 0) for s in summaries),
    )


def _compares_pd_apps(labels: Iterable[str], baseline: str) -> bool:
    """Both PD apps ran, against a third system as the baseline."""
    return {"pd", "ray-pd", baseline} <= set(labels) and baseline not in ("pd", "ray-pd")


def _added(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None or base <= 0 else value / base


def rounds_table(
    figures: Mapping[str, Sequence[Figures]], baseline: str, columns: Sequence[str]
) -> str:
    """Rows of figures, one column per round and one pooled: `figures[label][i]` is column i."""
    if {len(per_column) for per_column in figures.values()} != {len(columns)}:
        raise ValueError("every system needs one Figures per column")
    labels = list(figures)
    base = figures[baseline]
    rows: list[list[str]] = []

    def add(name: str, values: Sequence[float | int | None]) -> None:
        rows.append([name, *(fmt(value) for value in values)])

    for label in labels:
        add(f"{label} TTFT p50 c1 (ms)", [f.ttft_p50_ms for f in figures[label]])
    for label in labels:
        if label != baseline:
            add(f"{label} added TTFT p50 c1 (ms)",
                [_added(f.ttft_p50_ms, b.ttft_p50_ms) for f, b in zip(figures[label], base, strict=True)])
    if _compares_pd_apps(labels, baseline):
        add("pd/ray-pd added TTFT", [
            _ratio(_added(pd.ttft_p50_ms, b.ttft_p50_ms), _added(ray.ttft_p50_ms, b.ttft_p50_ms))
            for pd, ray, b in zip(figures["pd"], figures["ray-pd"], base, strict=True)
        ])
    for name, field in (("TPOT p50 c1 (ms)", "tpot_p50_ms"), ("E2E p50 c1 (ms)", "e2e_p50_ms"),
                        ("req/s c8", "c8_rps"),
                        ("goodput (req/s)", "goodput_rps"), ("errors", "num_errors")):
        for label in labels:
            add(f"{label} {name}", [getattr(f, field) for f in figures[label]])
    return format_table(["figure", *columns], rows)


def target_lines(pooled: Mapping[str, Figures], baseline: str) -> list[str]:
    """The targets checked on the pooled figures; empty unless unified, pd and ray-pd ran."""
    if not _compares_pd_apps(pooled, baseline):
        return []
    pd, ray, base = pooled["pd"], pooled["ray-pd"], pooled[baseline]
    pd_added = _added(pd.ttft_p50_ms, base.ttft_p50_ms)
    ray_added = _added(ray.ttft_p50_ms, base.ttft_p50_ms)
    overhead = _ratio(pd_added, ray_added)
    lost = {label: figures.num_errors for label, figures in pooled.items()}
    checks = [
        (overhead is not None and pd_added is not None
         and (pd_added <= 0 or overhead <= TTFT_OVERHEAD_TARGET),
         f"TTFT added over {baseline} at concurrency 1 (P50): pd {fmt(pd_added)} ms, "
         f"ray-pd {fmt(ray_added)} ms, ratio {fmt(overhead)} (target <= {TTFT_OVERHEAD_TARGET})"),
        (_le(pd.tpot_p50_ms, ray.tpot_p50_ms),
         f"TPOT at concurrency 1 (P50): pd {fmt(pd.tpot_p50_ms)} ms, "
         f"ray-pd {fmt(ray.tpot_p50_ms)} ms (target: no worse)"),
        (_le(ray.c8_rps, pd.c8_rps),
         f"throughput at concurrency 8: pd {fmt(pd.c8_rps)} req/s, ray-pd {fmt(ray.c8_rps)} "
         "req/s (target: no lower)"),
        (lost["pd"] == 0,
         "requests lost over every workload and round: "
         + ", ".join(f"{label} {count} of {pooled[label].num_requests}"
                     for label, count in lost.items()) + " (target: pd 0)"),
    ]
    return [f"- [{'met' if ok else 'NOT met'}] {text}" for ok, text in checks]


def _le(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a <= b


# mixed workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixedFigures:
    """One system's mixed run and mixed sweep in one round (or pooled); `*_by_class` maps each
    class of the mix to its figure."""

    ttft_p99_ms: float | None
    tpot_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    ttft_p99_by_class: Mapping[str, float | None]
    tpot_p99_by_class: Mapping[str, float | None]
    goodput_rps: float | None
    num_requests: int
    num_errors: int
    num_shed: int = 0
    """Of the errors, refusals with 429/503 (`Retry-After`): answered, not lost."""


def load_mixed_figures(files: Mapping[str, str | Path]) -> MixedFigures:
    """Figures from one system's `mixed` and `mixed-sweep` results files."""
    data = {kind: read_json(files[kind]) for kind in MIXED_KINDS}
    mixed = data["mixed"]["summary"]
    classes = mixed.get("classes") or {}
    summaries = [mixed, *(run["summary"] for run in data["mixed-sweep"]["runs"])]
    return MixedFigures(
        ttft_p99_ms=(mixed.get("ttft_ms") or {}).get("p99"),
        tpot_p99_ms=(mixed.get("tpot_ms") or {}).get("p99"),
        e2e_p50_ms=(mixed.get("e2e_ms") or {}).get("p50"),
        e2e_p99_ms=(mixed.get("e2e_ms") or {}).get("p99"),
        ttft_p99_by_class={n: (c.get("ttft_ms") or {}).get("p99") for n, c in classes.items()},
        tpot_p99_by_class={n: (c.get("tpot_ms") or {}).get("p99") for n, c in classes.items()},
        goodput_rps=(data["mixed-sweep"].get("goodput") or {}).get("goodput_rps"),
        num_requests=sum(int(s.get("num_requests") or 0) for s in summaries),
        num_errors=sum(int(s.get("num_errors") or 0) for s in summaries),
        num_shed=sum(int(s.get("num_shed") or 0) for s in summaries),
    )


def mixed_rounds_table(
    figures: Mapping[str, Sequence[MixedFigures]], columns: Sequence[str]
) -> str:
    """Rows of mixed-workload figures, one column per round and one pooled."""
    if {len(per_column) for per_column in figures.values()} != {len(columns)}:
        raise ValueError("every system needs one MixedFigures per column")
    names = sorted({name for per in figures.values() for f in per for name in f.ttft_p99_by_class})
    rows: list[list[str]] = []
    for figure, overall, by_class in (
        ("TTFT p99 (ms)", "ttft_p99_ms", "ttft_p99_by_class"),
        ("TPOT p99 (ms)", "tpot_p99_ms", "tpot_p99_by_class"),
    ):
        for label, per_column in figures.items():
            rows.append([f"{label} {figure}", *(fmt(getattr(f, overall)) for f in per_column)])
        for name in names:
            for label, per_column in figures.items():
                values = [getattr(f, by_class).get(name) for f in per_column]
                rows.append([f"{label} {name} {figure}", *(fmt(value) for value in values)])
    for figure, field in (("E2E p50 (ms)", "e2e_p50_ms"), ("E2E p99 (ms)", "e2e_p99_ms"),
                          ("goodput (req/s)", "goodput_rps"), ("errors", "num_errors")):
        for label, per_column in figures.items():
            rows.append([f"{label} {figure}", *(fmt(getattr(f, field)) for f in per_column)])
    return format_table(["figure", *columns], rows)


def mixed_target_lines(
    pooled: Mapping[str, MixedFigures], baseline: str, apps: Sequence[str] = ("pd",)
) -> list[str]:
    """The mixed-workload targets of each app in `apps` that ran, on the pooled figures.

    Empty when the baseline is itself one of the PD apps (there is no unified engine to beat).
    """
    if baseline in (*apps, "ray-pd") or baseline not in pooled:
        return []
    lines = []
    for app in apps:
        if app not in pooled or app == baseline:
            continue
        references = [baseline, *(["ray-pd"] if "ray-pd" in pooled and app != "ray-pd" else [])]
        lines += [f"- [{'met' if ok else 'NOT met'}] {app}: {text}"
                  for ok, text in _mixed_checks(pooled, app, baseline, references)]
    return lines


def _mixed_checks(
    pooled: Mapping[str, MixedFigures], app: str, baseline: str, references: Sequence[str]
) -> list[tuple[bool, str]]:
    figures = pooled[app]
    checks = []
    for name, field in (("TTFT P99", "ttft_p99_ms"), ("TPOT P99", "tpot_p99_ms")):
        value = getattr(figures, field)
        others = ", ".join(f"{ref} {fmt(getattr(pooled[ref], field))}" for ref in references)
        ok = all(_le(value, getattr(pooled[ref], field)) for ref in references)
        checks.append((ok, f"{name} of the mixed run: {fmt(value)} ms vs {others} ms "
                           f"(target: no worse than {' and '.join(references)})"))
    goodput, base = figures.goodput_rps, pooled[baseline].goodput_rps
    gain = _ratio(goodput, base)
    is_met = goodput is not None and (base is None or goodput >= GOODPUT_GAIN_TARGET * base)
    base_text = "below the lowest rate" if base is None else f"{fmt(base)} req/s"
    checks.append((is_met, f"goodput on the mix: {fmt(goodput)} req/s vs {baseline} {base_text}, "
                           f"ratio {fmt(gain)} (target >= {GOODPUT_GAIN_TARGET})"))
    num_lost = figures.num_errors - figures.num_shed
    checks.append((num_lost == 0,
                   f"requests lost: {num_lost} of {figures.num_requests} (target 0); "
                   f"{figures.num_shed} more refused with 429/503 and Retry-After past capacity"))
    return checks
