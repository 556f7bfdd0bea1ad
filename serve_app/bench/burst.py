"""A burst: N completions at once, each client waiting at most T s; how each one ended.

    python -m serve_app.bench.burst --url http://127.0.0.1:8001 --url http://127.0.0.1:8000 \\
        --num-requests 2000 --rounds 2 --out bench/results/burst

Issue 11's test of admission control, as a measurement: every request should end as a 200 with
all its tokens or a 429/503 OpenAI error, none should time out, the shed ones should hear so
within a second, and the admitted ones should take at most twice an unloaded request. With two
`--url`s of one running app (the Router's own port and Serve's proxy, `make run`) the bursts
alternate between them, `--rounds` times each, so the machine's drift falls on both alike.
Writes `summary.json` (one entry per burst) and prints one line per burst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx


async def one(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, float]:
    """(status, seconds); status -1 for a client timeout, -2 for any other transport error."""
    started = time.monotonic()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            await response.read()
            return response.status, time.monotonic() - started
    except asyncio.TimeoutError:
        return -1, time.monotonic() - started
    except aiohttp.ClientError:
        return -2, time.monotonic() - started


async def burst(url: str, body: dict, num_requests: int, timeout_s: float) -> list[tuple[int, float]]:
    """All at once, one connection each. aiohttp (as `bench/client.py`): with httpx the client
    itself took a whole core for ~4 s to send 2,000 requests here, and the figures were its."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(*(one(session, url, body) for _ in range(num_requests)))


def unloaded_s(url: str, body: dict, num: int = 5) -> float:
    """The median of a few requests sent one at a time."""
    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(num):
            started = time.monotonic()
            client.post(f"{url}/v1/completions", json=body).raise_for_status()
            times.append(time.monotonic() - started)
    return statistics.median(times)


def summarize(url: str, results: list[tuple[int, float]], unloaded: float) -> dict[str, Any]:
    def p50_max(status: int) -> list[float] | None:
        times = sorted(t for s, t in results if s == status)
        return [round(statistics.median(times), 3), round(times[-1], 3)] if times else None

    return {
        "url": url,
        "statuses": dict(Counter(str(s) for s, _ in results)),
        "ok_p50_max_s": p50_max(200),
        "shed_p50_max_s": p50_max(429),
        "unavailable_p50_max_s": p50_max(503),
        "unloaded_s": round(unloaded, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", required=True, help="repeatable")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pause-s", type=float, default=20.0, help="between bursts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    body = {"model": args.model, "prompt": "a burst", "max_tokens": args.max_tokens,
            "ignore_eos": True}
    summaries = []
    for round_no in range(1, args.rounds + 1):
        urls = args.url if round_no % 2 else args.url[::-1]
        for url in urls:
            unloaded = unloaded_s(url, body)
            results = asyncio.run(burst(url, body, args.num_requests, args.timeout_s))
            summary = {"round": round_no, **summarize(url, results, unloaded)}
            summaries.append(summary)
            print(json.dumps(summary), flush=True)
            time.sleep(args.pause_s)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(
            {"command": ["python", "-m", "serve_app.bench.burst",
                         *(sys.argv[1:] if argv is None else argv)],
             "bursts": summaries}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
