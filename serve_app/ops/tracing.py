"""OpenTelemetry traces: one trace per request across Router -> prefill -> KV handoff -> decode.

The spans of one request (all in one trace, never any prompt or output text):

    {operation} {model}   SERVER    Router: continues an incoming W3C `traceparent` or starts one
    |-- prefill           SERVER    PrefillServer: the prompt, max_tokens=1
    |   '-- llm_request             vLLM's own span (when `engine_spans` is on)
    '-- decode            SERVER    DecodeServer: the whole decode stream
        |-- kv_handoff    INTERNAL  decode's read of prefill's blocks, until its first token
        '-- llm_request             vLLM's own span (when `engine_spans` is on)

The context crosses each Ray Serve handle call explicitly: the caller passes a carrier dict
(`carrier(span)`, the W3C headers) as an argument and the callee starts its span from it.

Each process has its own `TracerProvider` (vLLM sets the global one when its tracing is on).
With tracing off the provider samples nothing and has no exporter: spans are non-recording,
cost microseconds, and still carry a fresh trace id, which names the request either way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from opentelemetry import propagate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from serve_app.config import TracingConfig

DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
DEFAULT_GRPC_ENDPOINT = "localhost:4317"
OPERATION_NAMES = {"completions": "text_completion", "chat": "chat"}


def is_enabled(cfg: TracingConfig) -> bool:
    return cfg.enabled and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"


def protocol(cfg: TracingConfig) -> str:
    return (
        cfg.protocol
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )


def traces_endpoint(cfg: TracingConfig) -> str:
    """The OTLP traces endpoint: a full URL for http/protobuf, `host:port` for grpc."""
    grpc = protocol(cfg) == "grpc"
    signal_specific = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if cfg.endpoint is None and signal_specific:
        return signal_specific  # used as is, by the spec
    base = cfg.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base is None:
        return DEFAULT_GRPC_ENDPOINT if grpc else DEFAULT_HTTP_ENDPOINT + "/v1/traces"
    if not grpc and urlparse(base).path in ("", "/"):
        return base.rstrip("/") + "/v1/traces"
    return base


def sampling_ratio(cfg: TracingConfig) -> float:
    if cfg.sampling_ratio is not None:
        return cfg.sampling_ratio
    raw = os.environ.get("OTEL_TRACES_SAMPLER_ARG")
    try:
        return min(1.0, max(0.0, float(raw))) if raw else 1.0
    except ValueError:
        return 1.0


def _exporter(cfg: TracingConfig) -> Any:
    endpoint = traces_endpoint(cfg)
    if protocol(cfg) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint)


class Tracer:
    """The spans of one process (`component`: Router, PrefillServer or DecodeServer)."""

    def __init__(self, cfg: TracingConfig, component: str) -> None:
        self.is_enabled = is_enabled(cfg)
        attributes = {"pd.component": component}
        if "OTEL_SERVICE_NAME" not in os.environ:
            attributes["service.name"] = cfg.service_name
        if self.is_enabled:
            self._provider = TracerProvider(
                resource=Resource.create(attributes),
                sampler=ParentBased(TraceIdRatioBased(sampling_ratio(cfg))),
            )
            self._provider.add_span_processor(
                BatchSpanProcessor(_exporter(cfg), schedule_delay_millis=cfg.batch_delay_ms)
            )
        else:
            # Not parent-based: an incoming sampled `traceparent` must not turn export on.
            self._provider = TracerProvider(resource=Resource.create(attributes), sampler=ALWAYS_OFF)
        self._tracer = self._provider.get_tracer("serve_app")

    def start_request(self, name: str, headers: Mapping[str, str], attributes: dict) -> Span:
        """The Router's SERVER span, continuing the client's `traceparent` if it sent one."""
        context = propagate.extract(dict(headers.items()))
        return self._tracer.start_span(name, context, SpanKind.SERVER, attributes)

    def start_child(
        self,
        name: str,
        parent: Mapping[str, str] | Span | None,
        attributes: dict | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> Span:
        """A span under `parent`: a carrier from another deployment, or a span of this one."""
        if isinstance(parent, Span):
            context = set_span_in_context(parent)
        else:
            context = propagate.extract(dict(parent or {}))
        return self._tracer.start_span(name, context, kind, attributes)

    def shutdown(self) -> None:
        self._provider.shutdown()

    def force_flush(self) -> None:
        self._provider.force_flush()


def carrier(span: Span) -> dict[str, str]:
    """The W3C headers naming `span`: passed with a handle call, or to vLLM as trace headers."""
    headers: dict[str, str] = {}
    propagate.inject(headers, context=set_span_in_context(span))
    return headers


def trace_id(span: Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def request_id(span: Span) -> str:
    """The request id: the trace id, then the Router span's id (unique even when two requests
    continue the same incoming trace)."""
    context = span.get_span_context()
    return f"{context.trace_id:032x}-{context.span_id:016x}"


def end(span: Span, status_code: int | None = None, error: str | None = None) -> None:
    """End `span` with the outcome: 5xx and failures are errors; a 4xx is the client's (OTel's
    HTTP server rule: status unset), with `error.type` naming it."""
    if span.is_recording():
        if status_code is not None:
            span.set_attribute("http.response.status_code", status_code)
        if error is not None or (status_code or 0) >= 400:
            span.set_attribute("error.type", error or str(status_code))
        is_error = status_code >= 500 if status_code is not None else error is not None
        if is_error:
            span.set_status(Status(StatusCode.ERROR, error or f"HTTP {status_code}"))
    span.end()


def request_attributes(endpoint: str, request: Any) -> dict[str, Any]:
    """GenAI attributes of an OpenAI request (vLLM's request model): parameters, never text."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATION_NAMES.get(endpoint, endpoint),
        "gen_ai.request.model": request.model,
        "pd.request.stream": bool(getattr(request, "stream", False)),
    }
    max_tokens = getattr(request, "max_completion_tokens", None) or getattr(
        request, "max_tokens", None
    )
    for key, value in (
        ("gen_ai.request.max_tokens", max_tokens),
        ("gen_ai.request.temperature", getattr(request, "temperature", None)),
        ("gen_ai.request.top_p", getattr(request, "top_p", None)),
        ("gen_ai.request.seed", getattr(request, "seed", None)),
    ):
        if value is not None:
            attributes[key] = value
    return attributes


def usage_attributes(usage: Mapping[str, Any] | None) -> dict[str, int]:
    if not usage:
        return {}
    attributes = {}
    if usage.get("prompt_tokens") is not None:
        attributes["gen_ai.usage.input_tokens"] = int(usage["prompt_tokens"])
    if usage.get("completion_tokens") is not None:
        attributes["gen_ai.usage.output_tokens"] = int(usage["completion_tokens"])
    return attributes


def engine_tracing_kwargs(cfg: TracingConfig) -> dict[str, Any]:
    """vLLM engine arguments for its own spans (`engine_spans`), and the protocol variable vLLM
    reads for its exporter (it defaults to grpc), set in this process before the engine starts."""
    if not (is_enabled(cfg) and cfg.engine_spans):
        return {}
    os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = protocol(cfg)
    return {"otlp_traces_endpoint": traces_endpoint(cfg)}
