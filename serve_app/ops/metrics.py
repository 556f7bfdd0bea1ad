"""Prometheus metrics: the Router's own, and both engines' vLLM metrics with a `phase` label.

Where each series comes from, and why nothing is counted twice:
- The Router's metrics (`RouterMetrics`) live in the Router replica's own registry: what the
  client sees (requests by endpoint, status and route, TTFT, time per output token, end to end),
  the prefill call, the handoff, calls in flight per phase, fallbacks and sheds.
- Each engine's vLLM metrics (`vllm:*`, `vllm:nixl_*` included) are recorded by vLLM's own
  `PrometheusStatLogger` inside the server replica that owns the `AsyncLLM`, in that process's
  default registry; the replica's own per-handoff metrics (`ServerMetrics`) sit beside them.
  A scrape of `GET /metrics` asks each server for its families (`server_families`) and the
  Router merges them into one exposition (`exposition`), adding `phase="prefill"|"decode"`
  (`"unified"` in unified mode) to every series. Each family is read from the one process
  that records it, once per scrape.

Names follow vLLM's (`namespace:name_unit`, `pd:` for this app) and OpenTelemetry's GenAI
server metrics where one exists, translated to Prometheus (`gen_ai.server.time_to_first_token`
-> `gen_ai_server_time_to_first_token_seconds`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENGINE_PREFIXES = ("vllm:",)

# vLLM's buckets for the same quantities (`vllm/v1/metrics/loggers.py`), so router and engine
# histograms line up on one dashboard.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0, 30.0, 60.0)
BYTES_BUCKETS = tuple(float(4**k * 1024) for k in range(1, 16))  # 4 KiB .. 1 TiB


class RouterMetrics:
    """The Router's own metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pd:requests", "Requests answered, by endpoint, HTTP status and route taken.",
            ["endpoint", "status", "route", "reason"], registry=r,
        )
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streamed requests: arrival at the Router to the first token sent to the client.",
            ["endpoint", "route"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Streamed requests whose usage the Router sees: (end - first token) / (tokens - 1).",
            ["endpoint", "route"], buckets=TPOT_BUCKETS, registry=r,
        )
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Arrival at the Router to the last byte of the answer.",
            ["endpoint", "route"], buckets=E2E_BUCKETS, registry=r,
        )
        self.prefill_call = Histogram(
            "pd:prefill_call_seconds", "The Router's call to PrefillServer, by outcome.",
            ["endpoint", "outcome"], buckets=STEP_BUCKETS, registry=r,
        )
        self.handoff = Histogram(
            "pd:handoff_seconds",
            "Prefill returned to the Router -> decode's first item at the Router (hop, NIXL read, "
            "decode's first step).", ["endpoint"], buckets=STEP_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "pd:requests_in_flight", "Router calls now in each phase's server.", ["phase"],
            registry=r,
        )
        self.waiting = Gauge(
            "pd:requests_waiting", "Requests waiting in the Router for admission.", registry=r
        )
        self.fallbacks = Counter(
            "pd:fallbacks", "Requests decode ran whole because prefill failed.",
            ["endpoint", "reason"], registry=r,
        )
        self.shed = Counter(
            "pd:shed_requests", "Requests refused by admission (429).", ["endpoint", "reason"],
            registry=r,
        )
        self.engine_up = Gauge(
            "pd:engine_metrics_up", "1 if the engine's server answered this scrape.",
            ["phase", "pair"], registry=r,
        )
        for phase in ("prefill", "decode"):
            self.in_flight.labels(phase)


class ServerMetrics:
    """A server replica's own per-request metrics, merged with vLLM's by `server_families`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.kv_handoff_bytes = Histogram(
            "pd:kv_handoff_bytes",
            "KV bytes decode reads from prefill per handoff (prefill's blocks x block size).",
            buckets=BYTES_BUCKETS, registry=self.registry,
        )


def server_families(own: CollectorRegistry | None = None) -> list[Metric]:
    """This process's vLLM families (vLLM records them in the default registry) and its own."""
    families = [m for m in REGISTRY.collect() if m.name.startswith(ENGINE_PREFIXES)]
    if own is not None:
        families += list(own.collect())
    return families


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def with_phase(families_by_engine: dict[Any, list[Metric]]) -> list[Metric]:
    """One family per name, each sample labelled with the engine it came from: its phase (a
    key `phase`), or its phase and pair (a key `(phase, pair)`)."""
    merged: dict[str, Metric] = {}
    for engine, families in families_by_engine.items():
        phase, pair = engine if isinstance(engine, tuple) else (engine, None)
        labels = {"phase": phase} if pair is None else {"phase": phase, "pair": pair}
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            target.samples.extend(
                s._replace(labels={**s.labels, **labels}) for s in family.samples
            )
    return list(merged.values())


def exposition(router: CollectorRegistry, families_by_engine: dict[Any, list[Metric]]) -> bytes:
    """The text of `GET /metrics`: the Router's registry and every engine's families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*router.collect(), *with_phase(families_by_engine)]))
    return generate_latest(registry)

