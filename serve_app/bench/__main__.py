"""Command line: `python -m serve_app.bench {run,sweep,plot,compare,pool} ...`.

    python -m serve_app.bench run --model M --request-rate 4 --num-requests 200 \\
        --input-len 256 --output-len 32 --slo-ttft-ms 200 --slo-tpot-ms 50 --label pd --save pd.json
    python -m serve_app.bench sweep --model M --rates 1,2,4,8 --duration-s 60 \\
        --slo-ttft-ms 200 --slo-tpot-ms 50 --label pd --save pd_sweep.json
    python -m serve_app.bench sweep --model M --tokenizer models/tiny-llama --rates 2,4,6 \\
        --mix chat:0.8:64:128,doc:0.2:1700:8 --num-requests 100 --slo-ttft-ms 300 \\
        --slo-tpot-ms 25 --class-slo doc:1500:- --label pd --save pd_mixed.json
    python -m serve_app.bench plot pd_sweep.json unified_sweep.json --out plots/
    python -m serve_app.bench compare unified_sweep.json pd_sweep.json --baseline unified
    python -m serve_app.bench pool pd.r1.json pd.r2.json pd.r3.json --save pd.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import shlex
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from serve_app.bench.cli import build_configs, build_load, build_parser, build_slo, check_args
from serve_app.bench.records import rate_to_json, run_payload, save_json
from serve_app.bench.runner import run_load
from serve_app.bench.stats import SLO, summarize
from serve_app.bench.workload import make_prompt_source

SECRET_FLAGS = ("--api-key",)


def results_header(args: argparse.Namespace, kind: str, argv: Sequence[str]) -> dict[str, Any]:
    client, workload, slo = build_configs(args)
    return {
        "kind": kind,
        "label": args.label or urlparse(args.base_url).netloc,
        "command": redacted_command(argv),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "config": {
            "client": client.to_json(),
            "workload": dataclasses.asdict(workload),
            "slo": slo.to_json(),
            "args": {
                key: _arg_to_json(value) for key, value in vars(args).items() if key != "api_key"
            },
        },
    }


def _arg_to_json(value: Any) -> Any:
    """An argument as saved with results: infinite rates as null, parsed classes and SLOs as
    objects."""
    if isinstance(value, float):
        return rate_to_json(value)
    if isinstance(value, SLO):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_arg_to_json(item) for item in value]
    return value


def redacted_command(argv: Sequence[str]) -> str:
    words = ["python", "-m", "serve_app.bench"]
    hide_next = False
    for word in argv:
        if hide_next:
            word, hide_next = "***", False
        elif word in SECRET_FLAGS:
            hide_next = True
        elif word.startswith(tuple(flag + "=" for flag in SECRET_FLAGS)):
            word = word.split("=", 1)[0] + "=***"
        words.append(word)
    return shlex.join(words)


def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from serve_app.bench.report import format_summary

    client, workload, slo = build_configs(args)
    load = build_load(args, args.request_rate)
    header = results_header(args, "run", argv)
    header["config"]["load"] = load.to_json()
    outcome = asyncio.run(run_load(client, load, make_prompt_source(workload)))
    summary = summarize(outcome.records, outcome.duration_s, slo)
    print(format_summary(summary))
    if args.save:
        save_json(
            args.save,
            {
                **header,
                **run_payload(args.request_rate, outcome.duration_s, summary, outcome.records),
            },
        )
        print(f"saved {args.save}")
    return 0 if summary["num_completed"] else 1


def cmd_sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from serve_app.bench.report import format_sweep
    from serve_app.bench.sweep import SweepRun, run_sweep

    client, workload, slo = build_configs(args)
    load = build_load(args, min(args.rates))
    header = results_header(args, "sweep", argv)
    header["config"]["load"] = {**load.to_json(), "request_rate": args.rates}

    def on_run(run: SweepRun) -> None:
        print(format_sweep([(run.request_rate, run.summary)], None), flush=True)

    outcome = asyncio.run(
        run_sweep(
            client,
            load,
            make_prompt_source(workload),
            args.rates,
            slo,
            target=args.attainment_target,
            cooldown_s=args.cooldown_s,
            num_bisect_steps=args.bisect_steps,
            on_run=on_run,
        )
    )
    print(format_sweep([(run.request_rate, run.summary) for run in outcome.runs], outcome.goodput))
    if args.save:
        goodput = outcome.goodput.to_json() if outcome.goodput else None
        runs = [run.to_json() for run in outcome.runs]
        save_json(args.save, {**header, "goodput": goodput, "runs": runs})
        print(f"saved {args.save}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from serve_app.bench.plots import plot_results

    slo = build_slo(args)
    for path in plot_results(args.results, args.out, slo, args.attainment_target, args.cdf_rate):
        print(path)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from serve_app.bench.compare import load_summaries, print_comparison

    summaries = load_summaries(args.results, args.rate)
    print_comparison(summaries, args.baseline or next(iter(summaries)))
    return 0


def cmd_pool(args: argparse.Namespace) -> int:
    from serve_app.bench.pool import pool_results

    save_json(args.save, pool_results(args.results))
    print(f"saved {args.save}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(__doc__ or "")
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "run":
        return cmd_run(args, argv)
    if args.command == "sweep":
        return cmd_sweep(args, argv)
    if args.command == "plot":
        return cmd_plot(args)
    if args.command == "pool":
        return cmd_pool(args)
    return cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
