"""A burst: N completions at once, each client waiting at most T s; how each one ended.

    python -m serve_app.bench.burst --url http://127.0.0.1:8001 --url http://127.0.0.1:8000 \\
        --num-requests 2000 --rounds 2 --out bench/results/burst

Issue 11's test of admission control, as a measurement: every request should end as a 200 with
all its tokens or a 429/503 OpenAI error, none should time out, the shed ones should hear so
within a second, and the admitted ones should take at most twice an unloaded request. With two
`--url`s of one running app (the Router's own port and Serve's proxy, `make run`) the bursts
alternate between them, `--rounds` times each, so the machine's drift falls on both alike.
Writes `summary.json` (one entry per burst) and prints one line per burst.

    python -m serve_app.bench.burst --door-ab --rounds 2 --out bench/results/burst-door

starts `scripts/serve-local` itself, once per burst, with Serve's HTTP callback set to
`policy/door.py` (`door`: a full Router refuses in front of Serve and FastAPI) or left out
(`no-door`), and bursts at the Router's port. A third arm, `floor`, bursts at a bare uvicorn
server that answers every request 429 at once: what this machine's client and HTTP server cost
with no Serve and no engine, the least a shed request can take here. The arms' order turns each
round. `--alone 64` sends, before each burst, the 64 requests admission holds at once by
themselves: what the admitted requests take when no burst comes with them. `--via proxy` bursts
at Serve's proxy instead (`http_options.port`, the AWS path), where the door counts the
completions open per app (`policy/proxy_door.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from serve_app.policy.proxy_door import REFRESH_PERIOD_S


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


def baselines(args: argparse.Namespace, url: str, body: dict) -> tuple[float, dict[str, Any]]:
    """What the admitted requests take without the burst: one at a time (`unloaded_s`) and, with
    `--alone N`, N sent at once (as many as admission holds: the admitted set by itself), as
    summary entries."""
    unloaded = unloaded_s(url, body)
    alone: dict[str, Any] = {}
    if args.alone:
        results = asyncio.run(burst(url, body, args.alone, args.timeout_s))
        alone["alone_p50_max_s"] = summarize(url, results, 0.0)["ok_p50_max_s"]
        time.sleep(1)
    return unloaded, alone


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


CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
DOOR_ARMS = {"door": "serve_app.policy.door:middlewares", "no-door": "", "floor": None}
FLOOR_BODY = json.dumps({"error": {"message": "floor", "type": "RateLimitError", "param": None,
                                   "code": 429}}).encode()


async def floor_app(scope: dict, receive: Any, send: Any) -> None:
    """The `floor` arm's server: 429 JSON at once, the body unread."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 429, "headers": [
        (b"content-type", b"application/json"), (b"retry-after", b"1"),
        (b"content-length", str(len(FLOOR_BODY)).encode())]})
    await send({"type": "http.response.body", "body": FLOOR_BODY})


def serve_floor(port: int) -> None:
    import uvicorn

    uvicorn.run(floor_app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def at_urls(args: argparse.Namespace, body: dict) -> list[dict[str, Any]]:
    """Bursts at a running app's `--url`s, alternating which goes first in each round."""
    summaries = []
    for round_no in range(1, args.rounds + 1):
        for url in args.url if round_no % 2 else args.url[::-1]:
            unloaded, alone = baselines(args, url, body)
            results = asyncio.run(burst(url, body, args.num_requests, args.timeout_s))
            summary = {"round": round_no, **summarize(url, results, unloaded), **alone}
            summaries.append(summary)
            print(json.dumps(summary), flush=True)
            time.sleep(args.pause_s)
    return summaries


def door_ab(args: argparse.Namespace, body: dict) -> list[dict[str, Any]]:
    """One burst per start of `make run`'s app, door on and off in turn (module docstring)."""
    from serve_app.bench.launch_common import INGRESS_PORT
    from serve_app.bench.side_by_side import System, round_order, start, stop

    url = f"http://127.0.0.1:{INGRESS_PORT if args.via == 'router' else proxy_port(args.config)}"
    logs = (args.out or Path(tempfile.mkdtemp(prefix="burst-"))) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summaries = []
    for round_no in range(1, args.rounds + 1):
        for arm in round_order(list(DOOR_ARMS), round_no):
            if arm == "floor":
                results = floor_burst(args, body, logs / f"floor.r{round_no}.log")
                summary = {"round": round_no, "arm": arm, **summarize("floor", results, 0.0)}
            else:
                wait_bindable(INGRESS_PORT)
                os.environ[CALLBACK_ENV] = DOOR_ARMS[arm]
                system = System(arm, ["scripts/serve-local", args.config], f"make run, {arm}")
                proc = start(system, logs / f"{arm}.r{round_no}.log", timeout_s=900)
                try:
                    unloaded, alone = baselines(args, url, body)
                    # The first request started the Router's notice; the proxy reads it within
                    # a second (policy/proxy_door.py), as it would before traffic on AWS.
                    time.sleep(2 * REFRESH_PERIOD_S)
                    results = asyncio.run(burst(url, body, args.num_requests, args.timeout_s))
                finally:
                    stop(proc)
                summary = {"round": round_no, "arm": arm, "via": args.via,
                           **summarize(url, results, unloaded), **alone}
            summaries.append(summary)
            print(json.dumps(summary), flush=True)
    return summaries


def proxy_port(config: str) -> int:
    """Serve's proxy port in the config (`http_options.port`, Serve's default 8000)."""
    import yaml

    return int((yaml.safe_load(Path(config).read_text()).get("http_options") or {})
               .get("port", 8000))


def floor_burst(args: argparse.Namespace, body: dict, log_path: Path
                ) -> list[tuple[int, float]]:
    """The burst at `serve_floor` in a process of its own (as the Router's server is)."""
    from serve_app.bench.launch_common import free_port

    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "serve_app.bench.burst", "--serve-floor",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor server did not start; see {log_path}")
            time.sleep(0.2)
        return asyncio.run(burst(url, body, args.num_requests, args.timeout_s))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_bindable(port: int, timeout_s: float = 180.0) -> None:
    """Until `port` can be bound as Serve binds it (no SO_REUSEADDR): the last burst's
    connections sit in TIME_WAIT on it for a minute, and meanwhile Serve gives the Router the
    next free port instead, where the burst would not find it."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"port {port} still taken after {timeout_s:.0f} s") from None
        time.sleep(2)


def _answers(url: str) -> bool:
    try:
        return httpx.post(f"{url}/v1/completions", json={}, timeout=2).status_code == 429
    except httpx.HTTPError:
        return False


def arm_medians(summaries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per arm, the median over its bursts of each burst's shed and admitted P50 (and of the
    admitted set sent alone, with `--alone`)."""
    medians: dict[str, dict[str, float]] = {}
    for arm in dict.fromkeys(s["arm"] for s in summaries):
        mine = [s for s in summaries if s["arm"] == arm]
        medians[arm] = {
            key: round(statistics.median(s[f"{key}_p50_max_s"][0] for s in mine), 3)
            for key in ("shed", "ok", "alone") if all(s.get(f"{key}_p50_max_s") for s in mine)
        }
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", default=[], help="repeatable")
    parser.add_argument("--door-ab", action="store_true",
                        help="start the app per burst, door on and off in turn (no --url)")
    parser.add_argument("--config", default="configs/local-cpu.yaml", help="with --door-ab")
    parser.add_argument("--via", choices=("router", "proxy"), default="router",
                        help="with --door-ab: burst at the Router's own port or Serve's proxy")
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--alone", type=int, default=0, metavar="N",
                        help="before each burst, N requests at once (what admission holds)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pause-s", type=float, default=20.0, help="between bursts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return 0
    if args.door_ab == bool(args.url):
        parser.error("give --url (a running app), or --door-ab (it starts the app), not both")
    body = {"model": args.model, "prompt": "a burst", "max_tokens": args.max_tokens,
            "ignore_eos": True}
    summaries = door_ab(args, body) if args.door_ab else at_urls(args, body)
    result: dict[str, Any] = {"command": ["python", "-m", "serve_app.bench.burst",
                                          *(sys.argv[1:] if argv is None else argv)],
                              "bursts": summaries}
    if args.door_ab:
        result["p50_median_s"] = medians = arm_medians(summaries)
        print("P50 over bursts, median per arm: " + json.dumps(medians), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
