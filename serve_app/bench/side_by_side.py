"""Start each system in turn on this machine, run the same workloads on each, compare.

    python -m serve_app.bench.side_by_side --out bench/results/cpu

Systems (each serves the same model on 127.0.0.1 and is stopped, by PID, before the next one
starts, so they never compete for the machine; every Ray Serve system runs in Serve's throughput
mode and is measured at its ingress replica's own port, as `make run` serves, unless `--via
proxy`):

- `unified`: one vLLM engine with chunked prefill behind this app's Router (the baseline),
- `pd`: this app, prefill and decode engines with the NIXL handoff,
- `ray-pd`: Ray Serve LLM's own `build_pd_openai_app` with the same engines and NIXL settings,
- `direct` (opt-in): two plain vLLM OpenAI servers and a bare proxy, meant as the floor for
  router overhead. On the 2-core CPU machine its first full run measured TTFT P50 ~760 ms at
  concurrency 1 (KV transfers ~2 ms each): with back-to-back requests the prefill engine keeps
  stepping while it holds blocks for decode and the two servers' frontends starve (prefill
  answers in 140-1000 ms instead of ~55 ms). Not a floor there, so it is left out of the
  default run until that is understood.

Workloads (streaming completions, fixed prompt and output lengths, `ignore_eos`): concurrency 1
(added latency), concurrency 8 (throughput), and a Poisson rate sweep (goodput under SLOs). With
`--mix` the mixed workload runs instead: warm-up requests of the mix (not counted), N requests at
a Poisson rate, and the mix in a rate sweep (goodput); figures per class and overall
(`side_by_side_workloads`). Every number comes from `python -m serve_app.bench`, whose exact
commands are written next to results.

Extra systems: `--extra-system LABEL=CONFIG` (repeatable) adds this app served from another serve
config, started exactly like `pd` (e.g. `pd-nocond=configs/local-cpu-nocond.yaml`); it joins the
rounds after the `--systems` (unless named there) and is checked against the targets like `pd`.

Rounds: on a small shared machine one run of a system can differ from the next run of the same
system by 20-40%, more than the systems differ. So every system runs `--rounds` times,
interleaved and in a rotated order (round 1: A B C, round 2: B C A, ...), so slow phases of the
machine hit every system; each round's files go to `rounds/`, and the compared files are the
rounds pooled (`pool`). The summary shows the headline figures round by round and pooled, and
checks the project's targets (`verdict`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from serve_app.bench import cpu_time
from serve_app.bench.launch_common import INGRESS_PORT, load_serve_yaml, model_source
from serve_app.bench.pool import pool_results
from serve_app.bench.records import RECORDS_SUFFIX, save_json
from serve_app.bench.side_by_side_workloads import (
    add_workload_args,
    check_workload_args,
    describe_workload,
    round_path,
    workload_kinds,
    workload_steps,
)
from serve_app.bench.verdict import (
    MIXED_KINDS,
    load_figures,
    load_mixed_figures,
    mixed_rounds_table,
    mixed_target_lines,
    rounds_table,
    target_lines,
)

ROOT = Path(__file__).resolve().parents[2]
PORT = 8000
LABEL_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Preset:
    """The serve configs of one machine kind; the model is the pd config's."""

    name: str
    pd_config: str
    unified_config: str
    machine: str


PRESETS = {
    preset.name: preset
    for preset in (
        Preset("cpu", "configs/local-cpu.yaml", "configs/unified-cpu.yaml",
               "CPU only: the embedded tiny random-weight Llama"),
        Preset("h100-llama3.1-8b", "configs/h100-llama3.1-8b-pd.yaml",
               "configs/h100-llama3.1-8b-unified.yaml",
               "one H100 80GB: Llama 3.1 8B Instruct, the two engines under CUDA MPS"),
    )
}


@dataclass(frozen=True)
class Setup:
    """What every system of one side-by-side serves: the two configs and the model in them."""

    pd_config: Path
    unified_config: Path
    model_source: str
    model_name: str


@dataclass(frozen=True)
class System:
    label: str
    argv: list[str]
    description: str
    is_serve: bool = True
    """A Ray Serve app: with `--via ingress`, measured at its ingress replica's own port."""


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return probe.returncode == 0 and "GPU" in probe.stdout


def default_preset() -> str:
    """A real architecture where there is a GPU, the embedded tiny model elsewhere."""
    return "h100-llama3.1-8b" if has_gpu() else "cpu"


def prepare_setup(preset: Preset, model: str | None, out: Path) -> Setup:
    """The preset's configs, or copies of them in `out/configs/` serving `model` instead."""
    pd_config, unified_config = ROOT / preset.pd_config, ROOT / preset.unified_config
    if model is not None:
        pd_config = _with_model(pd_config, model_source(model), out / "configs")
        unified_config = _with_model(unified_config, model_source(model), out / "configs")
    model_cfg = load_serve_yaml(pd_config)["applications"][0]["args"]["model"]
    source = model_cfg["source"]
    if not Path(source).is_absolute() and (ROOT / source).exists():
        source = str(ROOT / source)  # a preset's folder is relative to the repository
    return Setup(pd_config, unified_config, source, model_cfg.get("served_model_name") or source)


def _with_model(config: Path, source: str, folder: Path) -> Path:
    data = load_serve_yaml(config)
    for app in data["applications"]:
        app["args"]["model"] = {**app["args"].get("model", {}), "source": source}
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / config.name
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def systems(setup: Setup) -> dict[str, System]:
    py = sys.executable
    launcher_args = ["--port", str(PORT), "--model", setup.model_source,
                     "--served-model-name", setup.model_name, "--config", str(setup.pd_config)]
    return {
        s.label: s
        for s in (
            System("unified", ["scripts/serve-local", str(setup.unified_config)],
                   "one vLLM engine, chunked prefill, behind this app's Router"),
            System("pd", ["scripts/serve-local", str(setup.pd_config)],
                   "this app: Router -> PrefillServer -> DecodeServer, NIXL handoff"),
            System("ray-pd", [py, "-m", "serve_app.bench.ray_llm_pd", *launcher_args],
                   "Ray Serve LLM build_pd_openai_app, same engines and NIXL settings"),
            System("direct", [py, "-m", "serve_app.bench.direct_pd", *launcher_args],
                   "two vLLM OpenAI servers + a bare proxy (floor for router overhead)",
                   is_serve=False),
        )
    }


def extra_systems(
    specs: list[str], model: str | None, out: Path, taken: list[str]
) -> dict[str, System]:
    """`LABEL=CONFIG` -> this app served from CONFIG (with `model` in a copy of it, as the
    presets get), started like `pd`. Raises ValueError naming the bad spec."""
    extra: dict[str, System] = {}
    for spec in specs:
        label, sep, path_text = spec.partition("=")
        label = label.strip()
        if not sep or not LABEL_PATTERN.fullmatch(label) or not path_text.strip():
            raise ValueError(f"--extra-system must look like LABEL=CONFIG, got {spec!r}")
        if label in (*taken, *extra):
            raise ValueError(f"--extra-system {spec!r}: label {label!r} is already taken")
        config = Path(path_text.strip())
        config = config if config.is_absolute() or config.exists() else ROOT / config
        _check_serve_config(spec, config)
        if model is not None:
            config = _with_model(config, model_source(model), out / "configs" / label)
        extra[label] = System(label, ["scripts/serve-local", str(config.resolve())],
                              f"this app served from `{_shown(config.resolve())}`")
    return extra


def _check_serve_config(spec: str, config: Path) -> None:
    """Fail before any system starts: a config that cannot be read, or that serves elsewhere."""
    from serve_app.config import AppConfig

    try:
        data = load_serve_yaml(config)
        AppConfig.model_validate(data["applications"][0].get("args") or {})
    except Exception as exc:  # any unreadable or invalid config: the message says which
        raise ValueError(f"--extra-system {spec!r}: {config} is not a valid serve config: "
                         f"{str(exc).splitlines()[0]}") from exc
    port = (data.get("http_options") or {}).get("port", PORT)
    if port != PORT:
        raise ValueError(f"--extra-system {spec!r}: {config} serves on port {port}; the "
                         f"side-by-side talks to {PORT}")


def base_url(system: System, via: str) -> str:
    """Where the workloads go: the Serve app's ingress replica itself (Serve's direct ingress,
    as `make run` serves), or Serve's HTTP proxy (`--via proxy`)."""
    is_direct = via == "ingress" and system.is_serve
    return f"http://127.0.0.1:{INGRESS_PORT if is_direct else PORT}"


def system_env(via: str) -> dict[str, str]:
    """The launched system's environment: Serve's throughput mode on (as `scripts/serve-local`
    and `launch_common.set_local_env` set it) or, with `--via proxy`, off."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1" if via == "ingress" else "0"
    return env


def start(system: System, log_path: Path, timeout_s: float, via: str = "ingress"
          ) -> subprocess.Popen:
    env = system_env(via)
    log = log_path.open("w")
    proc = subprocess.Popen(system.argv, cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{system.label} exited early; see {log_path}")
        if _models_ready(base_url(system, via)):
            return proc
        time.sleep(3)
    stop(proc)
    raise TimeoutError(f"{system.label} did not answer in {timeout_s:.0f} s; see {log_path}")


def _models_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the system's process group leader, then SIGKILL the group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(3)  # let Ray's workers go before the next system binds the same ports


def bench(args: list[str], log: Path) -> list[str]:
    command = [sys.executable, "-m", "serve_app.bench", *args]
    with log.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)
    return command


def round_order(labels: list[str], round_no: int) -> list[str]:
    """Round 1 keeps the given order, each later round starts one system further on."""
    shift = (round_no - 1) % len(labels)
    return labels[shift:] + labels[:shift]


def run_workloads(
    system: System, opts: argparse.Namespace, setup: Setup, round_no: int
) -> list[list[str]]:
    """Every workload on the running system; returns the saved runs' bench commands."""
    label = system.label
    log = opts.out / "rounds" / f"{label}.r{round_no}.bench.log"
    log.write_text("")
    steps = workload_steps(label, opts, base_url(system, opts.via), setup.model_name,
                           setup.model_source, round_no)
    commands: list[list[str]] = []
    usage: dict[str, dict[str, object]] = {}
    for step in steps:
        if step.kind is None:
            bench(step.args, log)  # a warm-up: neither timed nor returned
            continue
        before, started = cpu_time.snapshot(), time.monotonic()
        command = bench(step.args, log)
        wall_s = time.monotonic() - started
        cpu_s = cpu_time.cpu_by_group(before, cpu_time.snapshot())
        num_requests = cpu_time.count_requests(round_path(opts.out, label, step.kind, round_no))
        usage[step.kind] = {"wall_s": round(wall_s, 3), "requests": num_requests, "cpu_s": cpu_s}
        commands.append(command)
    cpu_time.cpu_path(opts.out, label, round_no).write_text(json.dumps(usage, indent=2))
    return commands


def pooled_path(out: Path, label: str, kind: str) -> Path:
    return out / f"{label}-{kind}{RECORDS_SUFFIX}"


def pool_rounds(labels: list[str], out: Path, num_rounds: int, kinds: tuple[str, ...]) -> None:
    """`LABEL-KIND.json.gz` from the rounds' `rounds/LABEL-KIND.rN.json.gz`."""
    for label in labels:
        for kind in kinds:
            paths = [round_path(out, label, kind, n) for n in range(1, num_rounds + 1)]
            save_json(pooled_path(out, label, kind), pool_results(paths))


def headline(
    labels: list[str], out: Path, num_rounds: int, kinds: tuple[str, ...], apps: list[str]
) -> tuple[str, list[str]]:
    """The per-round figures table and the target verdicts (on the pooled figures); `apps` are
    the labels checked as this app in a mixed workload (`pd` and the extra systems)."""
    columns = [f"round {n}" for n in range(1, num_rounds + 1)] + ["pooled"]
    is_mixed = kinds == MIXED_KINDS
    load = load_mixed_figures if is_mixed else load_figures
    figures = {}
    for label in labels:
        files = [{kind: round_path(out, label, kind, n) for kind in kinds}
                 for n in range(1, num_rounds + 1)]
        files.append({kind: pooled_path(out, label, kind) for kind in kinds})
        figures[label] = [load(f) for f in files]
    pooled = {label: f[-1] for label, f in figures.items()}
    if is_mixed:
        return mixed_rounds_table(figures, columns), mixed_target_lines(pooled, labels[0], apps)
    return rounds_table(figures, labels[0], columns), target_lines(pooled, labels[0])


def report(
    labels: list[str], out: Path, commands: dict[str, list[list[str]]], argv: list[str],
    kinds: tuple[str, ...],
):
    baseline = labels[0]
    sections = []
    for kind in kinds:
        files = [str(pooled_path(out, label, kind)) for label in labels]
        table = subprocess.run(
            [sys.executable, "-m", "serve_app.bench", "compare", *files, "--baseline", baseline],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout
        sections.append((kind, table))
    subprocess.run(
        [sys.executable, "-m", "serve_app.bench", "plot",  # the sweep kind is the last one
         *[str(pooled_path(out, label, kinds[-1])) for label in labels],
         "--out", str(out / "plots")],
        cwd=ROOT, check=True, capture_output=True,
    )
    commands_file = out / "commands.json"
    earlier = json.loads(commands_file.read_text()) if commands_file.exists() else {}
    commands_file.write_text(json.dumps({**earlier, "side_by_side": argv, **commands}, indent=2))
    return sections


def write_summary(
    opts: argparse.Namespace, setup: Setup, sections, argv: list[str], headlines,
    catalog: dict[str, System], labels: list[str], cpu: str = "",
) -> None:
    out = opts.out
    titles = {"c1": "Concurrency 1 (added latency)", "c8": "Concurrency 8 (throughput)",
              "sweep": "Rate sweep (highest rate; goodput in the sweep files)",
              "mixed": f"Mixed workload at {opts.mixed_rate:g} req/s (overall and per class)",
              "mixed-sweep": "Mixed workload, rate sweep (highest rate; goodput in the sweep "
              "files)"}
    lines = [
        "# Side-by-side benchmark", "",
        f"Command: `python -m serve_app.bench.side_by_side {' '.join(argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Preset: `{opts.preset}` ({PRESETS[opts.preset].machine}); model `{setup.model_name}`; "
        f"configs `{_shown(setup.pd_config)}`, `{_shown(setup.unified_config)}`  ",
        f"{describe_workload(opts)} {opts.rounds} round(s), systems interleaved (rotated order "
        "each round); tables below pool every round's requests. Ratios are each system over "
        "the first one.", "",
        "Systems:", *[f"- `{label}`: {catalog[label].description}" for label in labels], "",
    ]
    table, verdicts = headlines
    if verdicts:
        lines += ["## Targets (pooled)", "", *verdicts, ""]
    lines += ["## Headline figures, round by round", "", "```", table.rstrip(), "```", ""]
    for kind, table in sections:
        lines += [f"## {titles[kind]}", "", "```", table.rstrip(), "```", ""]
    if cpu:
        lines += ["## CPU per request, by process group (every round pooled)", "",
                  "Read from `/proc` around each measured workload (`serve_app/bench/cpu_time.py`"
                  "): `engine` vLLM's EngineCore and workers, `request path` Serve's replicas "
                  "(Router, servers with vLLM's frontends) and proxy, `ray` Ray's own "
                  "processes, `client` the benchmark client.", "", "```", cpu.rstrip(), "```",
                  ""]
    kinds = workload_kinds(opts)
    per_class = " (and per class, `*_CLASS.png`)" if opts.mix else ""
    lines += [f"Plots: `plots/` (pooled){per_class}. Raw per-request records: "
              + ", ".join(f"`*-{kind}{RECORDS_SUFFIX}`" for kind in kinds)
              + " (pooled, with each round's summary under `rounds`) and "
              "`rounds/` (each round's own files and bench logs). Exact bench commands: "
              "`commands.json`.", ""]
    (out / "README.md").write_text("\n".join(lines))


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: bench/results/PRESET)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="configs and model (default: h100-llama3.1-8b where nvidia-smi "
                        "lists a GPU, else cpu)")
    parser.add_argument("--model", default=None,
                        help="serve this model (local path or id) instead of the preset's, in "
                        "every system; the configs are copied into OUT/configs with it")
    parser.add_argument("--systems", default="unified,pd,ray-pd",
                        help="comma-separated, first is the baseline of the ratios; `direct` "
                        "is opt-in (see the module docstring)")
    parser.add_argument("--extra-system", action="append", default=[], metavar="LABEL=CONFIG",
                        help="also run this app from another serve config, started like `pd` "
                        "(repeatable), e.g. pd-nocond=configs/local-cpu-nocond.yaml")
    add_workload_args(parser)
    parser.add_argument("--via", choices=("ingress", "proxy"), default="ingress",
                        help="send the workloads to each Serve app's ingress replica itself "
                        "(Ray Serve's throughput mode with direct ingress, as `make run` "
                        "serves; the default) or through Serve's HTTP proxy (that mode off)")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every system, interleaved; results are pooled")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep a round of a system from an earlier run of the same command")
    return parser


@dataclass(frozen=True)
class Plan:
    """What one side-by-side does: its options, configs, systems (run in `labels` order) and
    workload kinds."""

    opts: argparse.Namespace
    setup: Setup
    catalog: dict[str, System]
    labels: list[str]
    extra_labels: list[str]
    kinds: tuple[str, ...]


def parse_plan(argv: list[str]) -> Plan:
    """The options checked together; a bad one exits with a usage error naming it."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    opts.preset = opts.preset or default_preset()
    opts.out = opts.out or ROOT / "bench" / "results" / opts.preset
    setup = prepare_setup(PRESETS[opts.preset], opts.model, opts.out)
    catalog = systems(setup)
    try:
        check_workload_args(opts)
        extra = extra_systems(opts.extra_system, opts.model, opts.out, list(catalog))
    except ValueError as exc:
        parser.error(str(exc))
    catalog |= extra
    labels = opts.systems.split(",")
    labels += [label for label in extra if label not in labels]
    unknown = [label for label in labels if label not in catalog]
    if unknown or opts.rounds < 1:
        parser.error(f"--systems: unknown {unknown}, known {sorted(catalog)}" if unknown
                     else f"--rounds must be at least 1, got {opts.rounds}")
    return Plan(opts, setup, catalog, labels, list(extra), workload_kinds(opts))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = parse_plan(argv)
    opts, setup, labels, kinds = plan.opts, plan.setup, plan.labels, plan.kinds
    (opts.out / "rounds").mkdir(parents=True, exist_ok=True)
    commands: dict[str, list[list[str]]] = {}
    for round_no in range(1, opts.rounds + 1):
        for label in round_order(labels, round_no):
            tag = f"[{label} round {round_no}/{opts.rounds}]"
            if opts.skip_existing and all(
                round_path(opts.out, label, kind, round_no).exists() for kind in kinds
            ):
                print(f"{tag} results exist, not rerun (--skip-existing)", flush=True)
                continue
            system = plan.catalog[label]
            print(f"{tag} starting: {' '.join(system.argv)}", flush=True)
            log = opts.out / "rounds" / f"{label}.r{round_no}.server.log"
            proc = start(system, log, opts.start_timeout_s, opts.via)
            try:
                print(f"{tag} running workloads", flush=True)
                commands[label] = run_workloads(system, opts, setup, round_no)
            finally:
                stop(proc)
    pool_rounds(labels, opts.out, opts.rounds, kinds)
    sections = report(labels, opts.out, commands, argv, kinds)
    headlines = headline(labels, opts.out, opts.rounds, kinds, ["pd", *plan.extra_labels])
    cpu = cpu_time.tables(labels, opts.out, opts.rounds, kinds)
    write_summary(opts, setup, sections, argv, headlines, plan.catalog, labels, cpu)
    for kind, table in sections:
        print(f"\n== {kind} ==\n{table}")
    print("\n== round by round ==\n" + headlines[0])
    print("\n".join(headlines[1]))
    print("\n== CPU per request ==\n" + cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
