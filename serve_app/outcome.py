"""The result of one request and the plumbing that gets it to the client.

`Outcome` is what the Router's steps hand each other (an error, one JSON body, or an SSE stream);
`Guarded` makes sure a stream's cleanups (the admission slot, the engine's stream) run once,
however the client leaves; `final_error_event` ends a stream that fails after its first chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from serve_app.policy.errors import Rejection
from serve_app.policy.errors import openai_error as error_body


class Outcome:
    """The result of running one request: an error, one JSON body, or an SSE stream."""

    def __init__(
        self,
        status: int = 200,
        body: dict | None = None,
        stream: AsyncIterator[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.stream = stream
        self.headers = headers or {}
        self.cleanups: list[Callable[[], Any]] = []
        """What must run once the stream is done with, even if it is never iterated."""

    @classmethod
    def error(cls, status: int, message: str, err_type: str, param: str | None = None):
        return cls(status=status, body=error_body(status, message, err_type, param))

    @classmethod
    def rejected(cls, rejection: Rejection) -> Outcome:
        return cls(status=rejection.status, body=rejection.body, headers=rejection.headers)

    @classmethod
    def from_vllm(cls, response: Any) -> Outcome:
        body = response.model_dump(exclude_none=False)
        error = body.get("error")
        status = int(error.get("code") or 500) if error else 200
        if not error:
            body.pop("kv_transfer_params", None)
        return cls(status=status, body=body)


class Guarded:
    """A response stream whose cleanups (the admission slot, the engine's stream) run once,
    however it ends: exhausted, failed, closed, or never iterated at all (a client gone before
    the first byte: Starlette then drops the iterator, and a generator that never started runs
    no `finally`)."""

    def __init__(self, stream: AsyncIterator[str], cleanups: list[Callable[[], Any]]) -> None:
        self.stream = stream
        self.cleanups = cleanups

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        try:
            async for text in self.stream:
                yield text
        finally:
            self.close()
            close = getattr(self.stream, "aclose", None)
            if close is not None:
                await close()

    def close(self) -> None:
        cleanups, self.cleanups = self.cleanups, []
        for cleanup in cleanups:
            cleanup()

    def __del__(self) -> None:
        self.close()


def final_error_event(body: dict | None) -> str:
    """The last SSE events of a stream that fails after its first chunk went out."""
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
