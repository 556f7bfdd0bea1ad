"""The `Router` ingress: OpenAI HTTP API in front of one prefill and one decode engine.

The steps of one request:

1. Admit: parse the JSON body into vLLM's own request model; bad input answers an OpenAI error
   (400 malformed / invalid, 404 unknown model) before any engine sees it.
2. Prefill: the PrefillServer runs a copy of the request with `max_tokens=1` and
   `kv_transfer_params={"do_remote_decode": true}`; it returns where the prompt's KV blocks wait.
   A client error there (prompt too long, ...) goes back to the client as is. A server failure
   there falls back to decode-only (`router.fallback_to_decode`) instead of failing the request.
3. Hand off: the decode copy of the request carries prefill's `kv_transfer_params` verbatim.
4. Decode: the DecodeServer reads the blocks over NIXL (no recompute) and generates.
   A streamed completion gets prefill's token at once instead, and decode continues after it
   (`router.first_token_from_prefill`, see `first_token.py`).
5. Stream: decode's SSE events go to the client untouched (or its one JSON response).
6. Finish or clean up: a client that leaves closes the decode stream, which aborts the request in
   the decode engine; one that leaves between prefill and decode makes the router release the
   blocks prefill holds for it, so nothing waits for a lease to expire.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from serve_app import first_token
from serve_app.config import AppConfig
from serve_app.protocol import (
    Endpoint,
    PrefillResult,
    RequestError,
    can_disaggregate,
    prepare_decode_request,
    prepare_prefill_request,
)

logger = logging.getLogger("ray.serve")
fastapi_app = FastAPI(title="pd-serve")


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


class _Outcome:
    """The result of running one request: an error, one JSON body, or an SSE stream."""

    def __init__(
        self,
        status: int = 200,
        body: dict | None = None,
        stream: AsyncIterator[str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.stream = stream

    @classmethod
    def error(cls, status: int, message: str, err_type: str, param: str | None = None):
        return cls(status=status, body=error_body(status, message, err_type, param))

    @classmethod
    def from_vllm(cls, response: Any) -> _Outcome:
        body = response.model_dump(exclude_none=False)
        error = body.get("error")
        status = int(error.get("code") or 500) if error else 200
        if not error:
            body.pop("kv_transfer_params", None)
        return cls(status=status, body=body)


async def _forward(first: str, stream: Any) -> AsyncIterator[str]:
    """Yield decode's SSE text; cancel decode's stream if the client goes away."""
    try:
        yield first
        async for event in stream:
            yield event
    finally:
        stream.cancel()


def _final_error_event(body: dict | None) -> str:
    """The last SSE events of a stream that fails after its first chunk went out."""
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"


# Ray pickles the ingress class by value: every module-level name it uses must be defined above.
@serve.deployment(name="Router")
@serve.ingress(fastapi_app)
class Router:
    def __init__(self, cfg: dict[str, Any], prefill: Any, decode: Any) -> None:
        """`prefill` is None in unified mode: decode's engine then runs every whole request."""
        # vLLM's protocol models: imported here so the module itself stays light.
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        self.cfg = AppConfig.model_validate(cfg)
        self.prefill = prefill
        self.decode = decode
        self.request_models = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
        # Decode must be able to load fewer tokens than its prompt (our vLLM plugin's clamp).
        from serve_app.vllm_plugin import pull_scheduler_class

        self._releases: set[asyncio.Future] = set()
        self.first_token = (
            self.cfg.router.first_token_from_prefill and pull_scheduler_class() is not None
        )

    # ---- HTTP -----------------------------------------------------------------------------

    @fastapi_app.post("/v1/completions")
    async def http_completions(self, raw: Request) -> Response:
        return await self._http(raw, "completions")

    @fastapi_app.post("/v1/chat/completions")
    async def http_chat_completions(self, raw: Request) -> Response:
        return await self._http(raw, "chat")

    @fastapi_app.get("/v1/models")
    async def http_models(self) -> Response:
        return JSONResponse(await self.decode.list_models.remote())

    @fastapi_app.get("/health")
    async def http_health(self) -> Response:
        servers = [s for s in (self.prefill, self.decode) if s is not None]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(server.check_health.remote() for server in servers)),
                timeout=self.cfg.router.health_timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            message = f"engine unhealthy: {type(exc).__name__}: {exc}"
            return JSONResponse(error_body(503, message, "ServiceUnavailableError"), 503)
        return Response(status_code=200)

    async def _http(self, raw: Request, endpoint: Endpoint) -> Response:
        try:
            body = json.loads(await raw.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return JSONResponse(
                error_body(400, f"Malformed JSON body: {exc}", "BadRequestError"), 400
            )
        outcome = await self._run(endpoint, body)
        if outcome.stream is None:
            return JSONResponse(outcome.body, status_code=outcome.status)
        return StreamingResponse(outcome.stream, media_type="text/event-stream")

    # ---- Python handle API ----------------------------------------------------------------

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streaming completion for handle callers; raises `RequestError` on bad input."""
        return await self._unary("completions", body)

    async def chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._unary("chat", body)

    async def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[dict]:
        """Streaming for handle callers (`handle.options(stream=True).stream.remote(...)`):
        yields the parsed chunk dicts of the SSE stream, without `[DONE]`."""
        outcome = await self._run(endpoint, {**body, "stream": True})
        if outcome.stream is None:
            raise RequestError(outcome.status, outcome.body or {})
        async for text in outcome.stream:
            for event in text.split("\n\n"):
                data = event.removeprefix("data: ").strip()
                if data and data != "[DONE]":
                    yield json.loads(data)

    async def _unary(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        outcome = await self._run(endpoint, {**body, "stream": False})
        if outcome.status != 200 or outcome.body is None:
            raise RequestError(outcome.status, outcome.body or {})
        return outcome.body

    # ---- The request's path ---------------------------------------------------------------

    async def _run(self, endpoint: Endpoint, body: Any) -> _Outcome:
        request = self._admit(endpoint, body)
        if isinstance(request, _Outcome):
            return request
        request_id = uuid.uuid4().hex
        result: PrefillResult | None = None
        if self.prefill is not None and can_disaggregate(request):
            prefilled = await self._prefill(endpoint, request, request_id)
            if isinstance(prefilled, _Outcome):
                return prefilled
            result = prefilled
            if (
                self.first_token
                and endpoint == "completions"
                and first_token.can_continue(request)
                and first_token.continues(result)
            ):
                return self._continue(request, request_id, result)
        decode_request = prepare_decode_request(request, request_id, result)
        return await self._decode(endpoint, decode_request, request_id, result)

    def _admit(self, endpoint: Endpoint, body: Any) -> Any:
        from pydantic import ValidationError

        if not isinstance(body, dict):
            return _Outcome.error(400, "The request body must be a JSON object", "BadRequestError")
        try:
            request = self.request_models[endpoint].model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return _Outcome.error(400, f"{param}: {first['msg']}", "BadRequestError", param)
        except Exception as exc:  # noqa: BLE001 - vLLM's own validators (VLLMValidationError)
            return _Outcome.error(400, str(exc), "BadRequestError", getattr(exc, "parameter", None))
        if request.model != self.cfg.model.name:
            return _Outcome.error(
                404, f"The model `{request.model}` does not exist.", "NotFoundError", "model"
            )
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(request, name, None)
            if value is not None and value < 1:
                # Checked here: prefill runs with max_tokens=1 and would not catch it.
                return _Outcome.error(
                    400, f"{name} must be at least 1, got {value}.", "BadRequestError", name
                )
        return request

    async def _prefill(self, endpoint: Endpoint, request: Any, request_id: str) -> Any:
        try:
            response = await self.prefill.prefill.remote(
                endpoint, prepare_prefill_request(request, request_id)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a dead or failing prefill replica
            return self._prefill_failed(f"{type(exc).__name__}: {exc}")
        if isinstance(response, PrefillResult):
            return response
        outcome = _Outcome.from_vllm(response)
        if outcome.status < 500:
            return outcome
        return self._prefill_failed(str(outcome.body))

    def _prefill_failed(self, reason: str) -> Any:
        if self.cfg.router.fallback_to_decode:
            logger.warning("prefill failed (%s); decode runs the whole request", reason)
            return None
        return _Outcome.error(503, f"prefill failed: {reason}", "ServiceUnavailableError")

    async def _decode(
        self, endpoint: Endpoint, request: Any, request_id: str, result: PrefillResult | None
    ) -> _Outcome:
        stream = self.decode.options(stream=True).generate.remote(endpoint, request)
        try:
            first = await stream.__anext__()
        except BaseException as exc:
            stream.cancel()
            if result is not None:
                await self._release(request_id, result)
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
                raise
            return _Outcome.error(503, f"decode failed: {exc}", "ServiceUnavailableError")
        if not isinstance(first, str):
            stream.cancel()
            return _Outcome.from_vllm(first)
        return _Outcome(stream=_forward(first, stream))

    def _continue(self, request: Any, request_id: str, result: PrefillResult) -> _Outcome:
        """Stream prefill's token now; decode streams the rest after it."""
        decode_request = first_token.continuation_request(request, request_id, result)
        stream = self.decode.options(stream=True).generate.remote("completions", decode_request)
        return _Outcome(stream=self._continuation(request, request_id, result, stream))

    async def _continuation(
        self, request: Any, request_id: str, result: PrefillResult, stream: Any
    ) -> AsyncIterator[str]:
        rewrite = first_token.ContinuationEvents()
        started = False
        try:
            yield first_token.first_chunk(request, request_id, result)
            async for item in stream:
                started = True
                if isinstance(item, str):
                    yield rewrite(item)
                    continue
                # An error response instead of a stream: the client already has a token,
                # so it ends the stream as vLLM ends one that fails midway.
                yield _final_error_event(_Outcome.from_vllm(item).body)
        except Exception as exc:  # noqa: BLE001 - the decode replica failed
            yield _final_error_event(
                error_body(503, f"decode failed: {exc}", "ServiceUnavailableError")
            )
        finally:
            stream.cancel()
            if not started:
                # Decode may never have seen the request (client gone, decode failed):
                # free prefill's blocks now. Not awaited: this may run in a cancelled task.
                task = asyncio.ensure_future(self._release(request_id, result))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

    async def _release(self, request_id: str, result: PrefillResult) -> None:
        try:
            await self.decode.release_remote_kv.remote(request_id, result.kv_transfer_params)
        except Exception:  # noqa: BLE001 - best effort; the lease frees them later anyway
            logger.warning("could not release prefill blocks of %s", request_id, exc_info=True)
