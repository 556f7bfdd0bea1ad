"""PNG plots of results files, one line per system (the file's `label`).

- `latency_cdf.png`: empirical CDFs of TTFT and TPOT at one request rate per system.
- `ttft_vs_rate.png`, `tpot_vs_rate.png`: P50 (solid), P90 (dashed), P99 (dotted) vs rate.
- `slo_attainment_vs_rate.png`: SLO attainment vs rate, with the attainment target.
- Mixed workloads: the same four plots for each class of the mix, `*_CLASS.png` (e.g.
  `ttft_vs_rate_chat.png`), over that class's requests and against its SLO.

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
from serve_app.bench.records import RequestRecord, RunResult, load_runs
from serve_app.bench.stats import SLO, class_names, slo_attainment

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
    written = _plots_of(systems, out, slo, target, cdf_rate, None)
    for class_name in mix_classes(systems):
        written += _plots_of(systems, out, slo, target, cdf_rate, class_name)
    return written


def mix_classes(systems: Systems) -> list[str]:
    """Every class of a mix met in the runs (sorted; empty for uniform workloads)."""
    records = [record for runs in systems.values() for run in runs for record in run.records]
    return class_names(records)


def _plots_of(
    systems: Systems,
    out: Path,
    slo: SLO,
    target: float,
    cdf_rate: float | None,
    class_name: str | None,
) -> list[Path]:
    """The four plots, over every request or over one class's (`NAME_CLASS.png`)."""
    suffix = f"_{class_name}" if class_name else ""
    limits = slo.for_class(class_name)
    written = [plot_latency_cdfs(systems, out / f"latency_cdf{suffix}.png", cdf_rate, class_name)]
    for name, slo_ms in (("TTFT", limits.ttft_ms), ("TPOT", limits.tpot_ms)):
        path = out / f"{name.lower()}_vs_rate{suffix}.png"
        key = f"{name.lower()}_ms"
        written.append(plot_percentiles_vs_rate(systems, key, name, slo_ms, path, class_name))
    if slo.is_set:
        path = out / f"slo_attainment_vs_rate{suffix}.png"
        written.append(plot_attainment(systems, slo, target, path, class_name))
    return written


def stored_slo(systems: Systems) -> SLO:
    """The SLO recorded with the first run that has one."""
    for runs in systems.values():
        for run in runs:
            stored = SLO.from_json(run.summary.get("slo"))
            if stored.is_set:
                return stored
    return SLO()


def plot_latency_cdfs(
    systems: Systems, path: Path, rate: float | None = None, class_name: str | None = None
) -> Path:
    figure, (ttft_axes, tpot_axes) = _figure(ncols=2)
    for label, runs in systems.items():
        run = pick_run(runs, rate)
        done = [record for record in _of_class(run.records, class_name) if record.is_success]
        name = f"{label} @ {run.x_rate:g} req/s"
        _plot_cdf(ttft_axes, [r.ttft_s * 1000 for r in done if r.ttft_s is not None], name)
        _plot_cdf(tpot_axes, [r.tpot_s * 1000 for r in done if r.tpot_s is not None], name)
    _decorate(ttft_axes, "TTFT (ms)", "fraction of requests", _title("TTFT CDF", class_name))
    _decorate(tpot_axes, "TPOT (ms)", "fraction of requests", _title("TPOT CDF", class_name))
    return _save(figure, path)


def plot_percentiles_vs_rate(
    systems: Systems,
    key: str,
    name: str,
    slo_ms: float | None,
    path: Path,
    class_name: str | None = None,
) -> Path:
    figure, (axes,) = _figure(ncols=1)
    for index, (label, runs) in enumerate(systems.items()):
        rates = [run.x_rate for run in runs]
        for stat, style in PERCENTILE_STYLES:
            values = [(_summary_of(run, class_name).get(key) or {}).get(stat) for run in runs]
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
    title = _title(f"{name} percentiles vs request rate", class_name)
    _decorate(axes, "request rate (req/s)", f"{name} (ms)", title)
    return _save(figure, path)


def plot_attainment(
    systems: Systems, slo: SLO, target: float, path: Path, class_name: str | None = None
) -> Path:
    figure, (axes,) = _figure(ncols=1)
    for index, (label, runs) in enumerate(systems.items()):
        rates = [run.x_rate for run in runs]
        attainment = [slo_attainment(_of_class(run.records, class_name), slo) for run in runs]
        axes.plot(rates, _nan_for_none(attainment), marker="o", color=f"C{index}", label=label)
    axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    axes.set_ylim(-0.02, 1.02)
    title = _title("SLO attainment vs request rate", class_name)
    _decorate(axes, "request rate (req/s)", "SLO attainment", title)
    return _save(figure, path)


def _of_class(records: Sequence[RequestRecord], class_name: str | None) -> list[RequestRecord]:
    if class_name is None:
        return list(records)
    return [record for record in records if record.class_name == class_name]


def _summary_of(run: RunResult, class_name: str | None) -> dict:
    if class_name is None:
        return run.summary
    return (run.summary.get("classes") or {}).get(class_name) or {}


def _title(title: str, class_name: str | None) -> str:
    return f"{title} (class {class_name})" if class_name else title


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
