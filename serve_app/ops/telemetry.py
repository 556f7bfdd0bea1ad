"""What the Router and the servers call at each point of a request's life: metrics and spans.

The Router holds one `RouterTelemetry`; each request gets a `RequestTelemetry` from `begin` and
reports its steps to it, one call each (`admitted`, `routed`, `prefill_started` /
`prefill_finished`, `fell_back`, `decode_started` / `decode_first_item`, then `respond` or
`finish`). Each server replica holds one `ServerTelemetry`; its `span` starts the server's
span from the Router's carrier. The policy (what a route is, when to fall back) is not decided
here: this module only records what the Router decided.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from opentelemetry.trace import SpanKind

from serve_app.config import AppConfig
from serve_app.ops import tracing
from serve_app.ops.metrics import RouterMetrics, ServerMetrics, exposition, server_families
from serve_app.policy.errors import REQUEST_ID_HEADER

_CURRENT: contextvars.ContextVar[RequestTelemetry | None] = contextvars.ContextVar(
    "pd_request_telemetry", default=None
)
_FINISH_REASON = re.compile(r'"finish_reason":\s*"([a-z_]+)"')
_USAGE = re.compile(r'"usage":\s*\{')


class RouterTelemetry:
    """The Router replica's metrics registry and tracer."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self.metrics = RouterMetrics()
        self.tracer = tracing.Tracer(cfg.telemetry.tracing, "Router")

    def begin(self, endpoint: str, headers: Mapping[str, str] | None = None) -> RequestTelemetry:
        """A request arrived (HTTP headers, or none on the handle API). The record is also the
        current one of this task and the tasks it starts (`current_request`)."""
        record = RequestTelemetry(self, endpoint, headers or {})
        _CURRENT.set(record)
        return record

    def shed(self, endpoint: str, reason: str) -> None:
        self.metrics.shed.labels(endpoint, reason).inc()

    def shed_at_proxy(self, new_sheds: dict[str, int]) -> None:
        """Serve's proxies refused these (per endpoint) for this app since the last scrape
        (`policy/proxy_door.py`): counted as the Router counts its own 429s."""
        for endpoint, count in new_sheds.items():
            self.metrics.shed.labels(endpoint, "capacity_at_proxy").inc(count)
            self.metrics.requests.labels(endpoint, "429", "none", "").inc(count)

    def set_waiting(self, num_waiting: int) -> None:
        self.metrics.waiting.set(num_waiting)

    async def scrape(self, servers: dict[tuple[str, str], Any]) -> bytes:
        """`GET /metrics`: this registry plus each engine's server families (`servers`:
        (phase, pair) -> its server's handle); a server that does not answer is left out."""
        timeout = self.cfg.telemetry.metrics.engine_timeout_s
        engines = list(servers)
        answers = await asyncio.gather(
            *(asyncio.wait_for(servers[e].metrics.remote(), timeout) for e in engines),
            return_exceptions=True,
        )
        families = {}
        for (phase, pair), answer in zip(engines, answers, strict=True):
            is_up = not isinstance(answer, BaseException)
            self.metrics.engine_up.labels(phase, pair).set(1 if is_up else 0)
            if is_up:
                families[(phase, pair)] = answer
        return exposition(self.metrics.registry, families)


def current_request() -> RequestTelemetry | NullRequest:
    """The request this task serves (`RouterTelemetry.begin`), or one that records nothing."""
    return _CURRENT.get() or NullRequest()


class NullRequest:
    """Stands in where no request was begun: every step is a no-op."""

    def __init__(self) -> None:
        self.request_id = uuid.uuid4().hex

    def carrier(self) -> dict[str, str]:
        return {}

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class RequestTelemetry:
    """One request as the Router sees it: its SERVER span, its clock, its labels."""

    def __init__(self, owner: RouterTelemetry, endpoint: str, headers: Mapping[str, str]) -> None:
        self._metrics = owner.metrics
        self.endpoint = endpoint
        self.route = "none"
        self.reason = ""
        self.is_stream = False
        self._started = time.perf_counter()
        self._prefill_started: float | None = None
        self._prefill_returned: float | None = None
        self._first_token: float | None = None
        self._phases: list[str] = []
        self._is_finished = False
        operation = tracing.OPERATION_NAMES.get(endpoint, endpoint)
        self.span = owner.tracer.start_request(
            f"{operation} {owner.cfg.model.name}", headers,
            {"gen_ai.operation.name": operation, "pd.endpoint": endpoint},
        )
        self.request_id = tracing.request_id(self.span)
        self.span.set_attribute("pd.request_id", self.request_id)

    def headers(self) -> dict[str, str]:
        """Response headers naming the request and its trace: ours, and W3C's `traceresponse`."""
        context = self.span.get_span_context()
        return {
            REQUEST_ID_HEADER: self.request_id,
            "traceresponse": f"00-{self.request_id}-{int(context.trace_flags):02x}",
        }

    # ---- the steps ------------------------------------------------------------------------

    def admitted(self, request: Any) -> None:
        """The body parsed into vLLM's request model."""
        self.is_stream = bool(getattr(request, "stream", False))
        if self.span.is_recording():
            self.span.set_attributes(tracing.request_attributes(self.endpoint, request))

    def routed(self, route: str, reason: str = "") -> None:
        """The Router's route decision (`disaggregated`, `decode_only`, ...) and why."""
        self.route, self.reason = route, reason
        self.span.set_attributes({"pd.route": route, "pd.route.reason": reason})

    def carrier(self) -> dict[str, str]:
        """The trace context to pass with a handle call to a server."""
        return tracing.carrier(self.span)

    def prefill_started(self) -> None:
        self._prefill_started = time.perf_counter()
        self._enter("prefill")

    def prefill_finished(self, answer: Any) -> None:
        """What the Router's prefill step returned: a `PrefillResult` (`ok`), an error outcome
        for the client (`client_error`, or `failed` for a 5xx), or None (`failed`)."""
        if answer is None:
            outcome = "failed"
        elif hasattr(answer, "kv_transfer_params"):
            outcome = "ok"
        else:
            outcome = "client_error" if getattr(answer, "status", 500) < 500 else "failed"
        now = time.perf_counter()
        self._leave("prefill")
        if self._prefill_started is not None:
            self._metrics.prefill_call.labels(self.endpoint, outcome).observe(
                now - self._prefill_started
            )
        if outcome == "ok":
            self._prefill_returned = now

    def fell_back(self, failed_phase: str, route: str, reason: str) -> None:
        """`failed_phase`'s engine failed; the request runs whole on the other (`route`)."""
        self._metrics.fallbacks.labels(self.endpoint, f"{failed_phase}_failed").inc()
        self.span.add_event("fallback", {"pd.fallback.failed_phase": failed_phase})
        self.routed(route, reason)

    def generate_started(self, phase: str) -> None:
        """A generate stream was opened on `phase`'s server."""
        self._enter(phase)

    def first_item(self, phase: str) -> None:
        """`phase`'s first item reached the Router: after a prefill, the end of the handoff."""
        if phase == "decode" and self._prefill_returned is not None:
            self._metrics.handoff.labels(self.endpoint).observe(
                time.perf_counter() - self._prefill_returned
            )
            self._prefill_returned = None

    def first_token(self) -> None:
        if self._first_token is None:
            self._first_token = time.perf_counter()
            if self.is_stream:
                self._metrics.time_to_first_token.labels(self.endpoint, self.route).observe(
                    self._first_token - self._started
                )

    # ---- the end --------------------------------------------------------------------------

    def respond(self, status: int, body: dict | None, stream: AsyncIterator[str] | None) -> Any:
        """The outcome leaves the Router: a stream is watched to its end, anything else ends
        the request now. Returns the stream to send (or None)."""
        if stream is None:
            self.finish(status, body)
            return None
        return _Watched(self, stream)

    async def _watch(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        status, error, usage, reasons = 200, None, None, []
        try:
            async for text in stream:
                self.first_token()
                if _USAGE.search(text):
                    usage = _last_usage(text) or usage
                if '"finish_reason"' in text:
                    reasons += _FINISH_REASON.findall(text)
                if 'data: {"error"' in text:
                    status, error = _error_status(text), "stream_error"
                yield text
        except (GeneratorExit, asyncio.CancelledError):
            status, error = 499, "cancelled"  # the client left
            raise
        except BaseException as exc:
            status, error = 500, type(exc).__name__
            raise
        finally:
            self.finish(status, usage=usage, finish_reasons=reasons, error=error)
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()  # the inner generators' own clean-up runs now, not at GC

    def finish(
        self,
        status: int,
        body: dict | None = None,
        usage: dict | None = None,
        finish_reasons: list[str] | None = None,
        error: str | None = None,
    ) -> None:
        """Count the request and end its span (once; later calls do nothing)."""
        if self._is_finished:
            return
        self._is_finished = True
        for phase in list(self._phases):
            self._leave(phase)
        now = time.perf_counter()
        m = self._metrics
        m.requests.labels(self.endpoint, str(status), self.route, self.reason).inc()
        m.request_duration.labels(self.endpoint, self.route).observe(now - self._started)
        if body is not None and status == 200:
            usage = body.get("usage") or usage
            finish_reasons = [c.get("finish_reason") for c in body.get("choices") or []]
        num_output = (usage or {}).get("completion_tokens")
        if self.is_stream and self._first_token is not None and num_output and num_output > 1:
            m.time_per_output_token.labels(self.endpoint, self.route).observe(
                (now - self._first_token) / (num_output - 1)
            )
        if self.span.is_recording():
            self.span.set_attributes(tracing.usage_attributes(usage))
            if finish_reasons:
                self.span.set_attribute(
                    "gen_ai.response.finish_reasons", [r for r in finish_reasons if r]
                )
            if body is not None and body.get("id"):
                self.span.set_attribute("gen_ai.response.id", body["id"])
        if error is None and body is not None and status >= 400:
            error = ((body.get("error") or {}).get("type")) or None
        tracing.end(self.span, status, error)

    def _enter(self, phase: str) -> None:
        self._phases.append(phase)
        self._metrics.in_flight.labels(phase).inc()

    def _leave(self, phase: str) -> None:
        if phase in self._phases:
            self._phases.remove(phase)
            self._metrics.in_flight.labels(phase).dec()


def _last_usage(text: str) -> dict | None:
    """The usage of the last event in `text` that has one (a usage chunk, or any chunk with
    `continuous_usage_stats`)."""
    for event in reversed(text.split("\n\n")):
        if event.startswith("data: {") and _USAGE.search(event):
            try:
                return json.loads(event[len("data: "):]).get("usage")
            except ValueError:
                return None
    return None


def _error_status(text: str) -> int:
    try:
        event = text[text.index('data: {"error"'):].split("\n\n", 1)[0]
        code = json.loads(event[len("data: "):])["error"].get("code")
        return int(code) if code else 500
    except (ValueError, KeyError, TypeError, AttributeError):
        return 500


class _Watched:
    """The response stream, watched: TTFT at its first item, usage and errors as they pass, the
    request finished at its end, or when it is dropped without ever being read (a client gone
    before the first byte: Starlette then never iterates it)."""

    def __init__(self, record: RequestTelemetry, stream: AsyncIterator[str]) -> None:
        self._record = record
        self._stream = stream

    def __aiter__(self) -> AsyncIterator[str]:
        return self._record._watch(self._stream)

    def __del__(self) -> None:
        self._record.finish(499, error="never_read")  # a no-op once the stream has finished


class ServerTelemetry:
    """A server replica's spans and per-request metrics (vLLM records its own beside them)."""

    def __init__(self, cfg: AppConfig, role: str) -> None:
        self.role = role
        self.metrics = ServerMetrics()
        component = "PrefillServer" if role == "prefill" else "DecodeServer"
        self.tracer = tracing.Tracer(cfg.telemetry.tracing, component)
        self.engine_spans = self.tracer.is_enabled and cfg.telemetry.tracing.engine_spans

    def families(self) -> list[Any]:
        return server_families(self.metrics.registry)

    def span(self, name: str, carrier: Mapping[str, str] | None, attributes: dict) -> Any:
        """The server's SERVER span, a child of the Router's span named by `carrier`."""
        return self.tracer.start_child(name, carrier, attributes, SpanKind.SERVER)

    def child(self, name: str, parent: Any, attributes: dict | None = None) -> Any:
        return self.tracer.start_child(name, parent, attributes)

    def engine_headers(self, span: Any) -> dict[str, str] | None:
        """Trace headers for vLLM, so its `llm_request` span joins (only when it traces)."""
        return tracing.carrier(span) if self.engine_spans and span.is_recording() else None

    def shutdown(self) -> None:
        self.tracer.shutdown()

    def end_prefill(self, span: Any, answer: Any) -> None:
        """End the prefill span with prefill's answer: a `PrefillResult` or vLLM's error."""
        from serve_app.protocol import PrefillResult

        if not isinstance(answer, PrefillResult):
            error = getattr(answer, "error", None)
            tracing.end(span, int(getattr(error, "code", None) or 500), getattr(error, "type", None))
            return
        if span.is_recording():
            span.set_attributes({
                "gen_ai.usage.input_tokens": answer.num_prompt_tokens,
                "pd.kv.num_blocks": _num_blocks(answer.kv_transfer_params.remote_block_ids),
            })
        tracing.end(span, 200)

    def start_decode(self, carrier: Mapping[str, str] | None, request: Any, block_bytes: int):
        return DecodeTrace(self, carrier, request, block_bytes)


class DecodeTrace:
    """One decode stream: the `decode` span, its `kv_handoff` child when decode reads prefill's
    blocks (ended by decode's first item, when the read is done), and the bytes it read."""

    def __init__(
        self, owner: ServerTelemetry, carrier: Mapping[str, str] | None, request: Any,
        block_bytes: int,
    ) -> None:
        self._owner = owner
        params = getattr(request, "kv_transfer_params", None) or {}
        self.is_handoff = bool(params.get("do_remote_prefill"))
        self.kv_bytes = 0
        if self.is_handoff:
            self.kv_bytes = _num_blocks(params.get("remote_block_ids")) * block_bytes
        request_id = getattr(request, "request_id", None) or ""
        # The prefill engine runs whole requests too (failover): its span says so.
        name = "decode" if owner.role == "decode" else f"{owner.role}.generate"
        self.span = owner.span(name, carrier, {"pd.request_id": request_id})
        self.engine_headers = owner.engine_headers(self.span)
        self._handoff = None
        if self.is_handoff:
            self._handoff = owner.child("kv_handoff", self.span, {
                "pd.kv.bytes": self.kv_bytes,
                "pd.kv.num_blocks": _num_blocks(params.get("remote_block_ids")),
                "pd.kv.remote_engine_id": str(params.get("remote_engine_id") or ""),
            })
        self._status: int | None = None
        self._error: str | None = None

    def item(self, item: Any) -> None:
        """Each item decode yields; the first one ends the handoff."""
        if self._status is not None:
            return
        error = getattr(item, "error", None)
        if error is not None:
            self._status, self._error = int(getattr(error, "code", None) or 500), error.type
        else:
            self._status = 200
            if self.is_handoff:
                self._owner.metrics.kv_handoff_bytes.observe(self.kv_bytes)
        self._end_handoff(self._error)

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
            self._status, self._error = 499, "cancelled"  # the caller left: not our error
        else:
            self._status, self._error = 500, type(exc).__name__

    def end(self, usage: dict | None) -> None:
        self._end_handoff(self._error or ("no_output" if self._status is None else None))
        if self.span.is_recording():
            self.span.set_attributes(tracing.usage_attributes(usage))
        tracing.end(self.span, self._status, self._error)

    def _end_handoff(self, error: str | None) -> None:
        if self._handoff is not None:
            tracing.end(self._handoff, None, error)
            self._handoff = None


def _num_blocks(block_ids: Any) -> int:
    """Blocks in `remote_block_ids` (flat, or one list per KV cache group: the first)."""
    if not block_ids:
        return 0
    first = block_ids[0]
    return len(first) if isinstance(first, (list, tuple)) else len(block_ids)
