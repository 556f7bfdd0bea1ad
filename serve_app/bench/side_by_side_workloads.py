"""What the side-by-side runs on each system: the `python -m serve_app.bench` arguments of every
workload, uniform or mixed. Pure: it builds argument lists and starts nothing.

Uniform (the default): fixed prompt and output lengths; a warm-up (6 requests, 2 at a time, not
saved), then concurrency 1 (`c1`), concurrency 8 (`c8`) and a Poisson rate sweep (`sweep`).

Mixed (`--mix`): the classes of `serve_app.bench --mix`, exact lengths with the served model's
tokenizer; a warm-up of `--num-warmup` requests of the mix at `--mixed-rate` (other prompts: seed
1, not saved), then `--num-mixed` requests at Poisson `--mixed-rate` (`mixed`) and the mix at
every rate of `--rates` (`mixed-sweep`, for goodput). `--class-slo` gives a class other limits.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from serve_app.bench.cli import parse_class_slo
from serve_app.bench.records import RECORDS_SUFFIX
from serve_app.bench.verdict import KINDS, MIXED_KINDS
from serve_app.bench.workload import parse_mix

WARMUP_SEED = 1  # the measured runs use seed 0: the warm-up sends other prompts


@dataclass(frozen=True)
class BenchStep:
    """One `python -m serve_app.bench` call; `kind` None is a warm-up (nothing saved)."""

    kind: str | None
    args: list[str]


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    uniform = parser.add_argument_group("uniform workloads (without --mix)")
    uniform.add_argument("--input-len", type=int, default=256)
    uniform.add_argument("--output-len", type=int, default=32)
    uniform.add_argument("--num-c1", type=int, default=30)
    uniform.add_argument("--num-c8", type=int, default=80)
    mixed = parser.add_argument_group("mixed workload")
    mixed.add_argument(
        "--mix", type=_mix_spec, metavar="SPEC",
        help="run the mixed workload instead of the uniform ones: name:weight:input_len:"
        "output_len[,...] or a .json file (see `python -m serve_app.bench run --help`)",
    )
    mixed.add_argument("--num-warmup", type=int, default=60, help="warm-up requests of the mix")
    mixed.add_argument("--num-mixed", type=int, default=200, help="measured requests of the mix")
    mixed.add_argument("--mixed-rate", type=float, default=6.0, help="their Poisson rate (req/s)")
    mixed.add_argument(
        "--class-slo", type=_class_slo_spec, action="append", default=[],
        metavar="NAME:TTFT_MS:TPOT_MS", help="other SLO limits for one class (repeatable)",
    )
    both = parser.add_argument_group("rate sweep and SLO (both workloads)")
    both.add_argument("--rates", default="2,4,8,16")
    both.add_argument("--num-per-rate", type=int, default=40)
    both.add_argument(
        "--seconds-per-rate", type=float, default=None,
        help="send each rate of the sweep for this long instead of --num-per-rate requests: "
        "a short burst at a rate says little about whether a system sustains it",
    )
    both.add_argument("--slo-ttft-ms", type=float, default=500.0)
    both.add_argument("--slo-tpot-ms", type=float, default=50.0)


def check_workload_args(opts: argparse.Namespace) -> None:
    """Raises ValueError naming the option when the workload options do not fit together."""
    if opts.class_slo and not opts.mix:
        raise ValueError("--class-slo needs --mix")
    if opts.mix:
        names = {mix_class.name for mix_class in parse_mix(opts.mix)}
        unknown = sorted({spec.split(":")[0].strip() for spec in opts.class_slo} - names)
        if unknown:
            raise ValueError(f"--class-slo names {', '.join(unknown)}, not a class of --mix "
                             f"({', '.join(sorted(names))})")
    counts = {"--num-mixed": opts.num_mixed, "--num-per-rate": opts.num_per_rate}
    counts |= {"--num-c1": opts.num_c1, "--num-c8": opts.num_c8}
    for flag, value in counts.items():
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if opts.seconds_per_rate is not None and not opts.seconds_per_rate > 0:
        raise ValueError(f"--seconds-per-rate must be > 0, got {opts.seconds_per_rate}")
    if opts.num_warmup < 0:
        raise ValueError(f"--num-warmup must be at least 0, got {opts.num_warmup}")
    if not opts.mixed_rate > 0:
        raise ValueError(f"--mixed-rate must be > 0, got {opts.mixed_rate}")


def workload_kinds(opts: argparse.Namespace) -> tuple[str, ...]:
    return MIXED_KINDS if opts.mix else KINDS


def round_path(out: Path, label: str, kind: str, round_no: int) -> Path:
    return out / "rounds" / f"{label}-{kind}.r{round_no}{RECORDS_SUFFIX}"


def workload_steps(
    label: str, opts: argparse.Namespace, base_url: str, model_name: str, tokenizer: str,
    round_no: int,
) -> list[BenchStep]:
    """Every bench call of one system in one round, warm-up first."""
    common = [
        "--base-url", base_url, "--model", model_name, "--tokenizer", tokenizer,
        "--label", label, "--no-progress",
        "--slo-ttft-ms", str(opts.slo_ttft_ms), "--slo-tpot-ms", str(opts.slo_tpot_ms),
    ]

    def save(kind: str) -> list[str]:
        return ["--save", str(round_path(opts.out, label, kind, round_no))]

    per_rate = (["--duration-s", f"{opts.seconds_per_rate:g}"] if opts.seconds_per_rate
                else ["--num-requests", str(opts.num_per_rate)])

    if not opts.mix:
        common += ["--input-len", str(opts.input_len), "--output-len", str(opts.output_len)]
        return [
            BenchStep(None, ["run", *common, "--concurrency", "2", "--num-requests", "6"]),
            BenchStep("c1", ["run", *common, "--concurrency", "1",
                             "--num-requests", str(opts.num_c1), *save("c1")]),
            BenchStep("c8", ["run", *common, "--concurrency", "8",
                             "--num-requests", str(opts.num_c8), *save("c8")]),
            BenchStep("sweep", ["sweep", *common, "--rates", opts.rates, *per_rate,
                                *save("sweep")]),
        ]
    common += ["--mix", opts.mix]
    common += [word for spec in opts.class_slo for word in ("--class-slo", spec)]
    rate = ["--request-rate", str(opts.mixed_rate)]
    steps = [BenchStep(None, ["run", *common, *rate, "--num-requests", str(opts.num_warmup),
                              "--seed", str(WARMUP_SEED)])] if opts.num_warmup else []
    return steps + [
        BenchStep("mixed", ["run", *common, *rate, "--num-requests", str(opts.num_mixed),
                            *save("mixed")]),
        BenchStep("mixed-sweep", ["sweep", *common, "--rates", opts.rates, *per_rate,
                                  *save("mixed-sweep")]),
    ]


def describe_workload(opts: argparse.Namespace) -> str:
    """The summary's sentence about the workload."""
    slo = f"SLO TTFT {opts.slo_ttft_ms:g} ms, TPOT {opts.slo_tpot_ms:g} ms"
    if not opts.mix:
        return (f"Workload: {opts.input_len}-token prompts, {opts.output_len} output tokens "
                f"(ignore_eos), streaming /v1/completions; {slo}.")
    per_rate = (f"{opts.seconds_per_rate:g} s of requests per rate" if opts.seconds_per_rate
                else f"{opts.num_per_rate} requests per rate")
    classes = parse_mix(opts.mix)
    total = sum(mix_class.weight for mix_class in classes)
    parts = [f"`{c.name}` {c.weight / total:.0%} ({c.input_len}-token prompts, {c.output_len} "
             "output tokens)" for c in classes]
    per_class = [f"`{spec}`" for spec in opts.class_slo]
    return (f"Workload: mix `{opts.mix}`: {', '.join(parts)}; exact lengths (the model's "
            f"tokenizer, ignore_eos), streaming /v1/completions. {opts.num_warmup} warm-up "
            f"requests (not counted), then {opts.num_mixed} at Poisson {opts.mixed_rate:g} req/s "
            f"(`mixed`), and a rate sweep {opts.rates} with {per_rate} (`mixed-sweep`, "
            f"goodput); {slo}"
            + (f", per class {', '.join(per_class)}" if per_class else "") + ".")


def _mix_spec(text: str) -> str:
    """Checked here, passed on as written (a .json path stays a path)."""
    try:
        parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _class_slo_spec(text: str) -> str:
    parse_class_slo(text)
    return text
