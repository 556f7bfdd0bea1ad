"""Conditional disaggregation: where one request runs.

Disaggregation pays a fixed price per request: the hop to prefill, the prefill call, the NIXL read
and decode's scheduling of the loaded blocks. A short prompt's own compute costs less than that,
and computing it inside decode's batch stalls the running streams for less than one hop, so short
prompts run decode-local; long ones go to prefill, which keeps decode's inter-token latency flat.
(llm-d decides on the uncached tokens, Dynamo on input length and prefill load, vLLM's router on
`pd_uncached_token_threshold`: the same idea.)

The rules, in order (`RoutePolicy.decide`):

1. Engines: decode down -> prefill runs the whole request (`prefill_only`); prefill down, or the
   two phases' KV layouts disagree -> `decode_only`. Both down is refused earlier (admission).
2. Shape: requests one prefill cannot hand to one decode (n > 1, beam search) -> `decode_only`.
3. Length: fewer prompt tokens than `short_prompt_tokens` -> `decode_only`. By default the
   prompt decode prefills within `local_prefill_budget_ms` (`short_prompt_tokens()`): on the
   CPU build with the tiny model that is every prompt it takes, as measured (local was faster
   for the request and no slower for decode's streams at 128-1,700 tokens, 6 and 20 req/s:
   bench/results/cpu-route-thresholds/).
4. Load: prefill's queue far deeper than decode's would be with this prompt (in prompt tokens
   waiting: `prefill_backlog_ratio` times, and at least `prefill_backlog_min` requests), and the
   prompt no longer than `backlog_local_max_tokens` -> `decode_only`: decode computes it now
   instead of after the backlog. Work, not requests: one queued document outweighs a dozen
   queued chats. Longer prompts stay on prefill whatever the backlog: moving whole documents
   onto decode slowed its streams more than it saved them (README, "Mixed workloads").
5. Output: a request that asks for at most `short_output_tokens` tokens -> `prefill_only`. The
   handoff is paid once per request and buys an undisturbed decode for its output tokens; for a
   few tokens it costs more than it buys (a `max_tokens=1` request gains nothing from decode at
   all), so the engine that computed the prompt finishes it, and decode's batch never sees it.
6. Otherwise `disaggregated`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from serve_app.config import AppConfig, RoutingConfig
from serve_app.plan import ModelShape
from serve_app.vllm_plugin import parse_cores

# The CPU build's prefill rate on one core, in the model's layer FLOPs (2 x its layers'
# parameters a token): measured on this machine with the tiny model, decode-local, from the TTFT
# P50 of 256- to 1,700-token prompts under chats at 6 and 20 req/s (8.2-8.7 us a token, attention
# over the context included; bench/results/cpu-route-thresholds/). A model of larger matrices
# runs faster per FLOP (the small model ~4x), so other models get a threshold on the low side.
CPU_PREFILL_FLOPS_PER_CORE = 70e9
# The CPU build's default, measured there too: a request asking for at most 8 tokens finishes
# on prefill. Against the handoff it was faster at the P50 for 2-8 output tokens (8: 44-51 ms end
# to end against 53-55) and tied at 16, where the handoff's P99 was 12-22% better.
CPU_SHORT_OUTPUT_TOKENS = 8
# A model whose shape the planner does not know: chosen, not measured (the tiny model's handoff
# cost, ~25-30 ms here, against decode computing a few hundred tokens).
FALLBACK_SHORT_PROMPT_TOKENS = 256
# On a GPU only what needs no measurement: a one-token request gains nothing from decode (its
# token is prefill's own); the GPU campaign's handoff time is what would move it.
GPU_SHORT_OUTPUT_TOKENS = 1
# Share of the peak a prefill reaches (large GEMMs): converts peak FLOP/s into tokens/s.
PREFILL_MFU = 0.5


class Route(str, enum.Enum):
    DISAGGREGATED = "disaggregated"
    DECODE_ONLY = "decode_only"
    PREFILL_ONLY = "prefill_only"
    UNIFIED = "unified"


class Reason(str, enum.Enum):
    LONG_PROMPT = "long_prompt"
    SHORT_PROMPT = "short_prompt"
    SHORT_OUTPUT = "short_output"
    PREFILL_BACKLOG = "prefill_backlog"
    PREFILL_DOWN = "prefill_down"
    DECODE_DOWN = "decode_down"
    INCOMPATIBLE = "incompatible"
    NOT_SPLITTABLE = "not_splittable"
    FALLBACK = "fallback"
    ALWAYS = "always"
    UNIFIED = "unified"


@dataclass(frozen=True)
class RouteDecision:
    route: Route
    reason: Reason

    @property
    def header(self) -> str:
        """The `x-pd-route` response header: `route; reason`."""
        return f"{self.route.value}; reason={self.reason.value}"


@dataclass(frozen=True)
class PhaseView:
    """What the router knows of both phases when a request arrives."""

    is_prefill_up: bool = True
    is_decode_up: bool = True
    is_compatible: bool = True
    num_prefill_queued: int = 0
    """Prefill calls sent and not answered yet."""
    num_decode_queued: int = 0
    """Decode calls sent that have not produced their first item yet."""
    prefill_queued_tokens: int = 0
    """The prompt tokens of the queued prefill calls."""
    decode_queued_tokens: int = 0
    """The prompt tokens decode has yet to compute for its queued calls (none for a handoff)."""


UNIFIED = RouteDecision(Route.UNIFIED, Reason.UNIFIED)


class RoutePolicy:
    def __init__(
        self, cfg: RoutingConfig, short_prompt_tokens: int, short_output_tokens: int = 0
    ) -> None:
        self.cfg = cfg
        self.short_prompt_tokens = short_prompt_tokens
        self.short_output_tokens = short_output_tokens
        self.backlog_local_max_tokens = (
            cfg.backlog_local_max_tokens
            if cfg.backlog_local_max_tokens is not None
            else 4 * short_prompt_tokens
        )

    def decide(
        self,
        num_prompt_tokens: int,
        is_splittable: bool,
        view: PhaseView,
        max_output_tokens: int | None = None,
    ) -> RouteDecision:
        """`max_output_tokens`: the request's own cap (None: as many as the context allows)."""
        if not view.is_decode_up:
            return RouteDecision(Route.PREFILL_ONLY, Reason.DECODE_DOWN)
        if not view.is_prefill_up:
            return RouteDecision(Route.DECODE_ONLY, Reason.PREFILL_DOWN)
        if not view.is_compatible:
            return RouteDecision(Route.DECODE_ONLY, Reason.INCOMPATIBLE)
        if not is_splittable:
            return RouteDecision(Route.DECODE_ONLY, Reason.NOT_SPLITTABLE)
        if not self.cfg.conditional:
            return RouteDecision(Route.DISAGGREGATED, Reason.ALWAYS)
        if num_prompt_tokens < self.short_prompt_tokens:
            return RouteDecision(Route.DECODE_ONLY, Reason.SHORT_PROMPT)
        if num_prompt_tokens <= self.backlog_local_max_tokens and self._is_backlogged(
            view, num_prompt_tokens
        ):
            return RouteDecision(Route.DECODE_ONLY, Reason.PREFILL_BACKLOG)
        if max_output_tokens is not None and max_output_tokens <= self.short_output_tokens:
            return RouteDecision(Route.PREFILL_ONLY, Reason.SHORT_OUTPUT)
        return RouteDecision(Route.DISAGGREGATED, Reason.LONG_PROMPT)

    def _is_backlogged(self, view: PhaseView, num_prompt_tokens: int) -> bool:
        """Prefill's queued work is `prefill_backlog_ratio` times what decode's would be with
        this prompt moved there (and prefill has `prefill_backlog_min` calls queued)."""
        return view.num_prefill_queued >= self.cfg.prefill_backlog_min and (
            view.prefill_queued_tokens
            >= self.cfg.prefill_backlog_ratio * (view.decode_queued_tokens + num_prompt_tokens)
        )


def short_prompt_tokens(cfg: AppConfig, shape: ModelShape | None) -> int:
    """The configured threshold, or the derived default (see `RoutingConfig`): the prompt decode
    prefills within `local_prefill_budget_ms`. On a GPU at its SM share of the card's peak, at
    `PREFILL_MFU`; on the CPU build at `CPU_PREFILL_FLOPS_PER_CORE` times decode's cores."""
    routing = cfg.router.routing
    if routing.short_prompt_tokens is not None:
        return routing.short_prompt_tokens
    if shape is None:
        return FALLBACK_SHORT_PROMPT_TOKENS
    budget_s = routing.local_prefill_budget_ms / 1000
    if cfg.device == "cpu":
        cores = len(parse_cores(cfg.decode.cpu_cores)) if cfg.decode.cpu_cores else 1
        layer_flops = 2 * shape.num_layers * shape.num_params_per_layer
        return int(CPU_PREFILL_FLOPS_PER_CORE * cores * budget_s / layer_flops)
    share = (cfg.decode.sm_percentage or 100) / 100
    tokens_per_s = routing.decode_peak_tflops * 1e12 * share * PREFILL_MFU / (2 * shape.num_params)
    return int(tokens_per_s * budget_s)


def short_output_tokens(cfg: AppConfig) -> int:
    """The configured threshold, or the derived default (see `RoutingConfig`)."""
    routing = cfg.router.routing
    if routing.short_output_tokens is not None:
        return routing.short_output_tokens
    return CPU_SHORT_OUTPUT_TOKENS if cfg.device == "cpu" else GPU_SHORT_OUTPUT_TOKENS


def fallback() -> RouteDecision:
    """Prefill failed for a request that was to be disaggregated: decode runs all of it."""
    return RouteDecision(Route.DECODE_ONLY, Reason.FALLBACK)
