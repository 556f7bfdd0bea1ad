"""Every HTTP error of the ingress is OpenAI error JSON, whatever raised it.

Installed on the Router's FastAPI app before Serve freezes it (`install_openai_errors`):

- a policy's `Rejection` (limits, API keys): its status, body and headers;
- Starlette's own HTTP errors: unknown path (404), wrong method (405, with `Allow`);
- FastAPI's request validation errors: 400;
- anything else raised before the response started: 500 JSON, logged with its traceback.
  Without this, Starlette answers plain-text "Internal Server Error". An error after a stream
  started cannot change the status any more; the Router ends such streams with an error event.

Serve's own proxy errors (its 503 backpressure, 408 timeout) never reach this app; the
Router's admission keeps requests from reaching them.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.policy.errors import Rejection, openai_error

logger = logging.getLogger("ray.serve")

_TYPES = {404: "NotFoundError", 405: "MethodNotAllowedError", 413: "RequestTooLargeError"}


def install_openai_errors(app: FastAPI) -> None:
    app.add_exception_handler(Rejection, _rejection)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(UnexpectedErrorsAsJSON)


def rejection_response(exc: Rejection) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


async def _rejection(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Rejection)
    return rejection_response(exc)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        message = f"Not found: {request.method} {request.url.path}"
    elif status == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}"
    else:
        message = str(exc.detail)
    err_type = _TYPES.get(status) or _type_of(status)
    return JSONResponse(openai_error(status, message, err_type), status, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    body = openai_error(400, f"{param}: {first.get('msg')}", "BadRequestError", param)
    return JSONResponse(body, 400)


def _type_of(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "BadRequestError" if status < 500 else "InternalServerError"
    return phrase.title().replace(" ", "").replace("-", "") + "Error"


class UnexpectedErrorsAsJSON:
    """ASGI middleware: an exception that escapes the app before the response started is
    answered as a 500 OpenAI error (and logged), not as Starlette's plain text."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if _client_gone(exc):
                raise  # nobody to answer, and nothing went wrong here
            logger.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            message = f"Internal error: {type(exc).__name__}: {exc}"[:1000]
            body = openai_error(500, message, "InternalServerError")
            await JSONResponse(body, 500)(scope, receive, send)


def _client_gone(exc: Exception) -> bool:
    """Whether `exc` is Ray Serve telling the app that its client disconnected: the proxy
    cancels the request, and the app's next read of the request raises this."""
    from ray.exceptions import TaskCancelledError

    return isinstance(exc, TaskCancelledError)
