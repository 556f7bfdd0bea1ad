"""Metrics and traces of the running app: real Ray Serve, both vLLM engines, NIXL, a real OTLP
receiver, the Router's `GET /metrics` parsed with Prometheus' own parser.

One app for the module, with tracing on (100% sampling, vLLM's engine spans too) pointing at the
receiver. The last test kills the prefill engine to get a real fallback.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.cpu.conftest import MODEL_NAME, ROOT, app_args
from tests.cpu.otlp_receiver import OtlpReceiver

BLOCK_SIZE = 32  # configs/local-cpu.yaml engine_kwargs.block_size
KV_BYTES_PER_BLOCK = BLOCK_SIZE * 2 * 2 * 2 * 32 * 2  # tiny Llama: layers x K,V x heads x dim x bf16
# Long enough to be disaggregated (past the CPU short-prompt threshold), about 300 tokens.
LONG_PROMPT = " ".join(f"step {i} of the journey begins with one more word" for i in range(30))
OBSERVABILITY = ROOT / "deploy" / "observability"
SERVER, INTERNAL = 2, 1  # OTLP span kinds
STATUS_ERROR = 2


@pytest.fixture(scope="module")
def receiver() -> Any:
    server = OtlpReceiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def obs_app(tiny_model: Path, http_port: int, receiver: OtlpReceiver) -> Any:
    from ray import serve

    from serve_app.app import build_app

    args = app_args(telemetry={"tracing": {
        "enabled": True, "endpoint": receiver.endpoint, "engine_spans": True,
        "batch_delay_ms": 200,
    }})
    # Probes rarely, so the killed prefill engine is found by a request (a fallback), not a probe.
    args["router"] = {**args.get("router", {}),
                      "failover": {"probe_period_s": 60, "prefill_deadline_s": 20}}
    serve.run(build_app(args), name="obs", route_prefix="/")
    yield {
        "base_url": f"http://127.0.0.1:{http_port}",
        "prefill": serve.get_deployment_handle("PrefillServer", app_name="obs"),
    }
    serve.delete("obs")


@pytest.fixture(scope="module")
def http(obs_app: dict[str, Any]) -> Any:
    with httpx.Client(base_url=obs_app["base_url"], timeout=120) as client:
        yield client


def scrape(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The sum of `sample` over the series whose labels include `labels`."""
    return sum(
        s.value for family in families.values() for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def route_of(response: httpx.Response) -> tuple[str, str]:
    route, reason = response.headers["x-pd-route"].split("; reason=")
    return route, reason


def post(http: httpx.Client, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    response = http.post(path, json=body, headers=headers or {})
    response.read()
    return response


def sse_usage(text: str) -> dict:
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e.startswith("data: {")]
    return [json.loads(e)["usage"] for e in events if json.loads(e).get("usage")][-1]


def test_known_requests_move_the_metrics_by_exactly_those(http: httpx.Client) -> None:
    before = scrape(http)
    completion = {"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 6,
                  "temperature": 0.0, "ignore_eos": True}
    chat = {"model": MODEL_NAME, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
            "messages": [{"role": "user", "content": LONG_PROMPT}]}
    usage_opts = {"stream": True, "stream_options": {"include_usage": True}}
    sent = [
        ("completions", post(http, "/v1/completions", completion)),
        ("completions", post(http, "/v1/completions", {**completion, **usage_opts})),
        ("chat", post(http, "/v1/chat/completions", chat)),
        ("chat", post(http, "/v1/chat/completions", {**chat, **usage_opts})),
    ]
    bad = post(http, "/v1/completions", {**completion, "max_tokens": 0})
    assert bad.status_code == 400 and bad.headers["x-pd-request-id"]
    routes: Counter = Counter()
    num_prompt_tokens = []
    for endpoint, response in sent:
        assert response.status_code == 200, response.text
        assert len(response.headers["x-pd-request-id"].split("-")[0]) == 32
        routes[(endpoint, *route_of(response))] += 1
        is_stream = response.headers["content-type"].startswith("text/event-stream")
        usage = sse_usage(response.text) if is_stream else response.json()["usage"]
        num_prompt_tokens.append(usage["prompt_tokens"])
    num_disaggregated = sum(n for (_, route, _), n in routes.items() if route == "disaggregated")
    assert num_disaggregated == 4, routes  # long prompts, both engines up
    after = scrape(http)

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    # The Router: every request once, by endpoint, status and route; histograms per request.
    for (endpoint, route, reason), n in routes.items():
        assert delta("pd:requests_total", endpoint=endpoint, status="200", route=route,
                     reason=reason) == n
    assert delta("pd:requests_total", endpoint="completions", status="400", route="none") == 1
    assert delta("pd:requests_total") == 5
    assert delta("gen_ai_server_request_duration_seconds_count") == 5
    assert delta("gen_ai_server_time_to_first_token_seconds_count") == 2  # the streamed ones
    assert delta("gen_ai_server_time_per_output_token_seconds_count") == 2  # usage seen
    assert delta("pd:prefill_call_seconds_count", outcome="ok") == 4
    assert delta("pd:handoff_seconds_count") == 4
    assert delta("pd:fallbacks_total") == 0
    for phase in ("prefill", "decode"):
        assert value(after, "pd:requests_in_flight", phase=phase) == 0
        assert value(after, "pd:engine_metrics_up", phase=phase) == 1

    # Each engine's own vLLM metrics, by phase: prefill ran the 4 prompts (one token each),
    # decode finished the 4 requests; the bad one reached neither.
    assert delta("vllm:request_success_total", phase="prefill") == 4
    assert delta("vllm:request_success_total", phase="decode") == 4
    assert delta("vllm:generation_tokens_total", phase="prefill") == 4
    assert delta("vllm:prompt_tokens_total", phase="prefill") == sum(num_prompt_tokens)
    assert delta("vllm:e2e_request_latency_seconds_count", phase="decode") == 4
    assert "vllm:kv_cache_usage_perc" in after and "vllm:num_requests_waiting" in after
    assert {s.labels["phase"] for s in after["vllm:num_requests_running"].samples} == {
        "prefill", "decode"}

    # The KV handoff: what the app says it moved is what NIXL moved, block for block.
    moved = delta("vllm:nixl_bytes_transferred_sum", phase="decode")
    assert delta("pd:kv_handoff_bytes_count", phase="decode") == 4
    assert delta("pd:kv_handoff_bytes_sum", phase="decode") == moved
    assert moved == sum(math.ceil(n / BLOCK_SIZE) for n in num_prompt_tokens) * KV_BYTES_PER_BLOCK
    assert delta("vllm:nixl_xfer_time_seconds_count", phase="decode") == 4


def _by_name(spans: list) -> dict[str, list]:
    named: dict[str, list] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


def test_one_trace_across_router_prefill_handoff_and_decode(
    http: httpx.Client, receiver: OtlpReceiver
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = {"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 5, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    response = post(http, "/v1/completions", body,
                    {"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert response.status_code == 200
    assert response.headers["x-pd-request-id"].startswith(trace_id + "-")
    names = {"text_completion tiny-llama", "prefill", "decode", "kv_handoff", "llm_request"}
    spans = _by_name(receiver.wait_for(trace_id, names))
    deadline = time.monotonic() + 30
    while len(spans.get("llm_request", [])) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # one per engine; each engine exports on its own
        spans = _by_name(receiver.trace(trace_id))
    assert names <= set(spans), sorted(spans)
    (router,), (prefill,), (decode,), (handoff,) = (
        spans[n] for n in ("text_completion tiny-llama", "prefill", "decode", "kv_handoff"))
    assert router.kind == SERVER and router.parent_span_id == parent_id
    assert router.span_id == response.headers["x-pd-request-id"].split("-")[1]
    assert response.headers["traceresponse"] == f"00-{trace_id}-{router.span_id}-01"
    assert prefill.kind == decode.kind == SERVER and handoff.kind == INTERNAL
    assert prefill.parent_span_id == decode.parent_span_id == router.span_id
    assert handoff.parent_span_id == decode.span_id
    # vLLM's own spans join under the server spans that called the engines.
    assert {s.parent_span_id for s in spans["llm_request"]} == {prefill.span_id, decode.span_id}
    assert {router.resource["pd.component"], prefill.resource["pd.component"],
            decode.resource["pd.component"]} == {"Router", "PrefillServer", "DecodeServer"}

    usage = sse_usage(response.text)
    assert router.attributes["gen_ai.operation.name"] == "text_completion"
    assert router.attributes["gen_ai.request.model"] == MODEL_NAME
    assert router.attributes["gen_ai.request.max_tokens"] == 5
    assert router.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert router.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 5
    assert router.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert (router.attributes["pd.route"], router.attributes["pd.route.reason"]) == route_of(
        response)
    assert router.attributes["http.response.status_code"] == 200
    assert prefill.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    num_blocks = math.ceil(usage["prompt_tokens"] / BLOCK_SIZE)
    assert handoff.attributes["pd.kv.num_blocks"] == num_blocks
    assert handoff.attributes["pd.kv.bytes"] == num_blocks * KV_BYTES_PER_BLOCK
    assert decode.start_ns <= handoff.start_ns <= handoff.end_ns <= decode.end_ns
    assert router.start_ns <= prefill.start_ns and prefill.end_ns <= decode.start_ns
    assert all(s.status_code != STATUS_ERROR for s in receiver.trace(trace_id))
    # No prompt or output text anywhere in the trace.
    values = [str(v) for s in receiver.trace(trace_id) for v in s.attributes.values()]
    assert not any("journey" in v for v in values)


def test_an_unsampled_parent_exports_nothing(http: httpx.Client, receiver: OtlpReceiver) -> None:
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    body = {"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 2}
    response = post(http, "/v1/completions", body,
                    {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-00"})
    assert response.status_code == 200
    assert response.headers["x-pd-request-id"].startswith(trace_id + "-")
    # A later sampled request's spans arriving means the earlier ones would have arrived too.
    marker = "6bf92f3577b34da6a3ce929d0e0e4736"
    post(http, "/v1/completions", body, {"traceparent": f"00-{marker}-00f067aa0ba902b7-01"})
    assert receiver.wait_for(marker, {"decode"})
    time.sleep(1.0)
    assert receiver.trace(trace_id) == []


def test_a_bad_request_span_names_the_error(http: httpx.Client, receiver: OtlpReceiver) -> None:
    trace_id = "7bf92f3577b34da6a3ce929d0e0e4736"
    response = post(http, "/v1/chat/completions", {"model": "nope", "messages": []},
                    {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.status_code in (400, 404)
    (span,) = receiver.wait_for(trace_id, {"chat tiny-llama"})
    assert span.attributes["http.response.status_code"] == response.status_code
    assert span.attributes["error.type"]
    assert span.status_code != STATUS_ERROR  # the client's error, not the server's


def _exported_names(families: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(Prometheus sample names a query may use, metric names an OTel collector sees)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    samples, otel = set(), set()
    for name, family in families.items():
        extra = suffixes.get(family.type, ("",))
        samples |= {name + s for s in extra}
        otel.add(name + "_total" if family.type == "counter" else name)
    return samples, otel


def test_dashboard_and_collectors_use_only_exported_names(http: httpx.Client) -> None:
    samples, otel = _exported_names(scrape(http))
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    referenced = set()
    for expr in exprs:
        # Metric names: identifiers followed by `{` or inside `(`, not PromQL words or labels.
        referenced |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
        referenced |= set(re.findall(r"\(([a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*)", expr))
    assert referenced and referenced <= samples, sorted(referenced - samples)
    for needed in ("gen_ai_server_time_to_first_token_seconds_bucket", "pd:handoff_seconds_bucket",
                   "vllm:kv_cache_usage_perc", "pd:shed_requests_total", "pd:fallbacks_total",
                   "vllm:num_requests_waiting"):
        assert needed in referenced

    adot = yaml.safe_load((OBSERVABILITY / "adot-collector.yaml").read_text())
    assert set(adot["receivers"]) == {"otlp", "prometheus"}
    (job,) = adot["receivers"]["prometheus"]["config"]["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert {"awsxray", "awsemf"} <= set(adot["exporters"])
    pipelines = adot["service"]["pipelines"]
    assert pipelines["traces"]["exporters"] == ["awsxray"]
    assert pipelines["metrics"]["exporters"] == ["awsemf"]
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(adot[kind])
    selectors = adot["processors"]["filter/cloudwatch"]["metrics"]["include"]["metric_names"]
    selectors += [s for d in adot["exporters"]["awsemf"]["metric_declarations"]
                  for s in d["metric_name_selectors"]]
    for selector in selectors:
        assert any(re.search(selector, name) for name in otel), selector

    prometheus = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    (scrape_job,) = prometheus["scrape_configs"]
    assert scrape_job["metrics_path"] == "/metrics"


def test_prefill_failure_falls_back_counted_and_traced(
    obs_app: dict[str, Any], http: httpx.Client, receiver: OtlpReceiver
) -> None:
    """Last: kills the prefill engine (the app is deleted after the module)."""
    before = scrape(http)
    replica = psutil.Process(obs_app["prefill"].stats.remote().result()["pid"])
    cores = [p for p in replica.children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
    assert cores
    for core in cores:
        core.kill()
    trace_id = "8bf92f3577b34da6a3ce929d0e0e4736"
    body = {"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 4, "temperature": 0.0}
    response = post(http, "/v1/completions", body,
                    {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.status_code == 200, response.text
    assert route_of(response) == ("decode_only", "fallback")
    after = scrape(http)
    assert value(after, "pd:fallbacks_total") - value(before, "pd:fallbacks_total") == 1
    assert value(after, "pd:requests_total", route="decode_only", reason="fallback") - value(
        before, "pd:requests_total", route="decode_only", reason="fallback") == 1
    spans = _by_name(receiver.wait_for(trace_id, {"text_completion tiny-llama", "prefill",
                                                   "decode"}))
    (router,), (prefill,), (decode,) = (
        spans[n] for n in ("text_completion tiny-llama", "prefill", "decode"))
    assert prefill.status_code == STATUS_ERROR and prefill.attributes["error.type"]
    assert router.status_code != STATUS_ERROR
    assert router.attributes["pd.route.reason"] == "fallback"
    assert decode.parent_span_id == router.span_id and "kv_handoff" not in spans
