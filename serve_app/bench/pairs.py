"""Two pairs against one: throughput at a fixed concurrency on the same machine.

Starts a Ray cluster of two one-GPU nodes on 127.0.0.1 (this process's head and a second node,
joined as Ray's own `cluster_utils` joins one), then deploys the local CPU app with `pairs: 1`
and `pairs: 2` in turn, in ABBA rounds so drift falls on both alike; each deploy is warmed up,
then sends `--requests` completions `--concurrency` at a time.

    python -m serve_app.bench.pairs --out bench/results/pairs

On this project's 2-core machines both pairs share the same two cores (each phase keeps its core),
so expect little; the figure that matters is on a host with a GPU per pair.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Prefill and decode share one GPU because"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve_app.bench.pairs", description=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local-cpu.yaml")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each: 1, 2, 2, 1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pairs")
    return parser.parse_args()


def join_loopback_node(timeout_s: float = 60.0) -> tuple[Any, str]:
    """One more Ray node with one logical GPU, joined to this process's cluster on 127.0.0.1 as
    Ray's own `cluster_utils.Cluster.add_node` joins one (`ray start` would not: with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it refuses to join, and with 1 it dials the GCS on the
    machine's other address). Returns the node (`kill_all_processes` stops it) and its id."""
    import ray
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    params = RayParams(
        gcs_address=ray.get_runtime_context().gcs_address, node_ip_address="127.0.0.1",
        num_cpus=1, num_gpus=1, object_store_memory=100 * 1024 * 1024, min_worker_port=0,
        max_worker_port=0, include_log_monitor=False, node_manager_port=0,
    )
    params.dashboard_agent_listen_port = None  # a free one, not the head's
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    deadline = time.monotonic() + timeout_s
    while not (joined := [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before]):
        if time.monotonic() > deadline:
            node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
            raise TimeoutError(f"the new Ray node did not join in {timeout_s:g} s")
        time.sleep(0.5)
    return node, joined[0]["NodeID"]


def start_cluster() -> Any:
    """This process's Ray head and a second node, each with one logical GPU, on 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(address="local", num_gpus=1, num_cpus=2, _node_ip_address="127.0.0.1",
             include_dashboard=False, log_to_driver=False)
    return join_loopback_node()[0]


async def _load(url: str, num: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True}
    latencies: list[float] = []
    pairs: dict[str, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            queue.get_nowait()
            started = time.monotonic()
            response = await client.post(url, json=body)
            response.raise_for_status()
            latencies.append(time.monotonic() - started)
            pair = response.headers.get("x-pd-pair", "?")
            pairs[pair] = pairs.get(pair, 0) + 1

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "requests_per_s": num / elapsed,
        "output_tokens_per_s": num * max_tokens / elapsed,
        "latency_p50_s": statistics.median(latencies),
        "requests_per_pair": pairs,
    }


def run_arm(args: argparse.Namespace, base: dict[str, Any], num_pairs: int) -> dict[str, Any]:
    from ray import serve

    from serve_app.app import build_app

    cfg = json.loads(json.dumps(base))
    cfg["pairs"] = num_pairs
    serve.run(build_app(cfg), name="pd", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    try:
        asyncio.run(_load(url, args.warmup, args.concurrency, args.max_tokens))
        result = asyncio.run(_load(url, args.requests, args.concurrency, args.max_tokens))
    finally:
        serve.delete("pd")
    print(f"pairs {num_pairs}: {result['requests_per_s']:.2f} req/s, "
          f"P50 {result['latency_p50_s']:.2f} s, per pair {result['requests_per_pair']}",
          flush=True)
    return {"pairs": num_pairs, **result}


def main() -> None:
    args = _parse_args()
    base = yaml.safe_load(args.config.read_text())["applications"][0]["args"]
    base["model"]["source"] = str((ROOT / base["model"]["source"]).resolve())
    node = start_cluster()
    from ray import serve

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args.port})
    arms: list[dict[str, Any]] = []
    try:
        for _ in range(args.rounds):
            for num_pairs in (1, 2, 2, 1):
                arms.append(run_arm(args, base, num_pairs))
    finally:
        serve.shutdown()
        node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    pooled = {
        n: statistics.mean(a["requests_per_s"] for a in arms if a["pairs"] == n) for n in (1, 2)
    }
    summary = {"concurrency": args.concurrency, "requests": args.requests,
               "max_tokens": args.max_tokens, "arms": arms,
               "requests_per_s": pooled, "ratio_two_to_one": pooled[2] / pooled[1]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"two pairs / one pair, requests per second: {summary['ratio_two_to_one']:.2f}")


if __name__ == "__main__":
    main()
