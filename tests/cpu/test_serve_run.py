"""`make run`'s path: `scripts/serve-local configs/local-cpu.yaml`, i.e. `serve run` on its own
Ray. It answers a completion, every connection it makes stays on loopback, and after SIGTERM
nothing it started is left running."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.cpu.conftest import MODEL_NAME, ROOT

HTTP_PORT = 8000  # configs/local-cpu.yaml http_options.port
START_TIMEOUT_S = 900


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    if not port_is_free(HTTP_PORT):
        pytest.skip(f"port {HTTP_PORT} is in use (is `make run` running?)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log_path = tmp_path_factory.mktemp("serve-local") / "serve-local.log"
    print(f"serve-local log: {log_path}")
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "serve-local"), "configs/local-cpu.yaml"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_http(proc)
        yield proc
    finally:
        stop(proc)
        log.close()


def wait_for_http(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve-local exited early: see its log"
        try:
            if httpx.get(f"http://127.0.0.1:{HTTP_PORT}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    raise TimeoutError("serve run did not answer in time: see its log")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def process_tree(root_pid: int) -> list[psutil.Process]:
    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def test_serve_run_answers_stays_on_loopback_and_cleans_up(served: subprocess.Popen) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="unused")
    response = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=5)
    assert response.usage.completion_tokens == 5

    processes = process_tree(served.pid)
    names = " ".join(p.name() for p in processes)
    assert "raylet" in names and "gcs_server" in names  # serve run started its own Ray

    for proc in processes:
        for conn in proc.net_connections(kind="inet"):
            if conn.raddr:
                assert is_loopback(conn.raddr.ip), (proc.name(), conn)
            if conn.status == psutil.CONN_LISTEN and not is_loopback(conn.laddr.ip):
                # Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::]:0
                # (ray/serve/_private/replica.py); nothing of ours listens beyond loopback.
                assert "ServeReplica" in " ".join(proc.cmdline()), (proc.name(), conn)

    stop(served)
    deadline = time.monotonic() + 60
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(1)
    leftovers = [(p.pid, p.name()) for p in alive]
    for p in alive:
        p.kill()
    assert not leftovers, f"left running after SIGTERM: {leftovers}"
