"""What tracing costs: TTFT and end to end at concurrency 1, tracing on vs off, interleaved on
one running app.

One app runs with tracing enabled (100% sampling, exporting to an OTLP sink this script runs
on 127.0.0.1). Sampling is parent-based, so a request whose `traceparent` says "sampled" is
traced in full (four spans, exported) and one that says "not sampled" runs the same code with
non-recording spans: the "off" arm, as with `telemetry.tracing.enabled: false`. The arms
alternate in blocks (ABBA order), so drift on a busy machine falls on both alike.

    python -m serve_app.bench.tracing_overhead --out bench/results/tracing-overhead
    python -m serve_app.bench.tracing_overhead --url http://127.0.0.1:8000 ...   # an app already
        running with telemetry.tracing.enabled: true (and its endpoint) instead of starting one
    python -m serve_app.bench.tracing_overhead --pool RUN_DIR RUN_DIR ... --out OUT   # runs as
        rounds: their requests pooled, each run's ratios listed

Writes `requests.jsonl` (one line per request) and `summary.json`, and prints the P50s. Tracing
off against a build without tracing: the span work of one request with tracing off, timed in
this process (`off_span_cost_us`), over the end to end P50.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.bench.launch_common import INGRESS_PORT
from serve_app.bench.side_by_side import stop

ROOT = Path(__file__).resolve().parents[2]
PORT = INGRESS_PORT  # the Router's own port (`scripts/serve-local`: Serve's direct ingress)


class SpanSink:
    """An OTLP/HTTP endpoint that answers 200 and counts export calls (no decoding: cheap)."""

    def __init__(self) -> None:
        sink = self
        self.num_exports = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.num_exports += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


def traced_config(config: Path, endpoint: str, out: Path) -> Path:
    """A copy of the serve config with tracing on, 100% sampling, exporting to `endpoint`."""
    data = yaml.safe_load(config.read_text())
    args = data["applications"][0].setdefault("args", {})
    telemetry = args.setdefault("telemetry", {})
    telemetry["tracing"] = {**telemetry.get("tracing", {}), "enabled": True,
                            "endpoint": endpoint, "sampling_ratio": 1.0}
    source = Path(args.get("model", {}).get("source", ""))
    if args.get("model") and not source.is_absolute() and (ROOT / source).exists():
        args["model"]["source"] = str(ROOT / source)
    path = out / "serve-config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_app(config: Path, log: Path, timeout_s: float = 900.0) -> subprocess.Popen:
    # `make run`'s launcher: loopback-only Ray with one logical GPU for the 0.8 / 0.2 split.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(ROOT / "scripts" / "serve-local"), str(config)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited early; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(3)
    stop(proc)
    raise TimeoutError(f"the app did not answer in {timeout_s:.0f} s; see {log}")


def one_request(client: httpx.Client, body: dict, is_traced: bool) -> dict[str, Any]:
    trace_id, flags = secrets.token_hex(16), "01" if is_traced else "00"
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"}
    started = time.perf_counter()
    ttft = None
    with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        for text in response.iter_text():
            if ttft is None and '"text"' in text:
                ttft = time.perf_counter() - started
    return {"arm": "on" if is_traced else "off", "status": response.status_code,
            "ttft_s": ttft, "e2e_s": time.perf_counter() - started}


def run(url: str, model: str, num_blocks: int, per_block: int, prompt_words: int,
        output_tokens: int) -> list[dict[str, Any]]:
    words = " ".join(f"word{i % 97}" for i in range(prompt_words))
    body = {"model": model, "prompt": words, "max_tokens": output_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    records = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(3):
            one_request(client, body, True)  # warm-up, not recorded
        for block in range(num_blocks):
            is_traced = block % 4 in (0, 3)  # ABBA ABBA ...
            for _ in range(per_block):
                records.append({"block": block, **one_request(client, body, is_traced)})
    return records


def off_span_cost_us(num_requests: int = 20_000) -> float:
    """Microseconds of span work per request with tracing off, in this process: what the Router,
    PrefillServer and DecodeServer do for one disaggregated request (the Router span from the
    client's headers, the carriers across two handle calls, the prefill, decode and handoff
    spans with their attributes, the ends). A build without tracing would do none of it."""
    from serve_app.config import TracingConfig
    from serve_app.ops import tracing

    tracer = tracing.Tracer(TracingConfig(enabled=False), "Router")
    headers = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
    attributes = {"gen_ai.operation.name": "text_completion", "gen_ai.request.model": "m"}
    started = time.perf_counter()
    for _ in range(num_requests):
        root = tracer.start_request("text_completion m", headers, attributes)
        tracing.request_id(root)
        prefill = tracer.start_child("prefill", tracing.carrier(root), attributes)
        tracing.end(prefill)
        decode = tracer.start_child("decode", tracing.carrier(root), attributes)
        handoff = tracer.start_child("kv_handoff", decode, {"pd.kv.bytes": 1})
        tracing.end(handoff)
        tracing.end(decode)
        root.set_attribute("pd.route", "disaggregated")
        tracing.end(root, 200)
    return (time.perf_counter() - started) / num_requests * 1e6


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for arm in ("on", "off"):
        good = [r for r in records if r["arm"] == arm and r["status"] == 200 and r["ttft_s"]]
        summary[arm] = {
            "num_requests": len(good),
            "ttft_p50_ms": 1000 * statistics.median(r["ttft_s"] for r in good),
            "e2e_p50_ms": 1000 * statistics.median(r["e2e_s"] for r in good),
            "ttft_mean_ms": 1000 * statistics.fmean(r["ttft_s"] for r in good),
            "e2e_mean_ms": 1000 * statistics.fmean(r["e2e_s"] for r in good),
        }
    for key in ("ttft_p50_ms", "e2e_p50_ms", "ttft_mean_ms", "e2e_mean_ms"):
        summary[f"{key}_on_over_off"] = summary["on"][key] / summary["off"][key]
    return summary


def pool(runs: list[Path]) -> dict[str, Any]:
    """The requests of several runs as one summary, with each run's own ratios beside it: one
    run's P50s on this machine move by more than the effect (README "Tracing")."""
    records: list[dict[str, Any]] = []
    per_run = {}
    for folder in runs:
        lines = (folder / "requests.jsonl").read_text().splitlines()
        run_records = [json.loads(line) for line in lines if line.strip()]
        records += run_records
        ratios = summarize(run_records)
        per_run[str(folder)] = {key: value for key, value in ratios.items() if "_over_" in key}
    return {**summarize(records), "runs": per_run}


def write_pooled(runs: list[Path], out: Path) -> int:
    summary = pool(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"pooled {len(runs)} runs, {summary['on']['num_requests']} requests per arm: "
          f"TTFT P50 x{summary['ttft_p50_ms_on_over_off']:.3f}, "
          f"E2E P50 x{summary['e2e_p50_ms_on_over_off']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/tracing-overhead")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/local-cpu.yaml")
    parser.add_argument("--url", help="an app already running with tracing on (not started)")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--blocks", type=int, default=8, help="blocks, alternating on/off")
    parser.add_argument("--per-block", type=int, default=25)
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--pool", type=Path, nargs="+", metavar="DIR",
                        help="start nothing: pool earlier runs' requests.jsonl (each run a round, "
                        "as the side-by-side pools rounds) into OUT/summary.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pool:
        return write_pooled(args.pool, args.out)
    sink = proc = None
    try:
        if args.url is None:
            sink = SpanSink()
            proc = start_app(traced_config(args.config, sink.endpoint, args.out),
                             args.out / "serve.log")
        records = run(args.url or f"http://127.0.0.1:{PORT}", args.model, args.blocks,
                      args.per_block, args.prompt_words, args.output_tokens)
    finally:
        if proc is not None:
            stop(proc)
        if sink is not None:
            sink.close()
    with (args.out / "requests.jsonl").open("w") as out:
        out.writelines(json.dumps(r) + "\n" for r in records)
    summary = {**summarize(records), "command": " ".join(sys.argv),
               "num_exports": sink.num_exports if sink else None}
    summary["off_span_us_per_request"] = off_us = off_span_cost_us()
    summary["off_span_share_of_e2e_p50"] = off_us / 1000 / summary["off"]["e2e_p50_ms"]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for arm in ("on", "off"):
        s = summary[arm]
        print(f"tracing {arm:3}: n={s['num_requests']} TTFT P50 {s['ttft_p50_ms']:.1f} ms, "
              f"E2E P50 {s['e2e_p50_ms']:.1f} ms")
    print(f"on/off: TTFT P50 x{summary['ttft_p50_ms_on_over_off']:.3f}, "
          f"E2E P50 x{summary['e2e_p50_ms_on_over_off']:.3f}")
    print(f"tracing off: {summary['off_span_us_per_request']:.1f} us of span work per request, "
          f"{100 * summary['off_span_share_of_e2e_p50']:.3f}% of the E2E P50")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
