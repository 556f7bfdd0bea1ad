"""Shed at the door (`serve_app/policy/door.py`), without Ray: the middleware around a FastAPI
app in a real uvicorn server, as Serve wraps it around the Router's own HTTP server.

`test_serve_run.py` checks that Serve installs it in front of the real Router (`make run`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware import Middleware

from serve_app.config import AdmissionConfig, AppConfig
from serve_app.ops.telemetry import RouterTelemetry
from serve_app.policy import door
from serve_app.policy.admission import Admission
from serve_app.policy.auth import ApiKeys
from tests.cpu.conftest import app_args, free_port

KEY = "sk-door-test"


class App:
    """The inner app: counts the requests that reach it, answers 200 (401 without the key)."""

    def __init__(self) -> None:
        self.num_seen = 0
        self.fastapi = FastAPI()

        @self.fastapi.post("/v1/completions")
        @self.fastapi.post("/v1/chat/completions")
        async def completions(raw: Request) -> JSONResponse:
            self.num_seen += 1
            await raw.body()
            if raw.headers.get("authorization") != f"Bearer {KEY}":
                return JSONResponse({"error": {"code": 401}}, 401)
            return JSONResponse({"ok": True})

        @self.fastapi.get("/health")
        async def health() -> JSONResponse:
            self.num_seen += 1
            return JSONResponse({"status": "ok"})


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, Any]]:
    """uvicorn on 127.0.0.1 serving App behind the middlewares Serve gets from our callback
    (the same list Serve validates); one Admission of one slot and no waiting room."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    inner = App()
    asgi: Any = inner.fastapi
    for middleware in validate_http_proxy_callback_return(door.middlewares()):
        assert isinstance(middleware, Middleware)
        asgi = middleware.cls(asgi, *middleware.args, **middleware.kwargs)
    cfg = AppConfig.model_validate(app_args())
    admission = Admission(AdmissionConfig(max_in_flight=1, max_waiting=0, retry_after_s=3),
                          lambda: False)
    telemetry = RouterTelemetry(cfg)
    serving = {"up": True}
    door.open_door(door.Door(admission, ApiKeys([KEY]), telemetry, lambda: serving["up"]))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "app": inner, "admission": admission,
               "telemetry": telemetry, "serving": serving}
    finally:
        door.close_door()
        uv.should_exit = True
        thread.join(timeout=10)


AUTH = {"authorization": f"Bearer {KEY}"}


def post(server: dict[str, Any], path: str = "/v1/completions", **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("headers", AUTH)
    kwargs.setdefault("json", {"model": "m", "prompt": "hi"})
    return httpx.post(server["url"] + path, timeout=10, **kwargs)


def metric(server: dict[str, Any], name: str, labels: dict[str, str]) -> float:
    value = server["telemetry"].metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_room_lets_every_request_through(server: dict[str, Any]) -> None:
    seen = server["app"].num_seen
    assert post(server).status_code == 200
    assert post(server, "/v1/chat/completions").status_code == 200
    assert server["app"].num_seen == seen + 2


def test_full_router_answers_429_json_without_the_app_or_the_body(server: dict[str, Any]) -> None:
    admission = server["admission"]
    slot = asyncio.run(admission.admit())  # the one slot: full, nowhere to wait
    try:
        assert admission.is_full()
        seen, shed = server["app"].num_seen, admission.num_shed
        before = metric(server, "pd:shed_requests_total",
                        {"endpoint": "chat", "reason": "capacity"})
        # A body the app would refuse (not JSON) is not read: the door answers first.
        for path in ("/v1/completions", "/v1/chat/completions"):
            response = post(server, path, json=None, content=b"{not json")
            assert response.status_code == 429
            assert response.headers["content-type"] == "application/json"
            assert response.headers["retry-after"] == "3"
            assert response.headers["x-pd-request-id"]
            assert response.headers["traceresponse"].startswith("00-")
            error = response.json()["error"]
            assert error["type"] == "RateLimitError" and error["code"] == 429
            assert "retry after 3 s" in error["message"]
        assert server["app"].num_seen == seen
        assert admission.num_shed == shed + 2
        assert metric(server, "pd:shed_requests_total",
                      {"endpoint": "chat", "reason": "capacity"}) == before + 1
        assert metric(server, "pd:requests_total", {
            "endpoint": "completions", "status": "429", "route": "none", "reason": ""}) >= 1

        # Not completions, or a key the app refuses: through to the app, full or not.
        assert httpx.get(server["url"] + "/health", timeout=10).status_code == 200
        assert post(server, headers={}).status_code == 401
        assert post(server, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert server["app"].num_seen == seen + 3

        # The connection that was refused can carry the next request.
        with httpx.Client(timeout=10) as client:
            codes = [client.post(server["url"] + "/v1/completions", headers=AUTH,
                                 content=b"x" * 100_000).status_code for _ in range(3)]
        assert codes == [429, 429, 429]

        # No engine up: the app answers (the Router's 503), not the door.
        server["serving"]["up"] = False
        assert post(server).status_code == 200
        server["serving"]["up"] = True
    finally:
        slot.release()
    assert not admission.is_full()
    assert post(server).status_code == 200


def test_a_process_without_a_router_passes_everything(server: dict[str, Any]) -> None:
    """Serve's proxy process loads the same callback and has no Router: nothing is refused."""
    admission = server["admission"]
    slot = asyncio.run(admission.admit())
    registered = door._door
    door.close_door()
    try:
        assert post(server).status_code == 200
    finally:
        door.open_door(registered)
        slot.release()


def test_is_full_only_when_admission_would_refuse_at_once() -> None:
    def full(**cfg: Any) -> bool:
        admission = Admission(AdmissionConfig(max_in_flight=1, **cfg), lambda: False)
        admission.num_in_flight = 1
        return admission.is_full()

    assert full(max_waiting=0)
    assert full(max_waiting=4, max_wait_s=0)
    assert not full(max_waiting=4)  # a slot may free within max_wait_s: the Router waits
    assert not Admission(AdmissionConfig(max_in_flight=1), lambda: False).is_full()
    assert not Admission(AdmissionConfig(enabled=False, max_waiting=0), lambda: False).is_full()
    decode_full = Admission(AdmissionConfig(max_waiting=0), lambda: True)
    assert decode_full.is_full()


def test_completion_paths_under_any_prefix() -> None:
    assert door.completion_endpoint("/v1/completions") == "completions"
    assert door.completion_endpoint("/llm/v1/chat/completions") == "chat"
    assert door.completion_endpoint("/v1/models") is None
    assert door.completion_endpoint("/health") is None
