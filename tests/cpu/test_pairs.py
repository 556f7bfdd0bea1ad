"""Pairs across a Ray cluster: two one-GPU Ray nodes (the session's head and a second node on
this machine, both on 127.0.0.1), two pairs of tiny engines, one per node.

1. Plain fractional `num_gpus` can leave a pair without room on its GPU (placement test).
2. The app with `pairs: 2` puts each pair's engines on one node and one GPU, the two pairs on
   different nodes, and refuses `pairs` the cluster cannot place.
3. Requests spread over both pairs; greedy outputs equal one engine's on each.
4. One pair's decode killed: requests sent after it are all answered (the other pair, or the
   first pair's prefill engine whole), and traffic returns to the pair once decode is back.
   Two Router replicas serve throughout, each with its own view of the pairs.
5. A script on this machine reaches the app through a handle as the README shows.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cpu.conftest import MODEL_NAME, TEST_PORT_BASE, TINY_MODEL, app_args

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "Prefill and decode share one GPU because",
]
MAX_TOKENS = 12


def test_plain_fractional_gpus_can_leave_a_prefill_without_a_gpu(second_node: str) -> None:
    """Two 0.2 "decode" actors placed before the 0.8 "prefill" ones: Ray packs both decodes on
    one card (the node that asks first), so one prefill finds no card with 0.8 free: a pair
    cannot form. `pairs` never asks Ray for this (one replica per phase per node)."""
    import ray

    @ray.remote(num_cpus=0)
    class Tenant:
        def where(self) -> tuple[str, list[str]]:
            context = ray.get_runtime_context()
            return context.get_node_id(), context.get_accelerator_ids()["GPU"]

    decodes = [Tenant.options(num_gpus=0.2).remote() for _ in range(2)]
    placed = ray.get([d.where.remote() for d in decodes])
    prefills = [Tenant.options(num_gpus=0.8).remote() for _ in range(2)]
    ready, pending = ray.wait([p.where.remote() for p in prefills], num_returns=2, timeout=5)
    print(f"decodes on {placed}; prefills placed {len(ready)}, pending {len(pending)}")
    try:
        assert placed[0] == placed[1], "Ray spread the decodes this time"
        assert len(pending) == 1
    finally:
        for actor in decodes + prefills:
            ray.kill(actor)


@pytest.fixture(scope="module")
def pairs_app(tiny_model: Any, http_port: int, second_node: str) -> Iterator[dict[str, Any]]:
    from ray import serve

    from serve_app.app import build_app

    args = app_args(pairs=2)
    # Both "nodes" are this machine: the second pair's ports are its own anyway (port + rank).
    args["prefill"]["nixl_side_channel_port"] = TEST_PORT_BASE + 40
    args["decode"]["nixl_side_channel_port"] = TEST_PORT_BASE + 50
    args["router"]["failover"] = {"probe_period_s": 0.25, "probe_timeout_s": 2.0}
    args["router"]["num_replicas"] = 2  # each Router learns and probes the pairs on its own
    started = time.monotonic()
    serve.run(build_app(args), name="pairs", route_prefix="/pairs")
    print(f"two pairs started in {time.monotonic() - started:.0f} s")
    yield {
        "prefill": serve.get_deployment_handle("PrefillServer", app_name="pairs"),
        "decode": serve.get_deployment_handle("DecodeServer", app_name="pairs"),
        "url": f"http://127.0.0.1:{http_port}/pairs/v1/completions",
        "nodes": [second_node],
    }
    serve.delete("pairs")


def nodes_of(handle: Any) -> set[str]:
    from serve_app.pairs import replica_nodes

    handle.options()  # starts the handle's request router
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        nodes = set(replica_nodes(handle.app_name, handle.deployment_name).values())
        if len(nodes) == 2:
            return nodes
        time.sleep(0.2)
    raise AssertionError(f"{handle.deployment_name}: replicas on {nodes}")


def test_each_pair_shares_one_gpu_and_pairs_do_not(pairs_app: dict[str, Any]) -> None:
    from serve_app.pairs import on_pair

    nodes = nodes_of(pairs_app["prefill"])
    assert nodes_of(pairs_app["decode"]) == nodes
    placements = {
        node: {
            phase: on_pair(pairs_app[phase], node).placement.remote().result(timeout_s=60)
            for phase in ("prefill", "decode")
        }
        for node in nodes
    }
    print(placements)
    for node, phases in placements.items():
        assert phases["prefill"] == phases["decode"]  # one node, the same Ray GPU id
        assert phases["prefill"].node_id == node and phases["prefill"].gpu_ids
    assert len({phases["prefill"].node_id for phases in placements.values()}) == 2


def test_pairs_the_cluster_cannot_place_are_refused_at_build(pairs_app: dict[str, Any]) -> None:
    from serve_app.app import build_app

    with pytest.raises(ValueError, match=r"pairs: 3 pairs need 3 Ray nodes .* can place 2"):
        build_app(app_args(pairs=3))


def complete(url: str, prompt: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, **extra}
    return httpx.post(url, json=body, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """One vLLM engine alone, before the pairs start: the greedy texts."""
    out = tmp_path_factory.mktemp("reference") / "reference.json"
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("reference_engine.py")), str(TINY_MODEL),
         str(MAX_TOKENS), str(out)],
        input=json.dumps(PROMPTS), capture_output=True, text=True, timeout=600, check=True,
    )
    return [r["text"] for r in json.loads(out.read_text())]


def test_requests_spread_over_both_pairs_with_one_engines_output(
    reference: list[str], pairs_app: dict[str, Any]
) -> None:
    url = pairs_app["url"]
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: complete(url, p), jobs))
    assert [r.status_code for r in responses] == [200] * len(jobs)
    by_pair = Counter(r.headers["x-pd-pair"] for r in responses)
    print(f"requests per pair: {dict(by_pair)}")
    assert len(by_pair) == 2
    for prompt, response in zip(jobs, responses, strict=True):
        assert response.json()["choices"][0]["text"] == reference[PROMPTS.index(prompt)]
        assert response.headers["x-pd-route"].startswith("disaggregated")


def test_a_pairs_dead_decode_sends_its_traffic_elsewhere(
    reference: list[str], pairs_app: dict[str, Any]
) -> None:
    from serve_app.pairs import on_pair

    url = pairs_app["url"]
    victim = sorted(nodes_of(pairs_app["decode"]))[0]
    pid = on_pair(pairs_app["decode"], victim).stats.remote().result(timeout_s=60)["pid"]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    answers: list[httpx.Response] = []
    while time.monotonic() - killed_at < 15:
        answers.append(complete(url, PROMPTS[len(answers) % len(PROMPTS)]))
    print(f"slowest after the kill: {max(r.elapsed.total_seconds() for r in answers):.1f} s")
    print(f"{len(answers)} requests after the kill: "
          f"{Counter((r.headers.get('x-pd-pair'), r.headers.get('x-pd-route')) for r in answers)}")
    assert [r.status_code for r in answers] == [200] * len(answers)
    for i, response in enumerate(answers):
        assert response.json()["choices"][0]["text"] == reference[i % len(PROMPTS)]
    # Decode comes back (Serve restarts the replica on its node): both pairs whole again.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            batch = list(pool.map(lambda p: complete(url, p), PROMPTS * 2))
        assert all(r.status_code == 200 for r in batch)
        routes = {(r.headers["x-pd-pair"], r.headers["x-pd-route"]) for r in batch}
        pairs_whole = {pair for pair, route in routes if route.startswith("disaggregated")}
        if len(pairs_whole) == 2:
            break
        time.sleep(2)
    else:
        pytest.fail(f"traffic did not return to both pairs: {routes}")


HANDLE_SCRIPT = """
import json, sys
{prelude}
from serve_app.handle import app_handle
router = app_handle("pairs", address=sys.argv[1])
body = {{"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0.0}}
print(json.dumps(router.completions.remote(body).result(timeout_s=120)))
"""


def run_handle_script(prelude: str) -> subprocess.CompletedProcess:
    import ray

    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    return subprocess.run(
        [sys.executable, "-c", HANDLE_SCRIPT.format(prelude=prelude),
         ray.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=180, env=env, cwd=Path(__file__).parents[2],
    )


def test_a_script_on_this_machine_reaches_the_app_through_a_handle(
    pairs_app: dict[str, Any]
) -> None:
    """The README's snippet, run as written in a fresh process whose environment lacks
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: it answers; with Ray imported first, it fails at once
    naming the fix instead of hanging."""
    done = run_handle_script("")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["usage"]["completion_tokens"] == 4
    started = time.monotonic()
    failed = run_handle_script("import ray")
    assert failed.returncode != 0
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in failed.stderr
    assert time.monotonic() - started < 60
