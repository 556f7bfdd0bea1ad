"""Argument parsing for `python -m serve_app.bench` and the configs built from the arguments."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from serve_app.bench.client import ENDPOINT_PATHS, ClientConfig
from serve_app.bench.runner import DEFAULT_NUM_REQUESTS, LoadConfig
from serve_app.bench.stats import SLO
from serve_app.bench.workload import (
    CLASS_NAME_PATTERN,
    MixClass,
    WorkloadConfig,
    parse_len_range,
    parse_mix,
)

DEFAULT_OUTPUT_LEN = 32


def add_load_args(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000")
    server.add_argument("--model", required=True, help="model name sent in each request")
    server.add_argument("--endpoint", choices=tuple(ENDPOINT_PATHS), default="completions")
    server.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY); never saved",
    )
    server.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    server.add_argument("--temperature", type=float, default=0.0)
    server.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let the model stop early (default: exact output lengths)",
    )
    server.add_argument(
        "--extra-body",
        type=parse_json_object,
        default={},
        help="JSON object merged into every request body",
    )
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--input-len", type=int, default=256)
    prompts.add_argument(
        "--output-len",
        type=int,
        default=None,
        help=f"default {DEFAULT_OUTPUT_LEN}; with --dataset, overrides its lengths",
    )
    prompts.add_argument("--input-len-range", type=parse_len_range, metavar="A:B")
    prompts.add_argument("--output-len-range", type=parse_len_range, metavar="A:B")
    prompts.add_argument("--dataset", help="JSONL: ShareGPT rows or {prompt, output_len} rows")
    prompts.add_argument("--tokenizer", help="tokenizer path for exact synthetic prompt lengths")
    prompts.add_argument(
        "--mix",
        type=mix_arg,
        metavar="SPEC",
        help="mixed workload: name:weight:input_len:output_len[,...] (e.g. "
        "chat:0.8:64:128,doc:0.2:1700:8) or a .json file of such classes; each request draws "
        "its class from (seed, index); replaces --input-len/--output-len",
    )
    arrivals = parser.add_argument_group("arrivals")
    arrivals.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    arrivals.add_argument("--burstiness", type=float, default=1.0, help="gamma shape")
    arrivals.add_argument("--concurrency", type=int, help="max requests in flight")
    arrivals.add_argument(
        "--num-requests",
        type=int,
        help=f"per run (default {DEFAULT_NUM_REQUESTS} without --duration-s)",
    )
    arrivals.add_argument("--duration-s", type=float, help="stop releasing requests after this")
    arrivals.add_argument("--seed", type=int, default=0)
    add_slo_args(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--label", help="system name for plots and comparisons")
    output.add_argument("--save", help="results JSON path")
    output.add_argument("--no-progress", dest="show_progress", action="store_false")


def add_slo_args(parser: argparse.ArgumentParser) -> None:
    slo = parser.add_argument_group("SLO")
    slo.add_argument("--slo-ttft-ms", type=float)
    slo.add_argument("--slo-tpot-ms", type=float)
    slo.add_argument(
        "--class-slo",
        type=parse_class_slo,
        action="append",
        default=[],
        metavar="NAME:TTFT_MS:TPOT_MS",
        help="other limits for one class of --mix (repeatable); '-' keeps the overall limit, "
        "e.g. doc:2000:-",
    )


def mix_arg(text: str) -> tuple[MixClass, ...]:
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_class_slo(text: str) -> tuple[str, SLO]:
    """`"NAME:TTFT_MS:TPOT_MS"` -> (NAME, SLO); `-` (or nothing) leaves a limit to the overall."""
    fields = text.split(":")
    if len(fields) != 3 or not CLASS_NAME_PATTERN.fullmatch(fields[0].strip()):
        raise argparse.ArgumentTypeError(
            f"--class-slo must look like NAME:TTFT_MS:TPOT_MS (e.g. doc:2000:-), got {text!r}"
        )
    limits = []
    for field, value in zip(("TTFT_MS", "TPOT_MS"), fields[1:], strict=True):
        value = value.strip()
        if value in ("", "-"):
            limits.append(None)
            continue
        try:
            limit = float(value)
        except ValueError:
            limit = 0.0
        if not 0 < limit < math.inf:
            raise argparse.ArgumentTypeError(
                f"--class-slo {text!r}: {field} must be a number > 0 or '-', got {value!r}"
            )
        limits.append(limit)
    return fields[0].strip(), SLO(ttft_ms=limits[0], tpot_ms=limits[1])


def build_slo(args: argparse.Namespace) -> SLO:
    names = [name for name, _ in args.class_slo]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--class-slo: one entry per class, repeated: {', '.join(repeated)}")
    per_class = dict(args.class_slo)
    return SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, per_class=per_class)


def check_args(args: argparse.Namespace) -> None:
    """Arguments that parse one by one but not together; raises ValueError saying which."""
    if args.command == "plot":
        build_slo(args)
    if args.command not in ("run", "sweep"):
        return
    _, workload, slo = build_configs(args)
    known = {mix_class.name for mix_class in workload.mix or ()}
    unknown = sorted(set(slo.per_class) - known)
    if unknown:
        classes = ", ".join(sorted(known)) if known else "none: there is no --mix"
        raise ValueError(
            f"--class-slo names {', '.join(unknown)}, not a class of --mix ({classes})"
        )


def parse_json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def parse_rates(text: str) -> list[float]:
    rates = [float(part) for part in text.split(",") if part.strip()]
    if not rates or not all(0 < rate < math.inf for rate in rates):
        raise argparse.ArgumentTypeError(f"rates must be finite and > 0, got {text!r}")
    return rates


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.bench",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="one load run")
    add_load_args(run)
    run.add_argument("--request-rate", type=float, default=math.inf, help="req/s (default inf)")
    sweep = commands.add_parser("sweep", help="runs at several rates and the goodput")
    add_load_args(sweep)
    sweep.add_argument("--rates", type=parse_rates, required=True, help="e.g. 1,2,4,8")
    sweep.add_argument("--attainment-target", type=float, default=0.9)
    sweep.add_argument("--cooldown-s", type=float, default=0.0, help="pause between rates")
    sweep.add_argument(
        "--bisect-steps",
        type=int,
        default=0,
        help="extra runs bisecting between the last passing and first failing rate",
    )
    plot = commands.add_parser("plot", help="PNG plots from results files")
    plot.add_argument("results", nargs="+")
    plot.add_argument("--out", required=True, help="output directory")
    plot.add_argument("--attainment-target", type=float, default=0.9)
    plot.add_argument("--cdf-rate", type=float, help="rate of the run shown in the CDFs")
    add_slo_args(plot)
    compare = commands.add_parser("compare", help="side-by-side table of results files")
    compare.add_argument("results", nargs="+")
    compare.add_argument("--baseline", help="label to divide by (default: the first file's)")
    compare.add_argument("--rate", type=float, help="which run of a sweep (default: highest)")
    pool = commands.add_parser("pool", help="one results file from repeated rounds of a system")
    pool.add_argument("results", nargs="+", help="results files of one label and kind")
    pool.add_argument("--save", required=True, help="pooled results JSON path")
    return parser


def build_configs(args: argparse.Namespace) -> tuple[ClientConfig, WorkloadConfig, SLO]:
    client = ClientConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout_s,
        extra_body=args.extra_body,
        api_key=args.api_key,
    )
    workload = WorkloadConfig(
        input_len=args.input_len,
        output_len=args.output_len or DEFAULT_OUTPUT_LEN,
        input_len_range=args.input_len_range,
        output_len_range=args.output_len_range,
        dataset=args.dataset,
        is_output_len_forced=args.output_len is not None,
        tokenizer=args.tokenizer,
        seed=args.seed,
        mix=args.mix,
    )
    return client, workload, build_slo(args)


def build_load(args: argparse.Namespace, request_rate: float) -> LoadConfig:
    num_requests = args.num_requests
    if num_requests is None and args.duration_s is None:
        num_requests = DEFAULT_NUM_REQUESTS
    return LoadConfig(
        request_rate=request_rate,
        arrival=args.arrival,
        burstiness=args.burstiness,
        max_concurrency=args.concurrency,
        num_requests=num_requests,
        duration_s=args.duration_s,
        seed=args.seed,
        show_progress=args.show_progress,
    )
