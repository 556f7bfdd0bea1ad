"""The engine calls of one request on its pair: prefill, generate, relay, migrate, release.

The Router decides (admit, route, fall back) and calls `EngineCalls` for the steps that talk to
the engines (steps 5-9 of the lifecycle in `router.py`):

- `prefill`: prefill's copy of the request; a server failure, a phase marked down or a call past
  `failover.prefill_deadline_s` falls back to decode-only where `router.fallback_to_decode`.
- `generate`: the request on one engine; one that fails before its first byte is marked down and
  the whole request runs on the other. Its stream is relayed to the client, and a stream that
  breaks midway migrates to the other engine (`migration.py`).
- `continue_after_prefill`: prefill's first token at once, decode's stream after it
  (`first_token.py`).

Prefill's blocks of a request that decode will not read are released in the background.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from serve_app import first_token, migration
from serve_app.config import AppConfig
from serve_app.ops.telemetry import current_request
from serve_app.outcome import Outcome, final_error_event
from serve_app.policy.errors import openai_error as error_body
from serve_app.policy.pairs import Pair
from serve_app.policy.route import Reason, Route, RouteDecision
from serve_app.protocol import (
    Endpoint,
    PrefillResult,
    prepare_decode_request,
    prepare_prefill_request,
)

logger = logging.getLogger("ray.serve")


class _PhaseDown(Exception):
    """An engine was marked down while a request waited on it."""


def _other(phase: str) -> str:
    return "prefill" if phase == "decode" else "decode"


RELEASE_TIMEOUT_S = 60.0
"""A release of prefill's blocks gives up after this; the KV lease frees them anyway."""


class EngineCalls:
    """The Router's calls into a pair's engines; one per Router replica. The Router decides
    which to make; these make them, mark a phase down when its call fails, and fall back or
    migrate to the other engine of the pair."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self._releases: set[asyncio.Future] = set()

    async def prefill(
        self, pair: Pair, endpoint: Endpoint, request: Any, request_id: str, num_tokens: int = 0
    ) -> Any:
        """`num_tokens`: the prompt's, counted as prefill's queued work until it answers."""
        pair.num_queued["prefill"] += 1
        pair.queued_tokens["prefill"] += num_tokens
        try:
            call = pair.server("prefill").prefill.remote(
                endpoint, prepare_prefill_request(request, request_id),
                trace=current_request().carrier(),
            )
            response = await self._while_up(
                pair, "prefill", call, call.cancel, self.cfg.router.failover.prefill_deadline_s
            )
        except asyncio.CancelledError:
            raise
        except _PhaseDown as down:
            return self._prefill_failed(pair, str(down), mark_down=False)
        except asyncio.TimeoutError:
            deadline = self.cfg.router.failover.prefill_deadline_s
            return self._prefill_failed(pair, f"no answer within {deadline:g} s", mark_down=False)
        except Exception as exc:  # noqa: BLE001 - a dead or failing prefill replica
            return self._prefill_failed(pair, f"{type(exc).__name__}: {exc}")
        finally:
            pair.num_queued["prefill"] -= 1
            pair.queued_tokens["prefill"] -= num_tokens
        pair.health["prefill"].alive()
        if isinstance(response, PrefillResult):
            return response
        outcome = Outcome.from_vllm(response)
        if outcome.status < 500:
            return outcome
        return self._prefill_failed(pair, str(outcome.body), mark_down=False)

    def _prefill_failed(self, pair: Pair, reason: str, mark_down: bool = True) -> Any:
        if mark_down:
            pair.health["prefill"].failed(reason)
        if self.cfg.router.fallback_to_decode:
            logger.warning("prefill failed (%s); decode runs the whole request", reason)
            return None
        return Outcome.error(503, f"prefill failed: {reason}", "ServiceUnavailableError")

    async def generate(
        self,
        pair: Pair,
        phase: str,
        endpoint: Endpoint,
        request: Any,
        request_id: str,
        result: PrefillResult | None,
        num_tokens: int = 0,
    ) -> Outcome:
        """Run `request` on `phase`'s engine; one that fails before its first byte is marked
        down and the whole request runs on the other engine, if that one is up. `num_tokens`:
        the prompt's, counted as the engine's queued work until the first item."""
        tracker = self._tracker(pair, endpoint, request, phase)
        if tracker is not None:
            request = migration.tracked_request(request)
        try:
            first, stream = await self._first_item(
                pair, phase, endpoint, request, result, num_tokens
            )
        except asyncio.CancelledError:
            # Client gone while decode had not answered: it may never have seen the request.
            if result is not None:
                self._release_soon(pair, request_id, result)
            raise
        if isinstance(first, BaseException):
            if result is not None:
                self._release_soon(pair, request_id, result)
            other = _other(phase)
            if not pair.is_up(other):
                return Outcome.error(
                    503, f"{phase} failed: {first}", "ServiceUnavailableError"
                )
            logger.warning("%s failed (%s); %s runs the whole request", phase, first, other)
            current_request().fell_back(phase, f"{other}_only", "fallback")
            whole = prepare_decode_request(request, request_id, None)
            phase, (first, stream) = other, await self._first_item(pair, other, endpoint, whole, None)
            if isinstance(first, BaseException):
                return Outcome.error(503, f"{other} failed: {first}", "ServiceUnavailableError")
            route = RouteDecision(Route(f"{other}_only"), Reason.FALLBACK).header
        else:
            route = None
        if not isinstance(first, str):
            stream.cancel()
            outcome = Outcome.from_vllm(first)
        else:
            outcome = Outcome(
                stream=self._relay(pair, first, stream, phase, request, request_id, tracker)
            )
            outcome.cleanups.append(stream.cancel)
        if route is not None:
            outcome.headers["x-pd-route"] = route  # where it ran, not where it was sent
        return outcome

    def _tracker(
        self, pair: Pair, endpoint: Endpoint, request: Any, phase: str, num_given: int = 0
    ) -> migration.TokenTracker | None:
        """A tracker of the streamed ids where a break could continue on the other engine."""
        if pair.server(_other(phase)) is None or not migration.can_migrate(endpoint, request):
            return None
        return migration.TokenTracker(request, num_client_prompt=len(request.prompt) - num_given)

    async def _first_item(
        self, pair: Pair, phase: str, endpoint: Endpoint, request: Any,
        result: PrefillResult | None, num_tokens: int = 0,
    ) -> tuple[Any, Any]:
        """The stream of `request` on `phase` and its first item (or the exception instead)."""
        signature = None if result is None else pair.health["prefill"].kv_signature
        server = pair.server(phase)
        stream = server.options(stream=True).generate.remote(
            endpoint, request, signature, trace=current_request().carrier()
        )
        current_request().generate_started(phase)
        # A stream's first item is its place in the engine's queue; a unary answer's is the
        # whole request, so it does not count (the probes report the engine's own queue).
        queued = 1 if request.stream else 0
        # A prompt decode reads over NIXL is no work waiting there.
        tokens = queued * num_tokens if result is None else 0
        pair.num_queued[phase] += queued
        pair.queued_tokens[phase] += tokens
        try:
            first = await self._while_up(pair, phase, stream.__anext__(), stream.cancel)
            current_request().first_item(phase)
            pair.health[phase].alive()
            return first, stream
        except (asyncio.CancelledError, KeyboardInterrupt):
            stream.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - the replica failed or died
            stream.cancel()
            pair.health[phase].failed(f"{type(exc).__name__}: {exc}")
            return exc, stream
        finally:
            pair.num_queued[phase] -= queued
            pair.queued_tokens[phase] -= tokens

    async def _while_up(
        self, pair: Pair, phase: str, call: Any, cancel: Callable[[], Any],
        deadline_s: float | None = None,
    ) -> Any:
        """Await `call` on `phase`, giving up (`cancel`, then `_PhaseDown`) as soon as the
        probes mark the phase down: a call to a dead replica waits for a new one instead of
        failing, so the request must not be the one that finds out."""
        task = asyncio.ensure_future(call)
        period = self.cfg.router.failover.probe_period_s
        started = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=period)
                if done:
                    return task.result()
                if not pair.health[phase].is_up:
                    raise _PhaseDown(f"{phase} is down: {pair.health[phase].reason}")
                if deadline_s is not None and time.monotonic() - started > deadline_s:
                    raise asyncio.TimeoutError
        finally:
            if not task.done():
                task.cancel()
                cancel()

    async def _relay(
        self,
        pair: Pair,
        first: str | None,
        stream: Any,
        phase: str,
        request: Any,
        request_id: str,
        tracker: migration.TokenTracker | None,
        edit: Any = None,
    ) -> AsyncIterator[str]:
        """Yield the engine's SSE text (through `edit`, then `tracker`); a stream that breaks
        midway continues on the other engine where it can, else ends with an error event."""

        health = pair.health[phase]

        def shown(text: str) -> str:
            health.alive()
            text = edit(text) if edit is not None else text
            return tracker(text) if tracker is not None else text

        try:
            if first is None:
                # A continuation's stream (first token from prefill): its first item waits on
                # decode, which may go down meanwhile (a restart): then it migrates like a
                # broken stream instead of waiting for decode to come back.
                try:
                    first = await self._while_up(pair, phase, stream.__anext__(), stream.cancel)
                except StopAsyncIteration:
                    return
                if not isinstance(first, str):
                    yield final_error_event(Outcome.from_vllm(first).body)
                    return
            yield shown(first)
            async for item in stream:
                if not isinstance(item, str):
                    # An error response instead of a stream: the client already has tokens,
                    # so it ends the stream as vLLM ends one that fails midway.
                    yield final_error_event(Outcome.from_vllm(item).body)
                    return
                yield shown(item)
        except Exception as exc:  # noqa: BLE001 - the engine's replica failed or died
            health.failed(f"{type(exc).__name__}: {exc}")
            async for text in self._migrate(pair, phase, request, request_id, tracker, exc):
                yield text
        finally:
            stream.cancel()

    async def _migrate(
        self,
        pair: Pair,
        phase: str,
        request: Any,
        request_id: str,
        tracker: migration.TokenTracker | None,
        exc: Exception,
    ) -> AsyncIterator[str]:
        """The rest of a broken stream from the other engine (`migration.py`)."""
        other, new_id = _other(phase), uuid.uuid4().hex
        rest = None
        if tracker is not None and pair.is_up(other):
            rest = migration.continuation(request, new_id, tracker)
        if rest is None:
            body = error_body(503, f"{phase} failed: {exc}", "ServiceUnavailableError")
            yield final_error_event(body)
            return
        logger.warning("%s failed midway (%s): %s continues %s after %d tokens",
                       phase, exc, other, request_id, len(tracker.generated))
        first, stream = await self._first_item(pair, other, "completions", rest, None)
        if not isinstance(first, str):
            if not isinstance(first, BaseException):
                stream.cancel()
            body = error_body(503, f"{phase} and {other} failed", "ServiceUnavailableError")
            yield final_error_event(body)
            return
        moved = migration.MigratedEvents(
            f"cmpl-{request_id}", f"cmpl-{new_id}", len(rest.prompt) - tracker.num_client_prompt
        )
        shown_ids = tracker.is_shown
        tracker = migration.TokenTracker(rest, num_client_prompt=tracker.num_client_prompt)
        tracker.is_shown = shown_ids
        async for text in self._relay(pair, first, stream, other, rest, request_id, None, moved):
            yield tracker(text)

    def continue_after_prefill(
        self, pair: Pair, request: Any, request_id: str, result: PrefillResult
    ) -> Outcome:
        """Stream prefill's token now; decode streams the rest after it."""
        decode_request = first_token.continuation_request(request, request_id, result)
        tracker = self._tracker(pair, "completions", decode_request, "decode", num_given=1)
        if tracker is not None:
            tracker.is_shown = bool(request.return_token_ids)
            decode_request = migration.tracked_request(decode_request)
        signature = pair.health["prefill"].kv_signature
        stream = pair.server("decode").options(stream=True).generate.remote(
            "completions", decode_request, signature, trace=current_request().carrier()
        )
        current_request().generate_started("decode")
        relay = self._relay(
            pair, None, stream, "decode", decode_request, request_id, tracker,
            edit=first_token.ContinuationEvents(),
        )
        decode_began = asyncio.Event()

        def release_unless_decode_began() -> None:
            # Decode may never have seen the request (client gone before decode's first item,
            # even before this stream's first byte; decode failed): free prefill's blocks now.
            # A cleanup of the stream, not its `finally`: that one does not run for a stream
            # never iterated, and an await before it can be cancelled in turn.
            if not decode_began.is_set():
                self._release_soon(pair, request_id, result)

        outcome = Outcome(stream=self._continuation(request, request_id, result, relay, decode_began))
        outcome.cleanups += [stream.cancel, release_unless_decode_began]
        return outcome

    async def _continuation(
        self, request: Any, request_id: str, result: PrefillResult,
        relay: AsyncIterator[str], decode_began: asyncio.Event,
    ) -> AsyncIterator[str]:
        try:
            yield first_token.first_chunk(request, request_id, result)
            async for text in relay:
                if not decode_began.is_set():
                    current_request().first_item("decode")  # the end of the handoff
                    decode_began.set()
                yield text
        finally:
            await relay.aclose()

    def _release_soon(self, pair: Pair, request_id: str, result: PrefillResult) -> None:
        """Free prefill's blocks of a request decode will not read, in the background: this
        may run in a cancelled task, and a call to a dead decode waits for its replacement
        (the request must not wait with it).

        The call runs outside the request's context: Serve cancels the calls a cancelled
        request made (its children, found through that context), and a client gone is when
        this call matters most."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a stream collected outside the loop: the lease frees them
            logger.warning("no event loop to release prefill blocks of %s", request_id)
            return
        task = loop.create_task(
            self._release(pair, request_id, result), context=contextvars.Context()
        )
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, pair: Pair, request_id: str, result: PrefillResult) -> None:
        try:
            decode = pair.server("decode")
            call = decode.release_remote_kv.remote(request_id, result.kv_transfer_params)
            await asyncio.wait_for(call, RELEASE_TIMEOUT_S)
        except BaseException:  # noqa: BLE001 - best effort; the lease frees them later anyway
            logger.warning("could not release prefill blocks of %s", request_id, exc_info=True)
