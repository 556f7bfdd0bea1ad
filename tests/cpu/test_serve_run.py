"""`make run`'s path: `scripts/serve-local configs/local-cpu.yaml`, i.e. `serve run` on its own
Ray, in Ray Serve's throughput mode. It answers through Serve's proxy and at the Router's own port
(direct ingress) alike, every connection it makes stays on loopback, and after SIGTERM nothing it
started is left running."""

from __future__ import annotations

import asyncio
import ipaddress
import json
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
ROUTER_PORT = 8001  # scripts/serve-local: the first port of Serve's direct ingress
LONG_PROMPT = " ".join(f"word{i % 97}" for i in range(400))  # 1,950 tokens
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
    for port in (HTTP_PORT, ROUTER_PORT):
        if not port_is_free(port):
            pytest.skip(f"port {port} is in use (is `make run` running?)")
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


def engine_gauges(url: str) -> dict[str, float]:
    """Both engines' running requests and KV usage, from the app's `/metrics`."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"vllm:num_requests_running", "vllm:kv_cache_usage_perc"}
    gauges = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in wanted:
                gauges[f"{sample.name}/{sample.labels['phase']}"] = sample.value
    return gauges


def gcs_address(served: subprocess.Popen) -> str:
    """serve-local's own GCS (this test session runs a Ray of its own, so `auto` could find
    either)."""
    gcs = next(p for p in process_tree(served.pid) if p.name() == "gcs_server")
    ports = sorted(c.laddr.port for c in gcs.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN)
    assert len(ports) == 1, ports  # its one gRPC port (`--address local` picks it)
    return f"127.0.0.1:{ports[0]}"


def run_python(served: subprocess.Popen, args: list[str], **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def router_urls_printed(served: subprocess.Popen) -> list[str]:
    """`python -m serve_app.handle --router-urls`, pointed at serve-local's GCS."""
    args = ["-m", "serve_app.handle", "--router-urls", "--address", gcs_address(served)]
    return run_python(served, args).split()


HANDLE_SNIPPET = """
import json, sys
from serve_app.handle import app_handle
router = app_handle("pd", address=sys.argv[1])
body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0.0}
print(json.dumps(router.completions.remote(body).result(timeout_s=60)))
"""


def check_handle_snippet(served: subprocess.Popen) -> None:
    """README's handle snippet from a plain script, in a shell that exported Serve's
    throughput mode as `make run` does (which would otherwise leave the handle no loop)."""
    out = run_python(served, ["-c", HANDLE_SNIPPET, gcs_address(served)],
                     RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    assert json.loads(out.strip().splitlines()[-1])["usage"]["completion_tokens"] == 4


def check_router_port(served: subprocess.Popen) -> None:
    """The Router answers itself on ROUTER_PORT: the same greedy text as through the proxy,
    decode-local (the shipped config's measured threshold keeps every prompt of the tiny model
    on decode; the handoff's own tests set theirs); a stream; OpenAI error JSON for a bad body;
    a client gone mid-stream leaves nothing in either engine."""
    assert router_urls_printed(served) == [f"http://127.0.0.1:{ROUTER_PORT}"]
    router_url, proxy_url = (f"http://127.0.0.1:{port}" for port in (ROUTER_PORT, HTTP_PORT))
    body = {"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 24, "temperature": 0.0}
    answers = [httpx.post(f"{url}/v1/completions", json=body, timeout=120)
               for url in (router_url, proxy_url)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].headers["x-pd-route"] == "decode_only; reason=short_prompt"
    assert answers[0].json()["choices"][0]["text"] == answers[1].json()["choices"][0]["text"]

    client = openai.OpenAI(base_url=f"{router_url}/v1", api_key="unused")
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 6

    bad = httpx.post(f"{router_url}/v1/completions", content=b"9" * 10_000, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 400

    # Gone mid-stream: a short prompt, so all 1,500 tokens fit the context (vLLM would cut the
    # long prompt's to the 98 left, a stream that could end before the client leaves).
    for _ in range(3):
        with httpx.stream("POST", f"{router_url}/v1/completions", timeout=120,
                          json={**body, "prompt": "hi", "max_tokens": 1500, "ignore_eos": True,
                                "stream": True}) as response:
            first = next(response.iter_lines())
            assert "choices" in json.loads(first.removeprefix("data: ")), first  # not an error
    deadline = time.monotonic() + 60
    while any(engine_gauges(router_url).values()):
        assert time.monotonic() < deadline, engine_gauges(router_url)
        time.sleep(1)


def check_door(port: int) -> None:
    """Serve wraps its HTTP servers in `policy/door.py`: while admission is full (a burst of
    long completions: every slot taken, the wait list full), a body the Router would answer 400
    (not JSON) is answered 429 at the door, unread; with room again, the Router answers it.
    At the Router's own port the door asks the Router; at Serve's proxy it counts the
    completions open against what the Router posted (`policy/proxy_door.py`)."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 400, "ignore_eos": True}

    async def burst() -> tuple[list[int], httpx.Response | None]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            valid = [asyncio.ensure_future(client.post(url, json=body)) for _ in range(100)]
            refused = None
            deadline = time.monotonic() + 10
            while refused is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                probe = await client.post(url, content=b"{not json", timeout=30)
                assert probe.status_code in (400, 429), probe.text
                if probe.status_code == 429:
                    refused = probe
            return [r.status_code for r in await asyncio.gather(*valid)], refused

    statuses, refused = asyncio.run(burst())
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    assert refused is not None, "no probe was refused at the door while admission was full"
    assert refused.json()["error"]["type"] == "RateLimitError"
    assert refused.headers["retry-after"] and refused.headers["x-pd-request-id"]
    after = httpx.post(url, content=b"{not json", timeout=30)
    assert after.status_code == 400 and after.json()["error"]["code"] == 400


def test_serve_run_answers_stays_on_loopback_and_cleans_up(served: subprocess.Popen) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="unused")
    response = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=5)
    assert response.usage.completion_tokens == 5
    check_router_port(served)
    check_door(ROUTER_PORT)
    check_door(HTTP_PORT)
    check_handle_snippet(served)

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
