"""Telemetry without Ray: the tracer against a real OTLP receiver, the exposition merge parsed
with Prometheus' own parser, and the Router's per-request bookkeeping."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from serve_app.config import AppConfig, TracingConfig
from serve_app.ops import tracing
from serve_app.ops.metrics import exposition, with_phase
from serve_app.ops.telemetry import RouterTelemetry
from tests.cpu.otlp_receiver import OtlpReceiver


@pytest.fixture()
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.close()


def _config(receiver: OtlpReceiver, **overrides) -> TracingConfig:
    return TracingConfig(endpoint=receiver.endpoint, batch_delay_ms=50, **overrides)


def test_tracing_off_exports_nothing_but_still_names_requests(receiver: OtlpReceiver) -> None:
    tracer = tracing.Tracer(_config(receiver, enabled=False), "Router")
    span = tracer.start_request("chat m", {}, {})
    child = tracer.start_child("prefill", tracing.carrier(span), {})
    tracing.end(child, 200)
    tracing.end(span, 200)
    tracer.shutdown()
    assert receiver.num_requests == 0 and receiver.spans == []
    trace_hex, span_hex = tracing.request_id(span).split("-")
    assert len(trace_hex) == 32 and len(span_hex) == 16 and int(trace_hex, 16) != 0


def test_tracing_on_continues_traceparent_and_links_children(receiver: OtlpReceiver) -> None:
    tracer = tracing.Tracer(_config(receiver, enabled=True), "Router")
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    span = tracer.start_request("chat m", {"traceparent": incoming}, {"a": 1})
    child = tracer.start_child("prefill", tracing.carrier(span), {})  # as across a handle call
    grandchild = tracer.start_child("kv_handoff", child, {})
    tracing.end(grandchild)
    tracing.end(child, 503, "EngineDeadError")
    tracing.end(span, 400, "BadRequestError")
    tracer.shutdown()
    spans = {s.name: s for s in receiver.trace("0af7651916cd43dd8448eb211c80319c")}
    assert set(spans) == {"chat m", "prefill", "kv_handoff"}
    assert spans["chat m"].parent_span_id == "b7ad6b7169203331"
    assert spans["prefill"].parent_span_id == spans["chat m"].span_id
    assert spans["kv_handoff"].parent_span_id == spans["prefill"].span_id
    # 4xx: the client's error (status unset, error.type set); 5xx: an error span.
    assert spans["chat m"].status_code == 0
    assert spans["chat m"].attributes["error.type"] == "BadRequestError"
    assert spans["prefill"].status_code == 2
    assert spans["chat m"].resource["service.name"] == "pd-serve"
    assert tracing.request_id(span).startswith("0af7651916cd43dd8448eb211c80319c-")


def test_sampling_is_parent_based_and_ratio_for_new_traces(receiver: OtlpReceiver) -> None:
    tracer = tracing.Tracer(_config(receiver, enabled=True, sampling_ratio=0.0), "Router")
    unsampled = "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    sampled = "00-2af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for headers in ({}, {"traceparent": unsampled}, {"traceparent": sampled}):
        tracing.end(tracer.start_request("r", headers, {}))
    tracer.shutdown()
    assert {s.trace_id for s in receiver.spans} == {"2af7651916cd43dd8448eb211c80319c"}


def test_exporter_settings_from_config_then_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    cfg = TracingConfig(enabled=True)
    assert tracing.traces_endpoint(cfg) == "http://localhost:4318/v1/traces"
    assert tracing.protocol(cfg) == "http/protobuf" and tracing.sampling_ratio(cfg) == 1.0
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    assert tracing.traces_endpoint(cfg) == "http://collector:4318/v1/traces"
    assert tracing.sampling_ratio(cfg) == 0.1
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:9/custom")
    assert tracing.traces_endpoint(cfg) == "http://other:9/custom"
    explicit = TracingConfig(enabled=True, endpoint="http://mine:4318", sampling_ratio=0.5)
    assert tracing.traces_endpoint(explicit) == "http://mine:4318/v1/traces"
    assert tracing.sampling_ratio(explicit) == 0.5
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert tracing.traces_endpoint(TracingConfig(endpoint="mine:4317")) == "mine:4317"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.is_enabled(cfg)


def test_engine_spans_need_tracing_on() -> None:
    with pytest.raises(ValidationError, match="engine_spans needs telemetry.tracing.enabled"):
        AppConfig.model_validate({"telemetry": {"tracing": {"engine_spans": True}}})
    with pytest.raises(ValidationError, match="sampling_ratio"):
        AppConfig.model_validate({"telemetry": {"tracing": {"sampling_ratio": 2}}})


def _engine_registry(value: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("vllm:prompt_tokens", "p", ["model_name"], registry=registry).labels("m").inc(value)
    Histogram("vllm:e2e", "e", ["model_name"], buckets=(1.0,), registry=registry).labels(
        "m").observe(value)
    return registry


def test_exposition_merges_phases_into_one_family_each() -> None:
    router = CollectorRegistry()
    Counter("pd:requests", "r", ["endpoint"], registry=router).labels("chat").inc()
    phases = {p: list(_engine_registry(v).collect()) for p, v in (("prefill", 3), ("decode", 5))}
    text = exposition(router, phases).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"pd:requests", "vllm:prompt_tokens", "vllm:e2e"} <= set(families)
    totals = {s.labels["phase"]: s.value for s in families["vllm:prompt_tokens"].samples
              if s.name.endswith("_total")}
    assert totals == {"prefill": 3.0, "decode": 5.0}
    counts = {s.labels["phase"]: s.value for s in families["vllm:e2e"].samples
              if s.name.endswith("_count")}
    assert counts == {"prefill": 1.0, "decode": 1.0}
    assert text.count("# TYPE vllm:e2e histogram") == 1
    assert len(with_phase({"unified": phases["decode"]})) == 2


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def _drain(stream) -> list[str]:
    return [text async for text in stream]


def test_router_bookkeeping_of_a_stream_and_a_unary_request() -> None:
    telemetry = RouterTelemetry(AppConfig())
    registry = telemetry.metrics.registry

    class Request:
        model, stream, max_tokens, temperature = "m", True, 3, 0.0

    record = telemetry.begin("completions", {})
    record.admitted(Request())
    record.routed("disaggregated", "")
    record.prefill_started()
    assert _sample(registry, "pd:requests_in_flight", phase="prefill") == 1
    class Result:
        kv_transfer_params = {}

    record.prefill_finished(Result())
    record.generate_started("decode")
    record.first_item("decode")

    async def events():
        yield 'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n'
        yield 'data: {"choices":[{"text":"b","finish_reason":"length"}]}\n\n'
        yield 'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3}}\n\n'
        yield "data: [DONE]\n\n"

    assert len(asyncio.run(_drain(record.respond(200, None, events())))) == 4
    labels = {"endpoint": "completions", "route": "disaggregated"}
    assert _sample(registry, "pd:requests_total", status="200", reason="", **labels) == 1
    assert _sample(registry, "gen_ai_server_time_to_first_token_seconds_count", **labels) == 1
    assert _sample(registry, "gen_ai_server_time_per_output_token_seconds_count", **labels) == 1
    assert _sample(registry, "pd:handoff_seconds_count", endpoint="completions") == 1
    assert _sample(registry, "pd:prefill_call_seconds_count", endpoint="completions",
                   outcome="ok") == 1
    for phase in ("prefill", "decode"):
        assert _sample(registry, "pd:requests_in_flight", phase=phase) == 0

    bad = telemetry.begin("chat", {})
    assert bad.respond(400, {"error": {"type": "BadRequestError"}}, None) is None
    bad.finish(500)  # a second end changes nothing
    assert _sample(registry, "pd:requests_total", endpoint="chat", status="400", route="none",
                   reason="") == 1
    assert _sample(registry, "pd:requests_total", endpoint="chat", status="500", route="none",
                   reason="") == 0


def test_the_begun_request_is_current_in_its_task_only() -> None:
    from serve_app.ops.telemetry import NullRequest, current_request

    telemetry = RouterTelemetry(AppConfig())

    async def one(endpoint: str) -> tuple[str, str]:
        record = telemetry.begin(endpoint, {})
        await asyncio.sleep(0)
        assert current_request() is record
        return record.request_id, current_request().request_id

    async def both() -> list[tuple[str, str]]:
        return await asyncio.gather(one("chat"), one("completions"))

    for begun, seen in asyncio.run(both()):
        assert begun == seen
    outside = contextvars.Context().run(current_request)  # a context no request began in
    assert isinstance(outside, NullRequest) and outside.carrier() == {}
    outside.routed("disaggregated", "")  # records nothing, raises nothing


def test_a_stream_that_fails_or_is_left_is_counted_and_closed() -> None:
    telemetry = RouterTelemetry(AppConfig())
    registry = telemetry.metrics.registry
    closed = []

    async def events():
        try:
            yield 'data: {"choices":[{"text":"a"}]}\n\n'
            yield 'data: {"error": {"message": "decode failed", "code": 503}}\n\ndata: [DONE]\n\n'
        finally:
            closed.append(True)

    failed = telemetry.begin("completions", {})
    asyncio.run(_drain(failed.respond(200, None, events())))
    assert _sample(registry, "pd:requests_total", endpoint="completions", status="503",
                   route="none", reason="") == 1

    async def leave_after_one() -> None:
        stream = aiter(telemetry.begin("completions", {}).respond(200, None, events()))
        await anext(stream)
        await stream.aclose()  # the client went away

    asyncio.run(leave_after_one())
    assert _sample(registry, "pd:requests_total", endpoint="completions", status="499",
                   route="none", reason="") == 1
    assert closed == [True, True]  # the inner stream's clean-up ran at once both times

    never_read = telemetry.begin("chat", {}).respond(200, None, events())
    del never_read  # a client gone before the first byte: Starlette drops the iterator
    assert _sample(registry, "pd:requests_total", endpoint="chat", status="499", route="none",
                   reason="") == 1
