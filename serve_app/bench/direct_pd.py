"""The floor for router overhead: two plain vLLM OpenAI servers and a bare proxy.

    python -m serve_app.bench.direct_pd --port 8100 --model models/tiny-llama \\
        --served-model-name tiny-llama [--stock-nixl]

Starts `python -m vllm.entrypoints.openai.api_server` for prefill, waits for its `/health`, then
the same for decode, each with this app's engine arguments and environment from
`configs/local-cpu.yaml` (see `launch_common`) and in a session of its own. Then serves, on
127.0.0.1:PORT, an aiohttp proxy that does what vLLM's toy NIXL proxy does:

1. POST the request to prefill with `max_tokens=1` (and `max_completion_tokens=1` when set),
   `stream=false`, no `stream_options` / `min_tokens`, and `kv_transfer_params` asking for a
   remote decode;
2. POST the original body plus prefill's returned `kv_transfer_params` to decode and stream
   decode's bytes back unchanged (status and content type included).

`GET /v1/models` is decode's. Prints `READY http://127.0.0.1:PORT` once `/v1/models` answers
through the proxy; SIGTERM / SIGINT stops the proxy and both servers (by PID: SIGTERM, SIGKILL
after 30 s, then any process of theirs still running) and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import psutil
from aiohttp import web

from serve_app.bench.launch_common import (
    HOST,
    ROLES,
    announce_ready,
    build_parser,
    descendants,
    describe,
    engine_env,
    free_port,
    http_ok,
    load_app_config,
    log,
    set_local_env,
    terminate,
)
from serve_app.config import AppConfig
from serve_app.engine import engine_argv

STOP_GRACE_S = 30.0
PREFILL_KV_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# Hop-by-hop or recomputed headers that must not be copied from decode's response.
_SKIP_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "date", "server"}


# --- the vLLM servers --------------------------------------------------------------------------


@dataclass
class EngineServer:
    role: str
    port: int
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        log(f"{self.role}: {' '.join(self.argv)} (log: {self.log_path})")
        self.proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log(f"{self.role}: pid {self.proc.pid}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the server by PID, SIGKILL after `STOP_GRACE_S`; then its processes."""
        if self.proc is None:
            return
        procs = descendants(self.proc.pid)  # the engine core and anything else it started
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log(f"{self.role}: no exit {STOP_GRACE_S:.0f} s after SIGTERM, SIGKILL")
                self.proc.kill()
                self.proc.wait()
        _, alive = psutil.wait_procs([p for p in procs if p.is_running()], timeout=10)
        if alive:
            terminate(alive, grace_s=10.0)
        log(f"{self.role}: stopped (exit {self.proc.returncode})")
        if self._log is not None:
            self._log.close()


def engine_server(cfg: AppConfig, role: str, port: int, log_dir: Path) -> EngineServer:
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        *engine_argv(cfg, role), "--host", HOST, "--port", str(port),
    ]
    return EngineServer(role, port, argv, engine_env(cfg, role), log_dir / f"{role}.log")


async def wait_healthy(server: EngineServer, timeout_s: float) -> None:
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.role} server exited during start: see {server.log_path}")
        if await asyncio.to_thread(http_ok, f"{server.url}/health", 2.0):
            log(f"{server.role}: healthy after {time.monotonic() - started:.0f} s")
            return
        await asyncio.sleep(1.0)
    raise TimeoutError(f"{server.role} server not healthy in {timeout_s:.0f} s")


# --- the proxy ---------------------------------------------------------------------------------


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's toy proxy's prefill request: one token, not streamed, KV kept for decode."""
    request = dict(body)
    request["kv_transfer_params"] = dict(PREFILL_KV_TRANSFER_PARAMS)
    request["stream"] = False
    request["max_tokens"] = 1
    if "max_completion_tokens" in request:
        request["max_completion_tokens"] = 1
    request.pop("stream_options", None)
    request.pop("min_tokens", None)
    return request


class Proxy:
    def __init__(self, prefill_url: str, decode_url: str) -> None:
        self.prefill_url = prefill_url
        self.decode_url = decode_url
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None),
            connector=aiohttp.TCPConnector(limit=0),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._disaggregated(request, "/v1/completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._disaggregated(request, "/v1/chat/completions")

    async def models(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        async with self.session.get(f"{self.decode_url}/v1/models") as upstream:
            return await _relay(request, upstream)

    async def _disaggregated(self, request: web.Request, path: str) -> web.StreamResponse:
        assert self.session is not None
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        headers = {"X-Request-Id": request.headers.get("X-Request-Id") or str(uuid.uuid4())}
        async with self.session.post(
            f"{self.prefill_url}{path}", json=prefill_body(body), headers=headers
        ) as prefill:
            if prefill.status != 200:
                return await _relay(request, prefill)
            prefill_response = await prefill.json()
        decode_request = {**body, "kv_transfer_params": prefill_response.get("kv_transfer_params")}
        async with self.session.post(
            f"{self.decode_url}{path}", json=decode_request, headers=headers
        ) as decode:
            return await _relay(request, decode)


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Stream `upstream`'s status, headers and bytes back unchanged."""
    response = web.StreamResponse(
        status=upstream.status,
        headers={
            name: value
            for name, value in upstream.headers.items()
            if name.lower() not in _SKIP_RESPONSE_HEADERS
        },
    )
    await response.prepare(request)
    async for chunk in upstream.content.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}},
        status=status,
    )


# --- the launcher ------------------------------------------------------------------------------


async def serve(args: Any, cfg: AppConfig, log_dir: Path, stop: asyncio.Event) -> int:
    ports = {"prefill": args.prefill_port or free_port(), "decode": args.decode_port or free_port()}
    servers = {role: engine_server(cfg, role, ports[role], log_dir) for role in ROLES}
    proxy = Proxy(servers["prefill"].url, servers["decode"].url)
    runner: web.AppRunner | None = None

    async def start_all() -> None:
        nonlocal runner
        started = time.monotonic()
        for role in ROLES:  # prefill first, each healthy before the next starts
            servers[role].start()
            await wait_healthy(servers[role], args.start_timeout_s)
        await proxy.start()
        runner = web.AppRunner(proxy.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, args.port).start()
        url = f"http://{HOST}:{args.port}/v1/models"
        if not await asyncio.to_thread(http_ok, url, 10.0):
            raise RuntimeError(f"{url} does not answer 200 through the proxy")
        log(f"started in {time.monotonic() - started:.0f} s")
        announce_ready(args.port)

    code = 0
    startup = asyncio.create_task(start_all())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if startup.done():
            startup.result()  # raises a start failure
            await stopped
        log("stopping")
    except Exception as exc:  # noqa: BLE001 - reported, then everything is stopped
        log(f"failed: {exc!r}")
        code = 1
    finally:
        for task in (startup, stopped):
            task.cancel()
        await asyncio.gather(startup, stopped, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        await proxy.close()
        # Both servers at once, decode first in the list; each is SIGTERM then SIGKILL by PID.
        await asyncio.gather(*(asyncio.to_thread(servers[r].stop) for r in reversed(ROLES)))
    return code


async def amain(args: Any) -> int:
    cfg = load_app_config(args.config, args.model, args.served_model_name, args.stock_nixl)
    log(describe(cfg))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"direct-pd-{args.port}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log(f"engine logs: {log_dir}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(args, cfg, log_dir, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser((__doc__ or "").splitlines()[0])
    parser.add_argument("--prefill-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--decode-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where the two servers' logs go (default: a new temp dir)")
    args = parser.parse_args(argv)
    set_local_env()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
