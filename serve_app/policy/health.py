"""What the router knows of each engine between requests: up or down, queue, KV usage.

The router probes both servers every `failover.probe_period_s` (`Router._monitor`); a probe or a
request's call that fails (a dead replica) marks the phase down at once, and so does silence: no
probe answered and no item streamed for longer than `probe_timeout_s`. A dead replica's calls do not fail fast in Ray Serve:
they wait for a new replica, so a request must never be the one to find out. The next probe that
answers marks the phase up again: traffic returns by itself.

Silence is counted in time the router itself could listen (`LoopStalls`): in a burst the router's
event loop runs its callbacks seconds late, and an engine whose answer waits in that queue is not
silent. Without this a 2,000-request burst on 2 cores marked both healthy engines down (503s).
Only a stall of `MAX_EXCUSED_TIMEOUTS` timeouts in a row is no excuse any more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("ray.serve")

MAX_EXCUSED_TIMEOUTS = 10
"""Silence longer than this many probe timeouts means down, however busy the router was."""


class LoopStalls:
    """How long this event loop could not run its callbacks: a ticker that sleeps `tick_s`
    adds up how late each wake-up came (`watch`, a task of the loop it measures)."""

    def __init__(self, tick_s: float = 0.05) -> None:
        self.tick_s = tick_s
        self.total_s = 0.0
        self._woke: float | None = None
        """When the ticker last ran; None until it runs."""

    async def watch(self) -> None:
        while True:
            self._woke = time.monotonic()
            await asyncio.sleep(self.tick_s)
            self.total_s += max(0.0, time.monotonic() - self._woke - self.tick_s)

    def stalled_s(self) -> float:
        """All stalls so far, the one going on now included (the ticker may not have run yet)."""
        ongoing = 0.0 if self._woke is None else time.monotonic() - self._woke - self.tick_s
        return self.total_s + max(0.0, ongoing)

    def mark(self) -> tuple[float, float]:
        return time.monotonic(), self.stalled_s()

    def responsive_since(self, mark: tuple[float, float]) -> float:
        """Seconds since `mark` in which the loop was not stalled."""
        at, stalled = mark
        return time.monotonic() - at - (self.stalled_s() - stalled)


@dataclass
class PhaseHealth:
    phase: str
    stalls: LoopStalls = field(default_factory=LoopStalls)
    """The router loop's stalls, shared by both phases."""
    is_up: bool = True
    """Optimistic until the first probe: Serve starts the router after both servers."""
    reason: str = ""
    kv_cache_usage: float = 0.0
    num_waiting_reqs: int = 0
    num_running_reqs: int = 0
    kv_signature: str | None = None
    changed_at: float = field(default_factory=time.monotonic)
    last_alive: tuple[float, float] = field(init=False)
    """When the engine last answered anything (a probe, a prefill, a streamed item), as a
    `LoopStalls.mark`; before any answer, the health's creation."""

    def __post_init__(self) -> None:
        self.last_alive = self.stalls.mark()

    def alive(self) -> None:
        self.last_alive = self.stalls.mark()

    def timed_out(self, timeout_s: float, since: tuple[float, float] | None = None) -> None:
        """No answer within `timeout_s`. A busy replica answers probes late while its streams
        still flow: only silence from every call (since `since`, a fresh probe's start, else
        since the engine last answered) for longer than the timeout, in time the router could
        listen, means down."""
        since = since or self.last_alive
        silent_s = time.monotonic() - since[0]
        if (
            self.stalls.responsive_since(since) > timeout_s
            or silent_s > MAX_EXCUSED_TIMEOUTS * timeout_s
        ):
            self.failed(f"no answer within {timeout_s:g} s")

    def probed(self, report: dict[str, Any]) -> None:
        self.alive()
        self.kv_cache_usage = float(report.get("kv_cache_usage", 0.0))
        self.num_waiting_reqs = int(report.get("num_waiting_reqs", 0))
        self.num_running_reqs = int(report.get("num_running_reqs", 0))
        self.kv_signature = report.get("kv_signature")
        self._set(True, "")

    def failed(self, reason: str) -> None:
        self._set(False, reason)

    def _set(self, is_up: bool, reason: str) -> None:
        if is_up != self.is_up:
            state = "up" if is_up else f"DOWN ({reason})"
            logger.warning("%s engine is %s", self.phase, state)
            self.changed_at = time.monotonic()
        self.is_up = is_up
        self.reason = reason


def is_compatible(prefill: PhaseHealth, decode: PhaseHealth) -> bool:
    """Whether prefill's KV blocks may be read by decode: the same model, dtype, KV layout,
    block size and vLLM (`Engine.kv_signature`). Unknown (no probe yet) counts as compatible:
    each request's handoff is checked again by decode itself."""
    if prefill.kv_signature is None or decode.kv_signature is None:
        return True
    return prefill.kv_signature == decode.kv_signature
