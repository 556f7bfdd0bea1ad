"""Shed at the door: a full Router answers 429 before Serve, FastAPI or the body are touched.

In a burst almost every request is shed, and a shed request's cost is what lies in front of
admission: Ray Serve's per-request wrapper (request metadata, its metrics, the user-callable
call), FastAPI, the telemetry record, the body read and the JSON parse. On 2 cores shared with
the client that put the median 429 of a 2,000-request burst at ~1.5-1.9 s. This module is an
ASGI middleware that Serve wraps around the Router replica's own HTTP server (direct ingress:
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.policy.door:middlewares`, set by
`scripts/serve-local`). For a completion it asks the Router of this process whether admission
would refuse the request at once (`Admission.is_full`: every slot taken and the wait list full);
if so it sends the same 429 OpenAI error, `Retry-After` and request-id headers the Router would,
and counts it in the same metrics. Anything else goes on untouched; so does a request whose API
key would be refused (the Router answers 401).

In a process with no Router, Serve's proxy (port 8000), the same middleware counts the
completions open per app against what the app's Routers can hold, as they post it on a board in
Ray's GCS, and refuses past it with the same 429 (`proxy_door.py`). There the API key is not
checked first: a full app answers 429 to any completion.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.middleware import Middleware

from serve_app.policy.errors import REQUEST_ID_HEADER, Rejection
from serve_app.policy.http_errors import rejection_response
from serve_app.policy.proxy_door import CountingDoor, app_key

if TYPE_CHECKING:  # Serve's proxy loads this module too: it imports nothing heavy at run time
    from serve_app.ops.telemetry import RouterTelemetry
    from serve_app.policy.admission import Admission
    from serve_app.policy.auth import ApiKeys

COMPLETION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
ENDPOINT_SUFFIXES = {endpoint: suffix for suffix, endpoint in COMPLETION_PATHS.items()}


def completion_endpoint(path: str) -> str | None:
    """The endpoint a POST to `path` is, or None. By suffix: uvicorn's `root_path` and the app's
    route prefix come before it (only the Router's app is served on this server)."""
    for suffix, endpoint in COMPLETION_PATHS.items():
        if path.endswith(suffix):
            return endpoint
    return None


class Door:
    """What the middleware needs of this process's Router: its admission, keys, telemetry."""

    def __init__(
        self, admission: Admission, api_keys: ApiKeys, telemetry: RouterTelemetry,
        is_serving: Callable[[], bool] = lambda: True,
    ) -> None:
        self.admission = admission
        self.api_keys = api_keys
        self.telemetry = telemetry
        self.is_serving = is_serving

    def refusal(self, endpoint: str, authorization: str | None) -> Rejection | None:
        """The 429 admission would give this request now, or None to let it in."""
        if not self.admission.is_full() or not self.is_serving():
            return None  # room, or no engine (the Router answers 503)
        try:
            self.api_keys.check(authorization)
        except Rejection:
            return None  # the Router answers it 401, as it would with room
        self.telemetry.shed(endpoint, "capacity")
        return self.admission.shed_now()


_door: Door | None = None


def open_door(door: Door) -> None:
    """The Router of this process (one per replica process) registers itself."""
    global _door
    _door = door


def close_door() -> None:
    global _door
    _door = None


class ShedAtDoor:
    """Pure ASGI middleware: refuses a completion at once when this process's Router is full
    or, in Serve's proxy, when the completions open for its app reach what the app can hold."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        endpoint = None
        if scope["type"] == "http":
            if _door is None:
                counting_door().ensure_refreshing()
            if scope["method"] == "POST":
                endpoint = completion_endpoint(scope["path"])
        if endpoint is None:
            await self.app(scope, receive, send)
        elif _door is not None:
            await self._at_router(_door, endpoint, scope, receive, send)
        else:
            await self._at_proxy(endpoint, scope, receive, send)

    async def _at_router(self, door: Door, endpoint: str, scope: dict, receive: Any,
                         send: Any) -> None:
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization")
        rejection = door.refusal(endpoint, authorization.decode("latin-1") if authorization else None)
        if rejection is None:
            await self.app(scope, receive, send)
            return
        record = door.telemetry.begin(endpoint, {
            k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()
            if k in (b"traceparent", b"tracestate")
        })
        rejection.headers.update(record.headers())
        record.finish(rejection.status, rejection.body)
        await rejection_response(rejection)(scope, receive, send)

    async def _at_proxy(self, endpoint: str, scope: dict, receive: Any, send: Any) -> None:
        """No Router in this process (Serve's proxy): count against the app's posted limit."""
        door = counting_door()
        key = app_key(_route_path(scope)[: -len(ENDPOINT_SUFFIXES[endpoint])])
        rejection = door.refusal(key, endpoint)
        if rejection is not None:
            rejection.headers[REQUEST_ID_HEADER] = uuid.uuid4().hex
            await rejection_response(rejection)(scope, receive, send)
            return
        door.enter(key)
        try:
            await self.app(scope, receive, send)
        finally:
            door.leave(key)


def _route_path(scope: dict) -> str:
    """The path Serve's proxy matches route prefixes against (without `http_options.root_path`)."""
    path, root_path = scope["path"], scope.get("root_path", "")
    return path[len(root_path):] if root_path and path.startswith(root_path) else path


_counting_door: CountingDoor | None = None


def counting_door() -> CountingDoor:
    """This process's counting door (`proxy_door.py`), made at its first request."""
    global _counting_door
    if _counting_door is None:
        _counting_door = CountingDoor()
    return _counting_door


def middlewares() -> list[Middleware]:
    """Serve's HTTP callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""
    return [Middleware(ShedAtDoor)]
