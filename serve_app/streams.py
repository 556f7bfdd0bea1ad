"""Stream plumbing between the deployments.

Each item a Serve streaming call yields is one object sent to the caller, and the Router forwards
each one again to the HTTP proxy: two hops per item. When tokens come faster than the hops (many
streams at once, a busy machine), per-token items make the hops the bottleneck. `coalesce_ready`
joins whatever SSE events are already waiting into one item and never waits for more, so it adds
no latency: with one token per item it is a pass-through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def coalesce_ready(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yield `events` in order, each item the concatenation of every event ready by then.

    SSE events end with a blank line, so a concatenation is itself a valid SSE payload. Closing
    this generator cancels the read of `events` (which aborts vLLM's request) and closes it.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait(_Raised(exc))
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            text = "".join(item for item in items if isinstance(item, str))
            if text:
                yield text
            for item in items:
                if isinstance(item, _Raised):
                    raise item.exc
            if items[-1] is _END:
                return
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
