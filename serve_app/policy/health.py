"""What the router knows of each engine between requests: up or down, queue, KV usage.

The router probes both servers every `failover.probe_period_s` (`Router._monitor`); a probe or a
request's call that fails (a dead replica) marks the phase down at once, and so does silence: no
probe answered and no item streamed for longer than `probe_timeout_s`. A dead replica's calls do not fail fast in Ray Serve:
they wait for a new replica, so a request must never be the one to find out. The next probe that
answers marks the phase up again: traffic returns by itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("ray.serve")


@dataclass
class PhaseHealth:
    phase: str
    is_up: bool = True
    """Optimistic until the first probe: Serve starts the router after both servers."""
    reason: str = ""
    kv_cache_usage: float = 0.0
    num_waiting_reqs: int = 0
    num_running_reqs: int = 0
    kv_signature: str | None = None
    changed_at: float = field(default_factory=time.monotonic)
    last_alive: float = field(default_factory=time.monotonic)
    """When the engine last answered anything: a probe, a prefill, a streamed item."""

    def alive(self) -> None:
        self.last_alive = time.monotonic()

    def probe_timed_out(self, timeout_s: float) -> None:
        """A busy replica answers probes late while its streams still flow: only silence
        from every call for longer than the timeout means down."""
        if time.monotonic() - self.last_alive > timeout_s:
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
