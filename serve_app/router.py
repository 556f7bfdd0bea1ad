"""The `Router` ingress: OpenAI HTTP API in front of pairs of prefill and decode engines.

The steps of one request (`Router._run`), each decision a named call into `policy/`:

0. The HTTP layer first checks the API key, the body size, the JSON and the prompt limits
   (`policy/auth.py`, `policy/limits.py`); each refusal is OpenAI JSON.
1. Admit: a slot of `router.admission`, or a 429 with `Retry-After` at once
   (`policy/admission.py`), before any other work; both engines down is a 503 at once.
   Where the Router serves HTTP itself, a full one refuses completions before step 0, in front
   of Serve and FastAPI (`policy/door.py`); Serve's proxy refuses them once as many are open
   there as the app's Routers can hold, as each posts it (`policy/proxy_door.py`).
2. Validate: parse the JSON body into vLLM's own request model; bad input answers an OpenAI error
   (400 malformed / invalid, 404 unknown model) before any engine sees it.
3. Count: the prompt is tokenized once, here (`prompt_tokens.py`); the ids travel on, so no
   engine tokenizes it again.
4. Route: a pair (one prefill and one decode engine on one GPU, `policy/pairs.py`: the less
   loaded of two whole pairs), then within it disaggregated, decode-only (short prompt, prefill
   backlog, prefill down, KV layouts that disagree) or prefill-only (a few output tokens, decode
   down)
   (`policy/route.py`). The decisions go back in the `x-pd-pair` and `x-pd-route` headers.
5. Prefill: the PrefillServer runs a copy of the request with `max_tokens=1` and
   `kv_transfer_params={"do_remote_decode": true}`; it returns where the prompt's KV blocks wait.
   A client error there (prompt too long, ...) goes back to the client as is. A server failure
   or a call past `failover.prefill_deadline_s` falls back to decode-only
   (`router.fallback_to_decode`) instead of failing the request.
6. Hand off: the decode copy of the request carries prefill's `kv_transfer_params` verbatim.
7. Decode: the DecodeServer reads the blocks over NIXL (no recompute) and generates.
   A streamed completion gets prefill's token at once instead, and decode continues after it
   (`router.first_token_from_prefill`, see `first_token.py`). An engine that fails before its
   first byte is marked down and the request runs whole on the other one.
8. Stream: the engine's SSE events go to the client untouched (or its one JSON response).
9. Finish or clean up: the slot is released at the stream's end; a client that leaves closes the
   decode stream, which aborts the request in the decode engine; one that leaves between prefill
   and decode makes the router release the blocks prefill holds for it, so nothing waits for a
   lease to expire.

Steps 5 to 9 call the engines through `EngineCalls` (`engine_calls.py`); what one step hands
the next (an error, one JSON body or an SSE stream) is an `Outcome` (`outcome.py`).

Between requests the router probes every pair's engines (`_monitor`, `policy/health.py`), so a
dead or restarting engine is routed around at once (new requests go to whole pairs, else to the
surviving engine) and traffic returns when it answers again; and it renews its capacity notice
for the proxies (`RouterBoard.post_forever`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import RayServeException

from serve_app import first_token
from serve_app.config import AppConfig
from serve_app.engine_calls import EngineCalls
from serve_app.ops.metrics import CONTENT_TYPE
from serve_app.ops.telemetry import RouterTelemetry, current_request
from serve_app.outcome import Guarded, Outcome
from serve_app.pairs import on_pair, replica_nodes
from serve_app.plan import ModelShape, load_model_shape
from serve_app.policy import limits
from serve_app.policy.admission import Admission, Slot
from serve_app.policy.auth import ApiKeys
from serve_app.policy.door import Door, open_door
from serve_app.policy.errors import Rejection
from serve_app.policy.errors import openai_error as error_body
from serve_app.policy.health import LoopStalls, is_compatible
from serve_app.policy.http_errors import install_openai_errors
from serve_app.policy.pairs import Pair, PairSet
from serve_app.policy.proxy_door import RouterBoard
from serve_app.policy.route import (
    UNIFIED,
    PhaseView,
    Route,
    RouteDecision,
    RoutePolicy,
    fallback,
    short_output_tokens,
    short_prompt_tokens,
)
from serve_app.prompt_tokens import PromptTokens
from serve_app.protocol import (
    Endpoint,
    PrefillResult,
    RequestError,
    can_disaggregate,
    max_output_tokens,
    prepare_decode_request,
)

fastapi_app = FastAPI(title="pd-serve")
install_openai_errors(fastapi_app)  # every error OpenAI JSON: before Serve freezes the app


def _model_shape(cfg: AppConfig) -> ModelShape | None:
    """The model's shape from its config.json, where the planner knows it."""
    try:
        return load_model_shape(cfg.model.source)
    except Exception:  # noqa: BLE001 - unknown shape: the threshold falls back to its default
        return None


def _nodes_of(handle: Any) -> set[str]:
    return set(replica_nodes(handle.app_name, handle.deployment_name).values())


DISCOVERY_WAIT_S = 10.0
"""How long a request waits for the router to learn its first pair (just after a start)."""


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
        self.api_keys = ApiKeys.load(self.cfg.auth)  # HTTP only; fails the start if none found
        self.prefill = prefill
        self.decode = decode
        self.engine_calls = EngineCalls(self.cfg)  # prefill, generate, relay, release
        self.request_models = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
        # Decode must be able to load fewer tokens than its prompt (our vLLM plugin's clamp).
        from serve_app.vllm_plugin import pull_scheduler_class

        self.first_token = (
            self.cfg.router.first_token_from_prefill and pull_scheduler_class() is not None
        )
        self.prompt_tokens = PromptTokens(self.cfg.model.tokenizer_source)
        self.route_policy = RoutePolicy(
            self.cfg.router.routing,
            short_prompt_tokens(self.cfg, _model_shape(self.cfg)),
            short_output_tokens(self.cfg),
        )
        self.stalls = LoopStalls()
        phases = {"decode": decode} if prefill is None else {"prefill": prefill, "decode": decode}
        self.pairs = PairSet(phases, self.stalls)
        self._discovered = False
        self.admission = Admission(self.cfg.router.admission, self._is_decode_full)
        self._monitor_tasks: list[asyncio.Task] = []
        self.board = self._board()
        self.telemetry = RouterTelemetry(self.cfg)
        # A full Router refuses completions in front of Serve and FastAPI (direct ingress).
        open_door(Door(self.admission, self.api_keys, self.telemetry, self._is_serving))

    # ---- HTTP -----------------------------------------------------------------------------

    @fastapi_app.post("/v1/completions")
    async def http_completions(self, raw: Request) -> Response:
        return await self._http(raw, "completions")

    @fastapi_app.post("/v1/chat/completions")
    async def http_chat_completions(self, raw: Request) -> Response:
        return await self._http(raw, "chat")

    @fastapi_app.get("/v1/models")
    async def http_models(self, raw: Request) -> Response:
        self.api_keys.check(raw.headers.get("authorization"))
        return JSONResponse(await self.decode.list_models.remote())

    @fastapi_app.get("/health")
    async def http_health(self) -> Response:
        """200 while some engine can serve (the router routes around the others), with each
        phase's and each pair's engine state; 503 when none can. Probes them all now, not from
        memory."""
        self._ensure_monitor()
        await self._discover()
        timeout_s = self.cfg.router.health_timeout_s
        await asyncio.gather(*(
            self._probe(pair, phase, timeout_s, fresh=True)
            for pair in self.pairs for phase in pair.present
        ))
        if not self.pairs.is_serving():
            message = f"engine unhealthy: {self.pairs.reasons()}"
            return JSONResponse(error_body(503, message, "ServiceUnavailableError"), 503)
        pairs = {
            pair.name: {p: "up" if h.is_up else h.reason for p, h in pair.health.items()}
            for pair in self.pairs
        }
        engines: dict[str, str] = {}  # per phase: up where some pair's is, else a reason
        for states in pairs.values():
            for phase, state in states.items():
                engines[phase] = "up" if "up" in (state, engines.get(phase)) else state
        return JSONResponse({"status": "ok", "engines": engines, "pairs": pairs})

    @fastapi_app.get("/metrics")
    async def http_metrics(self) -> Response:
        """Prometheus text: the Router's metrics and each engine's vLLM metrics (`phase`,
        `pair`)."""
        self.telemetry.set_waiting(self.admission.num_waiting)
        if self.board is not None:
            self.telemetry.shed_at_proxy(await self.board.new_sheds())
        await self._discover()
        servers = {
            ("unified" if self.prefill is None else phase, pair.name): pair.server(phase)
            for pair in self.pairs for phase in pair.present
        }
        return Response(await self.telemetry.scrape(servers), media_type=CONTENT_TYPE)

    async def _http(self, raw: Request, endpoint: Endpoint) -> Response:
        record = self.telemetry.begin(endpoint, raw.headers)
        try:
            outcome = await self._http_outcome(raw, endpoint)
        except Rejection as rejection:
            rejection.headers.update(record.headers())
            record.finish(rejection.status, rejection.body)
            raise
        except BaseException as exc:
            record.finish(500, error=type(exc).__name__)
            raise
        outcome.headers.update(record.headers())
        stream = record.respond(outcome.status, outcome.body, outcome.stream)
        if stream is None:
            return JSONResponse(outcome.body, status_code=outcome.status, headers=outcome.headers)
        return StreamingResponse(stream, media_type="text/event-stream", headers=outcome.headers)

    async def _http_outcome(self, raw: Request, endpoint: Endpoint) -> Outcome:
        """API key, body size, JSON, prompt limits (each a 4xx `Rejection`), then the request."""
        self.api_keys.check(raw.headers.get("authorization"))
        max_bytes = self.cfg.limits.max_body_bytes
        data = await limits.read_body(raw.headers.get("content-length"), raw.stream(), max_bytes)
        body = limits.parse_body(data, self.cfg.limits)
        limits.check_prompts(endpoint, body, self.cfg.limits)
        return await self._run(endpoint, body)

    # ---- Python handle API ----------------------------------------------------------------

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streaming completion for handle callers; raises `RequestError` on bad input."""
        return await self._unary("completions", body)

    async def chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._unary("chat", body)

    async def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[dict]:
        """Streaming for handle callers (`handle.options(stream=True).stream.remote(...)`):
        yields the parsed chunk dicts of the SSE stream, without `[DONE]`."""
        record = self.telemetry.begin(endpoint)
        outcome = await self._run(endpoint, {**body, "stream": True})
        stream = record.respond(outcome.status, outcome.body, outcome.stream)
        if stream is None:
            raise RequestError(outcome.status, outcome.body or {})
        async for text in stream:
            for event in text.split("\n\n"):
                data = event.removeprefix("data: ").strip()
                if data and data != "[DONE]":
                    yield json.loads(data)

    async def _unary(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        record = self.telemetry.begin(endpoint)
        outcome = await self._run(endpoint, {**body, "stream": False})
        record.respond(outcome.status, outcome.body, None)
        if outcome.status != 200 or outcome.body is None:
            raise RequestError(outcome.status, outcome.body or {})
        return outcome.body

    # ---- The request's path ---------------------------------------------------------------

    async def _run(self, endpoint: Endpoint, body: Any) -> Outcome:
        self._ensure_monitor()
        try:
            slot = await self._admit()  # first: a shed request costs as little as possible
        except Rejection as rejection:
            self.telemetry.shed(endpoint, "no_engine" if rejection.status == 503 else "capacity")
            return Outcome.rejected(rejection)
        release: Callable[[], None] = slot.release
        try:
            request = self._validate(endpoint, body)
            if isinstance(request, Outcome):
                slot.release()
                return request
            current_request().admitted(request)
            num_prompt_tokens, request = self.prompt_tokens.count(endpoint, request)
            pair = self.pairs.choose(self._is_pair_full)
            if pair is None:  # every engine went down since admission
                slot.release()
                self.telemetry.shed(endpoint, "no_engine")
                return Outcome.rejected(self._no_engine())
            release = self._assign(pair, slot)
            decision = self._route(pair, request, num_prompt_tokens)
            current_request().routed(decision.route.value, decision.reason.value)
            outcome = await self._serve(pair, endpoint, request, decision, num_prompt_tokens)
        except BaseException:
            release()
            raise
        outcome.headers["x-pd-pair"] = pair.name
        if outcome.stream is None:
            release()
        else:
            outcome.stream = Guarded(outcome.stream, [release, *outcome.cleanups])
        return outcome

    @staticmethod
    def _assign(pair: Pair, slot: Slot) -> Callable[[], None]:
        """Count the request on `pair` until the returned release (which frees `slot` too)."""
        pair.num_in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                pair.num_in_flight -= 1
                slot.release()

        return release

    def _validate(self, endpoint: Endpoint, body: Any) -> Any:
        from pydantic import ValidationError

        if not isinstance(body, dict):
            return Outcome.error(400, "The request body must be a JSON object", "BadRequestError")
        try:
            request = self.request_models[endpoint].model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return Outcome.error(400, f"{param}: {first['msg']}", "BadRequestError", param)
        except Exception as exc:  # noqa: BLE001 - vLLM's own validators (VLLMValidationError)
            return Outcome.error(400, str(exc), "BadRequestError", getattr(exc, "parameter", None))
        if request.model != self.cfg.model.name:
            return Outcome.error(
                404, f"The model `{request.model}` does not exist.", "NotFoundError", "model"
            )
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(request, name, None)
            if value is not None and value < 1:
                # Checked here: prefill runs with max_tokens=1 and would not catch it.
                return Outcome.error(
                    400, f"{name} must be at least 1, got {value}.", "BadRequestError", name
                )
        return request

    async def _admit(self) -> Slot:
        """A slot, or a `Rejection`: 503 at once when no engine is up, 429 past the limits."""
        if not self._discovered:
            await self._discover()
        if not self.pairs.is_serving():
            raise self._no_engine()
        return await self.admission.admit()

    def _is_serving(self) -> bool:
        return self._discovered and self.pairs.is_serving()

    def _no_engine(self) -> Rejection:
        return Rejection(
            503, f"No engine is available ({self.pairs.reasons()})", "ServiceUnavailableError",
            headers={"Retry-After": str(self.cfg.router.admission.retry_after_s)},
        )

    def _route(self, pair: Pair, request: Any, num_prompt_tokens: int) -> RouteDecision:
        if self.prefill is None:
            return UNIFIED
        prefill, decode = pair.health["prefill"], pair.health["decode"]
        view = PhaseView(
            is_prefill_up=prefill.is_up,
            is_decode_up=decode.is_up,
            is_compatible=is_compatible(prefill, decode),
            num_prefill_queued=pair.num_queued["prefill"],
            num_decode_queued=pair.num_queued["decode"] + decode.num_waiting_reqs,
            prefill_queued_tokens=pair.queued_tokens["prefill"],
            decode_queued_tokens=pair.queued_tokens["decode"],
        )
        return self.route_policy.decide(
            num_prompt_tokens, can_disaggregate(request), view, max_output_tokens(request)
        )

    async def _serve(
        self, pair: Pair, endpoint: Endpoint, request: Any, decision: RouteDecision,
        num_prompt_tokens: int,
    ) -> Outcome:
        request_id = current_request().request_id  # the trace id, then the Router span's
        result: PrefillResult | None = None
        if decision.route is Route.DISAGGREGATED:
            current_request().prefill_started()
            prefilled = await self.engine_calls.prefill(
                pair, endpoint, request, request_id, num_prompt_tokens
            )
            current_request().prefill_finished(prefilled)
            if isinstance(prefilled, Outcome):
                return prefilled
            if prefilled is None:
                decision = fallback()
                current_request().fell_back("prefill", decision.route.value, decision.reason.value)
            else:
                result = prefilled
                if (
                    self.first_token
                    and endpoint == "completions"
                    and first_token.can_continue(request)
                    and first_token.continues(result)
                ):
                    continued = self.engine_calls.continue_after_prefill(
                        pair, request, request_id, result
                    )
                    return self._with_route(continued, decision)
        phase = "prefill" if decision.route is Route.PREFILL_ONLY else "decode"
        decode_request = prepare_decode_request(request, request_id, result)
        outcome = await self.engine_calls.generate(
            pair, phase, endpoint, decode_request, request_id, result, num_prompt_tokens
        )
        return self._with_route(outcome, decision)

    @staticmethod
    def _with_route(outcome: Outcome, decision: RouteDecision) -> Outcome:
        outcome.headers.setdefault("x-pd-route", decision.header)
        return outcome

    # ---- Between requests -----------------------------------------------------------------

    def _is_pair_full(self, pair: Pair) -> bool:
        usage_limit = self.cfg.router.admission.decode_kv_usage_limit
        return pair.health["decode"].kv_cache_usage >= usage_limit

    def _is_decode_full(self) -> bool:
        """Every decode engine that is up is nearly full: admission waits for one to drain."""
        decodes = [pair for pair in self.pairs if pair.is_up("decode")]
        return bool(decodes) and all(self._is_pair_full(pair) for pair in decodes)

    async def _discover(self) -> None:
        """Learn the pairs from the handles' request routers (`pairs.py`). The first time,
        wait up to `DISCOVERY_WAIT_S` until every phase's replicas are known, so that no
        request finds a phase missing that is only not known yet."""
        deadline = time.monotonic() + DISCOVERY_WAIT_S
        while not self._discovered and time.monotonic() < deadline:
            for handle in self.pairs.phases.values():
                handle.options()  # a handle's request router starts with its first use
            self._discovered = all(_nodes_of(h) for h in self.pairs.phases.values())
            if not self._discovered:
                await asyncio.sleep(0.05)
        self._discovered = True
        self.pairs.refresh(_nodes_of, on_pair)

    def _board(self) -> RouterBoard | None:
        """Where this replica posts what its admission holds for Serve's proxies, which shed at
        once what the app's Routers could not take (`policy/proxy_door.py`); None without a
        bound or outside a Serve replica (a test's Router: no proxy in front)."""
        capacity = self.admission.capacity()
        if capacity is None:
            return None
        try:
            context = serve.get_replica_context()
        except RayServeException:
            return None
        return RouterBoard(context.app_name, context.replica_id.unique_id, capacity,
                           self.cfg.router.admission.retry_after_s)

    def _ensure_monitor(self) -> None:
        """The probes and the loop's stall ticker, started by the first call on this loop.

        In a context of their own, not that request's: Serve cancels the calls a cancelled
        request made, and the probes would go with it if its client left."""
        if not self._monitor_tasks or any(task.done() for task in self._monitor_tasks):
            for task in self._monitor_tasks:
                task.cancel()
            loop = asyncio.get_running_loop()
            self._monitor_tasks = [
                loop.create_task(coroutine, context=contextvars.Context())
                for coroutine in (
                    self.stalls.watch(), self._monitor(),
                    *([self.board.post_forever()] if self.board is not None else []),
                )
            ]

    async def _monitor(self) -> None:
        """Meet new pairs, probe every engine of every pair each period, all at once; wake
        admission waiters after."""
        failover = self.cfg.router.failover
        while True:
            await self._discover()
            await asyncio.gather(*(
                self._probe(pair, phase, failover.probe_timeout_s)
                for pair in self.pairs for phase in pair.present
            ))
            await self.admission.notify()
            await asyncio.sleep(failover.probe_period_s)

    async def _probe(self, pair: Pair, phase: str, timeout_s: float, fresh: bool = False) -> None:
        """One probe; `fresh`: a timeout means down, whatever answered before the probe."""
        started = self.stalls.mark()
        health = pair.health[phase]
        try:
            report = await asyncio.wait_for(pair.server(phase).probe.remote(), timeout_s)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            health.timed_out(timeout_s, started if fresh else None)
        except Exception as exc:  # noqa: BLE001 - dead, restarting or failing replica
            health.failed(f"{type(exc).__name__}: {exc}")
        else:
            health.probed(report)

