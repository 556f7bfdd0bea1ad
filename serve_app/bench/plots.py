"""PNG plots of results files, one line per system (the file's `label`).

- `latency_cdf.png`: empirical CDFs of TTFT and TPOT at one request rate per system.
- `ttft_vs_rate.png`, `tpot_vs_rate.png`: P50 (solid), P90 (dashed), P99 (dotted) vs rate.
- `slo_attainment_vs_rate.png`: SLO attainment vs rate, with the attainment target.

Runs without a finite request rate (closed loop) are placed at their achieved request rate.
Figures are drawn with matplotlib's object API on the Agg canvas, so no display is needed and no
global pyplot state is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from serve_app.bench.compare import pick_run
from serve_app.bench.records import RunResult, load_runs
from serve_app.bench.stats import SLO, slo_attainment

Systems = dict[str, list[RunResult]]
PERCENTILE_STYLES = (("p50", "-"), ("p90", "--"), ("p99", ":"))


def load_systems(paths: Sequence[str | Path]) -> Systems:
    """label -> runs sorted by rate; files with the same label are merged."""
    systems: Systems = {}
    for path in paths:
        for run in load_runs(path):
            systems.setdefault(run.label, []).append(run)
    return {label: sorted(runs, key=lambda run: run.x_rate) for label, runs in systems.items()}


def plot_results(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    slo: SLO | None = None,
    target: float = 0.9,
    cdf_rate: float | None = None,
) -> list[Path]:
    """Write every plot for the given results files; returns the PNG paths.

    `slo` overrides the SLOs stored in the files (attainment is then recomputed from records).
    `cdf_rate` picks the run shown in the CDFs (default: each system's highest rate).
    """
    systems = load_systems(paths)
    slo = slo if slo is not None and slo.is_set else stored_slo(systems)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_latency_cdfs(systems, out / "latency_cdf.png", cdf_rate),
        plot_percentiles_vs_rate(systems, "ttft_ms", "TTFT", slo.ttft_ms, out / "ttft_vs_rate.png"),
        plot_percentiles_vs_rate(systems, "tpot_ms", "TPOT", slo.tpot_ms, out / "tpot_vs_rate.png"),
    ]
    if slo.is_set:
        written.append(plot_attainment(systems, slo, target, out / "slo_attainment_vs_rate.png"))
    return written


def stored_slo(systems: Systems) -> SLO:
    """The SLO recorded with the first run that has one."""
    for runs in systems.values():
        for run in runs:
            stored = run.summary.get("slo") or {}
            if stored.get("ttft_ms") is not None or stored.get("tpot_ms") is not None:
                return SLO(ttft_ms=stored.get("ttft_ms"), tpot_ms=stored.get("tpot_ms"))
    return SLO()


def plot_latency_cdfs(systems: Systems, path: Path, rate: float | None = None) -> Path:
    figure, (ttft_axes, tpot_axes) = _figure(ncols=2)
    for label, runs in systems.items():
        run = pick_run(runs, rate)
        done = [record for record in run.records if record.is_success]
        name = f"{label} @ {run.x_rate:g} req/s"
        _plot_cdf(ttft_axes, [r.ttft_s * 1000 for r in done if r.ttft_s is not None], name)
        _plot_cdf(tpot_axes, [r.tpot_s * 1000 for r in done if r.tpot_s is not None], name)
    _decorate(ttft_axes, "TTFT (ms)", "fraction of requests", "TTFT CDF")
    _decorate(tpot_axes, "TPOT (ms)", "fraction of requests", "TPOT CDF")
    return _save(figure, path)


def plot_percentiles_vs_rate(
    systems: Systems, key: str, name: str, slo_ms: float | None, path: Path
) -> Path:
    figure, (axes,) = _figure(ncols=1)
    for index, (label, runs) in enumerate(systems.items()):
        rates = [run.x_rate for run in runs]
        for stat, style in PERCENTILE_STYLES:
            values = [(run.summary.get(key) or {}).get(stat) for run in runs]
            axes.plot(
                rates,
                _nan_for_none(values),
                linestyle=style,
                marker="o",
                color=f"C{index}",
                label=f"{label} {stat.upper()}",
            )
    if slo_ms is not None:
        axes.axhline(slo_ms, color="grey", linewidth=1, label=f"SLO {slo_ms:g} ms")
    _decorate(axes, "request rate (req/s)", f"{name} (ms)", f"{name} percentiles vs request rate")
    return _save(figure, path)


def plot_attainment(systems: Systems, slo: SLO, target: float, path: Path) -> Path:
    figure, (axes,) = _figure(ncols=1)
    for index, (label, runs) in enumerate(systems.items()):
        rates = [run.x_rate for run in runs]
        attainment = [slo_attainment(run.records, slo) for run in runs]
        axes.plot(rates, _nan_for_none(attainment), marker="o", color=f"C{index}", label=label)
    axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    axes.set_ylim(-0.02, 1.02)
    _decorate(axes, "request rate (req/s)", "SLO attainment", "SLO attainment vs request rate")
    return _save(figure, path)


def _figure(ncols: int) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(6.4 * ncols, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, ncols, squeeze=False)[0])


def _plot_cdf(axes: Axes, values: list[float], label: str) -> None:
    if not values:
        return
    ordered = sorted(values)
    fractions = [(rank + 1) / len(ordered) for rank in range(len(ordered))]
    axes.step(ordered, fractions, where="post", label=label)


def _decorate(axes: Axes, xlabel: str, ylabel: str, title: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")


def _nan_for_none(values: Sequence[float | None]) -> list[float]:
    return [float("nan") if value is None else value for value in values]


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path
