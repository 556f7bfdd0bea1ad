"""Bounded admission: every request is served, waits briefly for a slot, or is shed at once.

An unbounded queue turns overload into latency until clients time out and, to them, requests
vanish. Here a request takes one of `max_in_flight` slots; when none is free (or decode's KV cache
is nearly full) it may wait, up to `max_waiting` of them and for at most `max_wait_s`; otherwise,
or past the wait, it is refused with 429 and `Retry-After`, in well under a second. The slot is
held until the request's last byte (a stream's end), so what is admitted keeps its latency.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from serve_app.config import AdmissionConfig
from serve_app.policy.errors import Rejection, capacity_rejection


class Admission:
    def __init__(self, cfg: AdmissionConfig, is_decode_full: Callable[[], bool]) -> None:
        self.cfg = cfg
        self.is_decode_full = is_decode_full
        self.num_in_flight = 0
        self.num_waiting = 0
        self.num_shed = 0
        self._changed = asyncio.Condition()

    async def admit(self) -> Slot:
        """A slot for one request, or `Rejection(429)`."""
        if not self.cfg.enabled or self._has_room():
            return self._take()
        if not self._can_wait():
            raise self.shed_now()
        self.num_waiting += 1
        deadline = time.monotonic() + self.cfg.max_wait_s
        try:
            async with self._changed:
                while not self._has_room():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._shed(f"no capacity within {self.cfg.max_wait_s:g} s")
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=left)
                    except asyncio.TimeoutError:
                        continue
                return self._take()
        finally:
            self.num_waiting -= 1

    def is_full(self) -> bool:
        """`admit()` would refuse a request now without waiting: no slot and no room to wait."""
        return (
            self.cfg.enabled
            and not self._has_room()
            and not self._can_wait()
        )

    def capacity(self) -> int | None:
        """The most requests admission holds at once, in slots and waiting; None: unbounded."""
        if not self.cfg.enabled:
            return None
        num_waiting = self.cfg.max_waiting if self.cfg.max_wait_s > 0 else 0
        return self.cfg.max_in_flight + num_waiting

    def shed_now(self) -> Rejection:
        """The refusal `admit()` gives when `is_full()` (for `door.py`, which sheds before it)."""
        return self._shed("the server is at capacity")

    async def notify(self) -> None:
        """Something changed (a slot freed, decode's KV usage dropped): wake the waiters."""
        async with self._changed:
            self._changed.notify_all()

    def _has_room(self) -> bool:
        return self.num_in_flight < self.cfg.max_in_flight and not self.is_decode_full()

    def _can_wait(self) -> bool:
        return self.num_waiting < self.cfg.max_waiting and self.cfg.max_wait_s > 0

    def _take(self) -> Slot:
        self.num_in_flight += 1
        return Slot(self)

    def _release(self) -> None:
        self.num_in_flight -= 1
        if self.num_waiting:
            task = asyncio.ensure_future(self.notify())
            _pending.add(task)
            task.add_done_callback(_pending.discard)

    def _shed(self, why: str) -> Rejection:
        self.num_shed += 1
        return capacity_rejection(self.cfg.retry_after_s, why)


_pending: set[asyncio.Future] = set()


class Slot:
    """One admitted request's place; `release()` is idempotent (stream end and error paths)."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release()
            self._admission = None
