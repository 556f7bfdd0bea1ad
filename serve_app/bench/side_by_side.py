"""Start each system in turn on this machine, run the same workloads on each, compare.

    python -m serve_app.bench.side_by_side --out bench/results/cpu

Systems (each serves the same model on http://127.0.0.1:PORT and is stopped, by PID, before the
next one starts, so they never compete for the machine):

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
(added latency), concurrency 8 (throughput), and a Poisson rate sweep (goodput under SLOs). Every
number comes from `python -m serve_app.bench`, whose exact commands are written next to results.

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
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from serve_app.bench.launch_common import load_serve_yaml, model_source
from serve_app.bench.pool import pool_results
from serve_app.bench.records import save_json
from serve_app.bench.verdict import KINDS, load_figures, rounds_table, target_lines

ROOT = Path(__file__).resolve().parents[2]
PORT = 8000


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
                   "two vLLM OpenAI servers + a bare proxy (floor for router overhead)"),
        )
    }


def start(system: System, log_path: Path, timeout_s: float) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = log_path.open("w")
    proc = subprocess.Popen(system.argv, cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{system.label} exited early; see {log_path}")
        if _models_ready():
            return proc
        time.sleep(3)
    stop(proc)
    raise TimeoutError(f"{system.label} did not answer in {timeout_s:.0f} s; see {log_path}")


def _models_ready() -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=2).status_code == 200
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


def round_path(out: Path, label: str, kind: str, round_no: int) -> Path:
    return out / "rounds" / f"{label}-{kind}.r{round_no}.json"


def round_order(labels: list[str], round_no: int) -> list[str]:
    """Round 1 keeps the given order, each later round starts one system further on."""
    shift = (round_no - 1) % len(labels)
    return labels[shift:] + labels[:shift]


def run_workloads(
    label: str, opts: argparse.Namespace, setup: Setup, round_no: int
) -> list[list[str]]:
    out = opts.out
    common = [
        "--base-url", f"http://127.0.0.1:{PORT}", "--model", setup.model_name,
        "--input-len", str(opts.input_len), "--output-len", str(opts.output_len),
        "--tokenizer", setup.model_source, "--label", label, "--no-progress",
        "--slo-ttft-ms", str(opts.slo_ttft_ms), "--slo-tpot-ms", str(opts.slo_tpot_ms),
    ]
    log = out / "rounds" / f"{label}.r{round_no}.bench.log"
    log.write_text("")
    bench(["run", *common, "--concurrency", "2", "--num-requests", "6"], log)  # warm-up
    return [
        bench(["run", *common, "--concurrency", "1", "--num-requests", str(opts.num_c1),
               "--save", str(round_path(out, label, "c1", round_no))], log),
        bench(["run", *common, "--concurrency", "8", "--num-requests", str(opts.num_c8),
               "--save", str(round_path(out, label, "c8", round_no))], log),
        bench(["sweep", *common, "--rates", opts.rates, "--num-requests", str(opts.num_per_rate),
               "--save", str(round_path(out, label, "sweep", round_no))], log),
    ]


def pool_rounds(labels: list[str], out: Path, num_rounds: int) -> None:
    """`LABEL-KIND.json` from the rounds' `rounds/LABEL-KIND.rN.json`."""
    for label in labels:
        for kind in KINDS:
            paths = [round_path(out, label, kind, n) for n in range(1, num_rounds + 1)]
            save_json(out / f"{label}-{kind}.json", pool_results(paths))


def headline(labels: list[str], out: Path, num_rounds: int) -> tuple[str, list[str]]:
    """The per-round figures table and the target verdicts (on the pooled figures)."""
    columns = [f"round {n}" for n in range(1, num_rounds + 1)] + ["pooled"]
    figures = {}
    for label in labels:
        files = [{kind: round_path(out, label, kind, n) for kind in KINDS}
                 for n in range(1, num_rounds + 1)]
        files.append({kind: out / f"{label}-{kind}.json" for kind in KINDS})
        figures[label] = [load_figures(f) for f in files]
    table = rounds_table(figures, labels[0], columns)
    verdicts = target_lines({label: f[-1] for label, f in figures.items()}, labels[0])
    return table, verdicts


def report(labels: list[str], out: Path, commands: dict[str, list[list[str]]], argv: list[str]):
    baseline = labels[0]
    sections = []
    for kind in KINDS:
        files = [str(out / f"{label}-{kind}.json") for label in labels]
        table = subprocess.run(
            [sys.executable, "-m", "serve_app.bench", "compare", *files, "--baseline", baseline],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout
        sections.append((kind, table))
    subprocess.run(
        [sys.executable, "-m", "serve_app.bench", "plot",
         *[str(out / f"{label}-sweep.json") for label in labels], "--out", str(out / "plots")],
        cwd=ROOT, check=True, capture_output=True,
    )
    commands_file = out / "commands.json"
    earlier = json.loads(commands_file.read_text()) if commands_file.exists() else {}
    commands_file.write_text(json.dumps({**earlier, "side_by_side": argv, **commands}, indent=2))
    return sections


def write_summary(
    opts: argparse.Namespace, setup: Setup, sections, argv: list[str], headlines
) -> None:
    out = opts.out
    titles = {"c1": "Concurrency 1 (added latency)", "c8": "Concurrency 8 (throughput)",
              "sweep": "Rate sweep (highest rate; goodput in the sweep files)"}
    lines = [
        "# Side-by-side benchmark", "",
        f"Command: `python -m serve_app.bench.side_by_side {' '.join(argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Preset: `{opts.preset}` ({PRESETS[opts.preset].machine}); model `{setup.model_name}`; "
        f"configs `{_shown(setup.pd_config)}`, `{_shown(setup.unified_config)}`  ",
        f"Workload: {opts.input_len}-token prompts, {opts.output_len} output tokens (ignore_eos), "
        f"streaming /v1/completions; SLO TTFT {opts.slo_ttft_ms} ms, "
        f"TPOT {opts.slo_tpot_ms} ms. {opts.rounds} round(s), systems interleaved (rotated order "
        "each round); tables below pool every round's requests. Ratios are each system over "
        "the first one.", "",
        "Systems:", *[f"- `{s.label}`: {s.description}" for s in systems(setup).values()
                      if s.label in opts.systems.split(",")], "",
    ]
    table, verdicts = headlines
    if verdicts:
        lines += ["## Targets (pooled)", "", *verdicts, ""]
    lines += ["## Headline figures, round by round", "", "```", table.rstrip(), "```", ""]
    for kind, table in sections:
        lines += [f"## {titles[kind]}", "", "```", table.rstrip(), "```", ""]
    lines += ["Plots: `plots/` (pooled). Raw per-request records: `*-c1.json`, `*-c8.json`, "
              "`*-sweep.json` (pooled, with each round's summary under `rounds`) and "
              "`rounds/` (each round's own files and bench logs). Exact bench commands: "
              "`commands.json`.", ""]
    (out / "README.md").write_text("\n".join(lines))


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-c1", type=int, default=30)
    parser.add_argument("--num-c8", type=int, default=80)
    parser.add_argument("--rates", default="2,4,8,16")
    parser.add_argument("--num-per-rate", type=int, default=40)
    parser.add_argument("--slo-ttft-ms", type=float, default=500.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0)
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every system, interleaved; results are pooled")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep a round of a system from an earlier run of the same command")
    opts = parser.parse_args(argv)
    opts.preset = opts.preset or default_preset()
    opts.out = opts.out or ROOT / "bench" / "results" / opts.preset
    setup = prepare_setup(PRESETS[opts.preset], opts.model, opts.out)
    catalog = systems(setup)
    labels = opts.systems.split(",")
    unknown = [label for label in labels if label not in catalog]
    if unknown or opts.rounds < 1:
        parser.error(f"--systems: unknown {unknown}, known {sorted(catalog)}" if unknown
                     else f"--rounds must be at least 1, got {opts.rounds}")
    (opts.out / "rounds").mkdir(parents=True, exist_ok=True)
    commands: dict[str, list[list[str]]] = {}
    for round_no in range(1, opts.rounds + 1):
        for label in round_order(labels, round_no):
            tag = f"[{label} round {round_no}/{opts.rounds}]"
            if opts.skip_existing and all(
                round_path(opts.out, label, kind, round_no).exists() for kind in KINDS
            ):
                print(f"{tag} results exist, not rerun (--skip-existing)", flush=True)
                continue
            system = catalog[label]
            print(f"{tag} starting: {' '.join(system.argv)}", flush=True)
            log = opts.out / "rounds" / f"{label}.r{round_no}.server.log"
            proc = start(system, log, opts.start_timeout_s)
            try:
                print(f"{tag} running workloads", flush=True)
                commands[label] = run_workloads(label, opts, setup, round_no)
            finally:
                stop(proc)
    pool_rounds(labels, opts.out, opts.rounds)
    sections = report(labels, opts.out, commands, argv)
    headlines = headline(labels, opts.out, opts.rounds)
    write_summary(opts, setup, sections, argv, headlines)
    for kind, table in sections:
        print(f"\n== {kind} ==\n{table}")
    print("\n== round by round ==\n" + headlines[0])
    print("\n".join(headlines[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
