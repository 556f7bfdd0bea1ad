"""`coalesce_ready`: joins only what is already waiting, keeps order, aborts its source on close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serve_app.streams import coalesce_ready


class Source:
    """An SSE event source the test drives one event at a time."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self.closed = False
        self.cancelled = False

    async def events(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.closed = True


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_ready_event_is_passed_on_at_once() -> None:
    source = Source()
    stream = coalesce_ready(source.events())
    source.queue.put_nowait("data: 1\n\n")
    assert await asyncio.wait_for(stream.__anext__(), 1) == "data: 1\n\n"
    source.queue.put_nowait("data: 2\n\n")
    assert await asyncio.wait_for(stream.__anext__(), 1) == "data: 2\n\n"
    source.queue.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    assert source.closed


async def test_events_waiting_together_travel_as_one_item_in_order() -> None:
    source = Source()
    stream = coalesce_ready(source.events())
    source.queue.put_nowait("data: 1\n\n")
    assert await stream.__anext__() == "data: 1\n\n"
    for i in (2, 3, 4):
        source.queue.put_nowait(f"data: {i}\n\n")
    source.queue.put_nowait("data: [DONE]\n\n")
    source.queue.put_nowait(None)
    await settle()
    assert [item async for item in stream] == ["data: 2\n\ndata: 3\n\ndata: 4\n\ndata: [DONE]\n\n"]


async def test_source_error_reaches_the_consumer_after_earlier_events() -> None:
    source = Source()
    stream = coalesce_ready(source.events())
    source.queue.put_nowait("data: 1\n\n")
    source.queue.put_nowait(RuntimeError("engine died"))
    await settle()
    assert await stream.__anext__() == "data: 1\n\n"
    with pytest.raises(RuntimeError, match="engine died"):
        await stream.__anext__()


async def test_closing_mid_stream_cancels_and_closes_the_source() -> None:
    source = Source()
    stream = coalesce_ready(source.events())
    source.queue.put_nowait("data: 1\n\n")
    assert await stream.__anext__() == "data: 1\n\n"
    await stream.aclose()  # the client went away while the source waits for its next token
    assert source.cancelled and source.closed
