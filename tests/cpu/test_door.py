"""Shed at the door (`serve_app/policy/door.py`, `proxy_door.py`), without Ray: the middleware
around a FastAPI app in a real uvicorn server, as Serve wraps it around the Router's own HTTP
server and its proxy's.

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
from serve_app.policy import door, proxy_door
from serve_app.policy.admission import Admission
from serve_app.policy.auth import ApiKeys
from serve_app.policy.proxy_door import (
    NOTICE_TTL_S,
    CountingDoor,
    Limit,
    Notice,
    RouterBoard,
    ShedReport,
    app_key,
    limits_of,
)
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
            await asyncio.sleep(float(raw.headers.get("x-hold-s", 0)))  # a request kept open
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


def test_a_process_without_a_router_counts_against_the_posted_limit(
    server: dict[str, Any], ray_cluster: None,
) -> None:
    """Serve's proxy process loads the same callback and has no Router: it counts the
    completions open per app (route prefix) against the Routers' notices on the board in
    Ray's GCS (`proxy_door.py`), and posts its sheds there for the Router's metrics."""
    # An app of the module before (its Router at "/"), deleted just now, leaves its notice on
    # the board until it lapses: the planted ones below would be counted beside it.
    deadline = time.monotonic() + NOTICE_TTL_S + 10
    while "" in limits_of(proxy_door.read_board(Notice, proxy_door.NOTICE_PREFIX), time.time()):
        assert time.monotonic() < deadline, "a notice at / outlived its time to live"
        time.sleep(0.5)
    now = time.time()
    notices = {"a/1": Notice("/", 1, 7, now), "a/2": Notice("/", 1, 2, now),  # 2 replicas at /
               "b/1": Notice("/other/", 1, 1, now), "c/1": Notice("/gone", 1, 1, now - 60)}
    for key, notice in notices.items():
        proxy_door._put(proxy_door.NOTICE_PREFIX + "test/" + key, notice.encode())
    registered, door._counting_door = door._door, CountingDoor()
    counting = door._counting_door
    door.close_door()
    router = RouterBoard("test", "r1", 64, 1)  # the app's Router, counting from now on
    router.route_prefix = "/"
    asyncio.run(router.start_counting())
    held = {**AUTH, "x-hold-s": "2"}

    async def two_open_then(path: str) -> tuple[list[int], httpx.Response]:
        async with httpx.AsyncClient(base_url=server["url"], timeout=10) as client:
            body = {"model": "m", "prompt": "hi"}
            opened = [asyncio.ensure_future(client.post("/v1/completions", json=body,
                                                         headers=held)) for _ in range(2)]
            while counting.num_open[""] < 2:
                await asyncio.sleep(0.01)
            third = await client.post(path, content=b"{not json", headers=AUTH)
            return [r.status_code for r in await asyncio.gather(*opened)], third

    try:
        assert httpx.get(server["url"] + "/health", timeout=10).status_code == 200
        deadline = time.monotonic() + 10  # any request starts the reading; once a second
        while counting.limits.get("") != Limit(2, 7):
            assert time.monotonic() < deadline, counting.limits
            time.sleep(0.1)
        seen = server["app"].num_seen
        statuses, third = asyncio.run(two_open_then("/v1/chat/completions"))
        assert statuses == [200, 200]
        assert third.status_code == 429 and third.headers["retry-after"] == "7"
        assert third.headers["content-type"] == "application/json"
        assert third.headers["x-pd-request-id"]
        assert third.json()["error"]["type"] == "RateLimitError"
        assert server["app"].num_seen == seen + 2 and counting.num_shed == {"": {"chat": 1}}
        assert counting.num_open[""] == 0  # both left when their answers ended

        # Another app's paths count against its own limit; a lapsed notice is no limit. (Both
        # pass the door; the inner app serves only the app at /, so it answers them 404.)
        _, other = asyncio.run(two_open_then("/other/v1/completions"))
        assert other.status_code == 404
        _, gone = asyncio.run(two_open_then("/gone/v1/completions"))
        assert gone.status_code == 404
        assert post(server).status_code == 200 and counting.num_shed == {"": {"chat": 1}}

        # The sheds reach the board, where the app's Router counts them once; a Router that
        # starts after them does not count them.
        deadline = time.monotonic() + 10
        new: dict[str, int] = {}
        while not new:
            assert time.monotonic() < deadline, "the proxy's sheds never reached the board"
            new = asyncio.run(router.new_sheds())
        assert new == {"chat": 1} and asyncio.run(router.new_sheds()) == {}
        later = RouterBoard("test", "r2", 64, 1)
        later.route_prefix = "/"
        assert asyncio.run(later.new_sheds()) == {}  # not counting yet
        asyncio.run(later.start_counting())
        assert asyncio.run(later.new_sheds()) == {}
    finally:
        door._counting_door = None
        door.open_door(registered)
        from ray.experimental import internal_kv

        for key in [*(proxy_door.NOTICE_PREFIX + "test/" + key for key in notices),
                    proxy_door.SHEDS_PREFIX + counting.proxy_id]:
            internal_kv._internal_kv_del(key, namespace=proxy_door.BOARD_NAMESPACE)


def test_limits_sum_live_notices_per_route_prefix() -> None:
    now = 1000.0
    notices = [Notice("/", 64, 1, now), Notice("", 64, 3, now - 5),
               Notice("/a/", 8, 1, now), Notice("/a", 1, 1, now - NOTICE_TTL_S - 1)]
    assert limits_of(notices, now) == {"": Limit(128, 3), "/a": Limit(8, 1)}
    assert Notice.decode(notices[0].encode()) == notices[0]
    assert app_key("/") == app_key("") == "" and app_key("/a/") == "/a"


def test_router_counts_each_proxys_sheds_once() -> None:
    board = RouterBoard("app", "r1", 64, 1)
    board.route_prefix = "/llm/"
    first = [ShedReport("p1", {"/llm": {"chat": 3, "completions": 1}, "": {"chat": 9}}),
             ShedReport("p2", {"/llm": {"chat": 2}})]
    assert board.count_new(first) == {"chat": 5, "completions": 1}
    assert board.count_new(first) == {}
    later = [ShedReport("p1", {"/llm": {"chat": 4, "completions": 1}}),
             ShedReport("p3", {"/llm": {"completions": 2}})]  # p2 gone, p3 new
    assert board.count_new(later) == {"chat": 1, "completions": 2}
    assert ShedReport.decode(later[0].encode()) == later[0]


def test_capacity_is_what_admission_holds_at_once() -> None:
    def capacity(**cfg: Any) -> int | None:
        return Admission(AdmissionConfig(**cfg), lambda: False).capacity()

    assert capacity(max_in_flight=32, max_waiting=32) == 64
    assert capacity(max_in_flight=32, max_waiting=32, max_wait_s=0) == 32
    assert capacity(enabled=False) is None


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
