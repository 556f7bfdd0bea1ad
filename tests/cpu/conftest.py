"""Shared fixtures: one Ray (127.0.0.1 only, one logical GPU) and one disaggregated app.

Engines are expensive on a 2-core machine, so the app is started once per session and every test
that needs it shares it; tests that need their own configuration start their own and stop it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ROOT / "models" / "tiny-llama"
MODEL_NAME = "tiny-llama"
TEST_PORT_BASE = int(os.environ.get("PD_TEST_PORT_BASE", "5620"))

# Before Ray starts: keep GCS, raylet and workers on loopback; no auth, no usage reporting.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
# The session's one Ray cluster runs as the README asks of autoscaled pairs
# (test_pairs_autoscale.py): Serve packs replicas (a node's prefill and decode together; its
# default spread put one pair's two replicas on two nodes). Every test runs under it. (How often
# replicas push their counts is the pairs' own config: policy/autoscale.py.)
os.environ.setdefault("RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY", "1")
# Serve's proxy sheds completions past what an app's Routers hold (policy/proxy_door.py), as on
# AWS (deploy/aws/cluster.yaml) and under `make run`.
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serve_app.policy.door:middlewares")


def run_json_script(argv: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run `python ARGV...` in the repository with `env`; return the JSON its last line prints."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout_s,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_args(**overrides: Any) -> dict[str, Any]:
    """The local CPU config's args, as the tests use them."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "local-cpu.yaml").read_text())
    args = config["applications"][0]["args"]
    args["model"]["source"] = str(TINY_MODEL)
    # Ports of their own, so a `serve run` of the shipped config can run beside the tests
    # (PD_TEST_PORT_BASE moves them, so two test runs can share one machine).
    args["prefill"]["nixl_side_channel_port"] = TEST_PORT_BASE
    args["decode"]["nixl_side_channel_port"] = TEST_PORT_BASE + 10
    # The handoff's tests send short prompts: every one goes through prefill here. The route
    # decision has its own app and tests (test_traffic.py).
    args["router"]["routing"] = {"conditional": False}
    for key, value in overrides.items():
        args[key] = {**args.get(key, {}), **value} if isinstance(value, dict) else value
    return args


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from serve_app.tiny_model import build

    return build(TINY_MODEL)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(
        address="local",  # a new cluster of our own, never one left in /tmp/ray
        num_gpus=1,
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
    )
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def http_port(ray_cluster: None) -> int:
    from ray import serve

    port = free_port()
    # One HTTP proxy, on the head: the tests that add a second node run it on this machine too.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="module")
def second_node(ray_cluster: None) -> Iterator[str]:
    """A second Ray node with one logical GPU, joined to the session's cluster on 127.0.0.1
    (pairs across nodes); its processes are stopped when the module is done."""
    from serve_app.bench.pairs import join_loopback_node

    node, node_id = join_loopback_node()
    yield node_id
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)


@pytest.fixture(scope="module")
def pd_app(tiny_model: Path, http_port: int) -> Iterator[dict[str, Any]]:
    """The disaggregated app, running; yields its handles and base URL."""
    from ray import serve

    from serve_app.app import build_app

    started = time.monotonic()
    handle = serve.run(build_app(app_args()), name="pd", route_prefix="/")
    print(f"app started in {time.monotonic() - started:.0f} s")
    yield {
        "router": handle,
        "prefill": serve.get_deployment_handle("PrefillServer", app_name="pd"),
        "decode": serve.get_deployment_handle("DecodeServer", app_name="pd"),
        "base_url": f"http://127.0.0.1:{http_port}",
    }
    serve.delete("pd")
