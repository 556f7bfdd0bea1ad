"""The router's pure decisions: route, admission, health (no Ray, no engine)."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_app.config import AdmissionConfig, AppConfig, RoutingConfig
from serve_app.plan import ModelShape, load_model_shape
from serve_app.policy.admission import Admission
from serve_app.policy.errors import Rejection
from serve_app.policy.health import LoopStalls, PhaseHealth, is_compatible
from serve_app.policy.route import (
    CPU_SHORT_OUTPUT_TOKENS,
    FALLBACK_SHORT_PROMPT_TOKENS,
    GPU_SHORT_OUTPUT_TOKENS,
    PhaseView,
    Reason,
    Route,
    RoutePolicy,
    short_output_tokens,
    short_prompt_tokens,
)
from serve_app.tiny_model import SIZES

IDLE = PhaseView()


def policy(**routing) -> RoutePolicy:
    return RoutePolicy(RoutingConfig(**routing), short_prompt_tokens=256)


@pytest.mark.parametrize(
    ("num_tokens", "route", "reason"),
    [
        (0, Route.DECODE_ONLY, Reason.SHORT_PROMPT),
        (255, Route.DECODE_ONLY, Reason.SHORT_PROMPT),
        (256, Route.DISAGGREGATED, Reason.LONG_PROMPT),
        (5000, Route.DISAGGREGATED, Reason.LONG_PROMPT),
    ],
)
def test_length_rule(num_tokens: int, route: Route, reason: Reason) -> None:
    decision = policy().decide(num_tokens, True, IDLE)
    assert (decision.route, decision.reason) == (route, reason)
    assert decision.header == f"{route.value}; reason={reason.value}"


def test_engines_first_then_shape_then_length() -> None:
    rules = policy()
    down = rules.decide(5000, True, PhaseView(is_decode_up=False))
    assert (down.route, down.reason) == (Route.PREFILL_ONLY, Reason.DECODE_DOWN)
    down = rules.decide(5000, True, PhaseView(is_prefill_up=False))
    assert (down.route, down.reason) == (Route.DECODE_ONLY, Reason.PREFILL_DOWN)
    mixed = rules.decide(5000, True, PhaseView(is_compatible=False))
    assert (mixed.route, mixed.reason) == (Route.DECODE_ONLY, Reason.INCOMPATIBLE)
    beam = rules.decide(5000, False, IDLE)
    assert (beam.route, beam.reason) == (Route.DECODE_ONLY, Reason.NOT_SPLITTABLE)


def test_unconditional_sends_every_splittable_prompt_to_prefill() -> None:
    rules = policy(conditional=False)
    assert rules.decide(1, True, IDLE).route is Route.DISAGGREGATED
    assert rules.decide(1, False, IDLE).route is Route.DECODE_ONLY


def test_load_rule_flips_a_mid_prompt_under_a_prefill_backlog() -> None:
    """Queues weigh in prompt tokens: prefill's must be 4x what decode's would be with this
    prompt moved there, with at least 4 calls queued."""
    rules = policy(prefill_backlog_ratio=4, prefill_backlog_min=4)
    # 4 x (500 + 600) = 4,400 <= 8 x 600 queued on prefill.
    backlog = PhaseView(num_prefill_queued=8, prefill_queued_tokens=4800, decode_queued_tokens=500)
    assert rules.decide(600, True, backlog).reason is Reason.PREFILL_BACKLOG
    # Not deep enough in calls, or in work: prefill still.
    few = PhaseView(num_prefill_queued=3, prefill_queued_tokens=100_000)
    assert rules.decide(600, True, few).route is Route.DISAGGREGATED
    busy_decode = PhaseView(num_prefill_queued=8, prefill_queued_tokens=4800,
                            decode_queued_tokens=700)
    assert rules.decide(600, True, busy_decode).route is Route.DISAGGREGATED
    # Many queued calls of little work: a dozen chats' worth is no backlog for a mid prompt.
    chats = PhaseView(num_prefill_queued=12, prefill_queued_tokens=12 * 64)
    assert rules.decide(600, True, chats).route is Route.DISAGGREGATED
    # Longer than 4 x the threshold: a backlog does not make a document local, not even one
    # that runs whole on prefill (a few output tokens).
    deep = PhaseView(num_prefill_queued=8, prefill_queued_tokens=8 * 1700)
    assert rules.decide(1700, True, deep).route is Route.DISAGGREGATED
    whole = RoutePolicy(RoutingConfig(), short_prompt_tokens=256, short_output_tokens=16)
    kept = whole.decide(1700, True, deep, max_output_tokens=8)
    assert (kept.route, kept.reason) == (Route.PREFILL_ONLY, Reason.SHORT_OUTPUT)


def test_output_rule_keeps_a_few_tokens_on_prefill() -> None:
    """A long prompt asking for at most `short_output_tokens` runs whole on prefill; one asking
    for more, or leaving its length to the context, is disaggregated. The rules before it win."""
    rules = RoutePolicy(RoutingConfig(), short_prompt_tokens=256, short_output_tokens=16)
    few = rules.decide(5000, True, IDLE, max_output_tokens=16)
    assert (few.route, few.reason) == (Route.PREFILL_ONLY, Reason.SHORT_OUTPUT)
    assert few.header == "prefill_only; reason=short_output"
    assert rules.decide(5000, True, IDLE, max_output_tokens=17).route is Route.DISAGGREGATED
    assert rules.decide(5000, True, IDLE, max_output_tokens=None).route is Route.DISAGGREGATED
    # A short prompt stays on decode, a backlog's mid prompt too, a dead prefill wins.
    assert rules.decide(10, True, IDLE, max_output_tokens=1).reason is Reason.SHORT_PROMPT
    backlog = PhaseView(num_prefill_queued=8, prefill_queued_tokens=8 * 600)
    assert rules.decide(600, True, backlog, max_output_tokens=1).reason is Reason.PREFILL_BACKLOG
    down = PhaseView(is_prefill_up=False)
    assert rules.decide(5000, True, down, max_output_tokens=1).reason is Reason.PREFILL_DOWN
    # Off: 0, and with conditional routing off every request goes through prefill and decode.
    off = RoutePolicy(RoutingConfig(), short_prompt_tokens=256, short_output_tokens=0)
    assert off.decide(5000, True, IDLE, max_output_tokens=1).route is Route.DISAGGREGATED
    always = RoutePolicy(RoutingConfig(conditional=False), 256, short_output_tokens=16)
    assert always.decide(5000, True, IDLE, max_output_tokens=1).route is Route.DISAGGREGATED


TINY = ModelShape.from_hf_config({**SIZES["tiny"], "vocab_size": 32000}, "tiny")


def test_threshold_defaults() -> None:
    cpu = AppConfig()
    # A layer: q, o 128x128 each, k, v 128x64 each, MLP 3 x 128x256, two norms of 128: 147,712
    # parameters; 2 layers, 2 FLOPs each: 590,848 FLOPs a token. 70 GFLOP/s on decode's one
    # core for 20 ms: 2,369 tokens, more than the local config's max_model_len.
    assert short_prompt_tokens(cpu, TINY) == 2369
    two = AppConfig.model_validate({"decode": {"num_gpus": 0.2, "cpu_cores": "1-2"}})
    assert short_prompt_tokens(two, TINY) == 4738
    # An 8B model on a CPU core: 0.1 tokens in 20 ms, so every prompt goes through prefill.
    assert short_prompt_tokens(cpu, load_model_shape("llama-3.1-8b")) == 0
    assert short_prompt_tokens(cpu, None) == FALLBACK_SHORT_PROMPT_TOKENS
    fixed = AppConfig.model_validate({"router": {"routing": {"short_prompt_tokens": 64}}})
    assert short_prompt_tokens(fixed, None) == 64
    gpu = AppConfig.model_validate(
        {"device": "cuda", "decode": {"sm_percentage": 20}, "prefill": {"sm_percentage": 80}}
    )
    # 989 TFLOP/s x 20% x 0.5 MFU / (2 x 8.03e9 FLOP/token) = 6,157 tokens/s; 20 ms of it.
    assert short_prompt_tokens(gpu, load_model_shape("llama-3.1-8b")) == 123
    assert short_output_tokens(cpu) == CPU_SHORT_OUTPUT_TOKENS == 8
    assert short_output_tokens(gpu) == GPU_SHORT_OUTPUT_TOKENS == 1
    off = AppConfig.model_validate({"router": {"routing": {"short_output_tokens": 0}}})
    assert short_output_tokens(off) == 0


def test_routing_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="prefill_backlog_ratio"):
        AppConfig.model_validate({"router": {"routing": {"prefill_backlog_ratio": 0.5}}})


async def test_admission_admits_waits_and_sheds() -> None:
    full = False
    gate = Admission(
        AdmissionConfig(max_in_flight=2, max_waiting=1, max_wait_s=5, retry_after_s=3),
        lambda: full,
    )
    first, second = await gate.admit(), await gate.admit()
    waiter = asyncio.ensure_future(gate.admit())
    await asyncio.sleep(0.01)
    assert gate.num_waiting == 1
    with pytest.raises(Rejection) as shed:  # no slot and the waiting room is full: at once
        await gate.admit()
    assert shed.value.status == 429 and shed.value.headers == {"Retry-After": "3"}
    assert shed.value.body["error"]["type"] == "RateLimitError"
    first.release()
    first.release()  # idempotent
    third = await asyncio.wait_for(waiter, 1)
    assert gate.num_in_flight == 2 and gate.num_waiting == 0
    second.release()
    third.release()
    assert gate.num_in_flight == 0 and gate.num_shed == 1


async def test_admission_sheds_after_the_wait_and_holds_while_decode_is_full() -> None:
    state = {"full": True}
    gate = Admission(AdmissionConfig(max_wait_s=0.2), lambda: state["full"])
    started = time.monotonic()
    with pytest.raises(Rejection, match="no capacity within 0.2 s"):
        await gate.admit()
    assert time.monotonic() - started < 1
    waiter = asyncio.ensure_future(gate.admit())
    await asyncio.sleep(0.05)
    state["full"] = False
    await gate.notify()  # what the router's probe does after each round
    (await asyncio.wait_for(waiter, 1)).release()


def test_health_goes_down_and_comes_back() -> None:
    health = PhaseHealth("decode")
    assert health.is_up
    health.failed("ActorDiedError")
    assert not health.is_up and health.reason == "ActorDiedError"
    health.probed({"kv_cache_usage": 0.5, "num_waiting_reqs": 2, "kv_signature": "a"})
    assert health.is_up and health.kv_cache_usage == 0.5 and health.num_waiting_reqs == 2
    prefill = PhaseHealth("prefill")
    assert is_compatible(prefill, health)  # unknown yet
    prefill.probed({"kv_signature": "b"})
    assert not is_compatible(prefill, health)


async def test_a_router_too_busy_to_listen_does_not_take_engines_for_silent() -> None:
    """A loop blocked for longer than the timeout (a burst's callbacks) is not the engine's
    silence; silence while the loop runs freely is; a stall of 10 timeouts is no excuse."""
    stalls = LoopStalls(tick_s=0.01)
    watcher = asyncio.ensure_future(stalls.watch())
    await asyncio.sleep(0.02)
    health = PhaseHealth("decode", stalls)
    time.sleep(0.3)  # the loop is blocked: nothing could have been heard
    health.timed_out(0.1)
    assert health.is_up
    await asyncio.sleep(0.15)  # the loop listens, the engine stays silent
    health.timed_out(0.1)
    assert not health.is_up and health.reason == "no answer within 0.1 s"
    health.probed({})
    time.sleep(0.35)  # a stall longer than MAX_EXCUSED_TIMEOUTS timeouts
    health.timed_out(0.03)
    assert not health.is_up
    fresh = stalls.mark()  # a fresh probe counts from its own start
    health.probed({})
    time.sleep(0.2)
    health.timed_out(0.1, since=fresh)
    assert health.is_up
    watcher.cancel()


def test_token_tracker_reads_and_hides_the_ids() -> None:
    from types import SimpleNamespace

    from serve_app.migration import MigratedEvents, TokenTracker

    request = SimpleNamespace(prompt=[5, 6, 7], return_token_ids=False, max_tokens=10,
                              min_tokens=0, model_fields={})
    tracker = TokenTracker(request, num_client_prompt=3)
    first = ('data: {"id":"cmpl-a","choices":[{"index":0,"text":"x","prompt_token_ids":[5,6,7],'
             '"token_ids":[11,12]}]}\n\n')
    later = 'data: {"id":"cmpl-a","choices":[{"index":0,"text":"y","token_ids":[13]}]}\n\n'
    shown = tracker(first) + tracker(later)
    assert "token_ids" not in shown and '"text":"x"' in shown and '"text":"y"' in shown
    assert tracker.generated == [11, 12, 13]
    moved = MigratedEvents("cmpl-a", "cmpl-b", num_moved=3)
    usage = ('data: {"id":"cmpl-b","choices":[],"usage":{"prompt_tokens":6,"completion_tokens":7,'
             '"total_tokens":13}}\n\ndata: [DONE]\n\n')
    out = moved(usage)
    assert '"id":"cmpl-a"' in out and out.endswith("data: [DONE]\n\n")
    assert '"prompt_tokens":3' in out and '"completion_tokens":10' in out


def test_continuation_makes_what_is_left() -> None:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from serve_app.migration import TokenTracker, continuation

    request = CompletionRequest(model="m", prompt=[5, 6, 7], max_tokens=5, stream=True)
    tracker = TokenTracker(request, num_client_prompt=3)
    tracker.generated = [11, 12]
    rest = continuation(request, "new", tracker)
    assert rest.prompt == [5, 6, 7, 11, 12] and rest.max_tokens == 3
    assert rest.kv_transfer_params is None and rest.request_id == "new"
    tracker.generated = [1, 2, 3, 4, 5]
    assert continuation(request, "new", tracker) is None


async def test_a_stream_never_iterated_still_gives_its_slot_back() -> None:
    import gc

    from serve_app.outcome import Guarded

    async def events():
        yield "data: 1\n\n"

    done: list[str] = []
    guarded = Guarded(events(), [lambda: done.append("slot"), lambda: done.append("engine")])
    del guarded
    gc.collect()
    assert done == ["slot", "engine"]
    iterated = Guarded(events(), [lambda: done.append("again")])
    assert [text async for text in iterated] == ["data: 1\n\n"]
    del iterated
    gc.collect()
    assert done == ["slot", "engine", "again"]  # once, not twice
