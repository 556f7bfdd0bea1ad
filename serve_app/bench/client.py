"""One streaming request to an OpenAI-compatible server -> one `RequestRecord`.

Timing uses `time.perf_counter()` taken as each SSE line arrives (aiohttp, no OpenAI client in
between). A "content chunk" is an event whose first choice carries the output field (`text` for
completions, `delta.content` or `delta.reasoning_content` for chat), even empty: a token that ends
inside a multi-byte character (byte-level BPE) has no text of its own yet, and vLLM streams it as
an empty chunk. Role-only chunks (`delta.role` with empty content) and usage-only chunks are not
tokens. TTFT is the time to the first content chunk, as in vLLM's `bench serve`; each later
content chunk adds one inter-token gap, and E2E ends at `data: [DONE]`. Token counts come from the
final usage chunk (`stream_options.include_usage`); without one, the number of content chunks
stands in.

A request fails (its `error` is set) on a non-200 status (`HTTP <status>: <body>`), an error event
inside the stream, a stream that ends without `[DONE]` or without any content, or an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from serve_app.bench.records import RequestRecord
from serve_app.bench.workload import Prompt

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MAX_ERROR_CHARS = 2000
DRAIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = "completions"
    temperature: float = 0.0
    ignore_eos: bool = True
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(
                f"endpoint must be one of {tuple(ENDPOINT_PATHS)}, got {self.endpoint!r}"
            )

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        base = base.removesuffix("/v1")
        return base + ENDPOINT_PATHS[self.endpoint]

    def to_json(self) -> dict[str, Any]:
        """The config as saved with results: the API key never leaves the process."""
        data = asdict(self)
        data.pop("api_key")
        return data


def build_payload(config: ClientConfig, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": config.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": prompt.output_len,
        "temperature": config.temperature,
    }
    if config.ignore_eos:
        # vLLM takes it as an extra field; with max_tokens it pins the output length exactly.
        # No min_tokens: Ray Serve LLM's PD app forwards it to its max_tokens=1 prefill and
        # rejects the request (HTTP 400), which would leave that system out of comparisons.
        body["ignore_eos"] = True
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    body.update(config.extra_body)
    return body


def build_headers(config: ClientConfig, request_id: str) -> dict[str, str]:
    headers = {"X-Request-Id": request_id}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    return headers


def make_session(config: ClientConfig) -> aiohttp.ClientSession:
    """One session per run: unlimited connections (the runner caps concurrency itself)."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.timeout_s),
        connector=aiohttp.TCPConnector(limit=0),
        read_bufsize=4 * 1024 * 1024,
    )


class SSEParser:
    """Server-sent events, line by line: returns an event's data when its blank line arrives."""

    def __init__(self) -> None:
        self._data_lines: list[str] = []

    def feed_line(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data_lines.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        if not self._data_lines:
            return None
        data = "\n".join(self._data_lines)
        self._data_lines = []
        return data


TEXT_FIELDS = ("content", "reasoning_content", "reasoning")
"""Where a chat chunk's delta carries generated text."""


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text in one completions or chat chunk ("" for role/usage-only chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return next((delta[name] for name in TEXT_FIELDS if delta.get(name)), "")


def is_content_chunk(chunk: dict[str, Any]) -> bool:
    """Whether the chunk carries generated tokens: its first choice has the output field, even
    empty (a token whose text is not whole yet). Before this count, such a first token pushed
    the TTFT back to the next chunk, `stream_interval` steps later: with the embedded random-weight
    model, ~10% of requests (README, "Benchmarks")."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    if "text" in choice:
        return choice["text"] is not None
    delta = choice.get("delta") or {}
    if chunk_text(chunk):
        return True
    if "role" in delta:  # vLLM's first chat chunk: the role, with empty content, before a token
        return False
    return any(delta.get(name) is not None for name in TEXT_FIELDS)


class StreamTimer:
    """Turns timestamped SSE events into the fields of a record."""

    def __init__(self, record: RequestRecord, start: float) -> None:
        self.record = record
        self.start = start
        self.last_token_at: float | None = None
        self.num_chunks = 0
        self.is_done = False

    def on_event(self, data: str, now: float) -> None:
        if data == "[DONE]":
            self.is_done = True
            self.record.e2e_s = now - self.start
            return
        chunk = json.loads(data)
        if chunk.get("error"):
            self.record.error = "stream error: " + json.dumps(chunk["error"])[:MAX_ERROR_CHARS]
            return
        if is_content_chunk(chunk):
            self._on_token(now)
        if chunk.get("usage"):
            self.record.prompt_tokens = chunk["usage"].get("prompt_tokens")
            self.record.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)

    def _on_token(self, now: float) -> None:
        if self.last_token_at is None:
            self.record.ttft_s = now - self.start
        else:
            self.record.itl_s.append(now - self.last_token_at)
        self.last_token_at = now
        self.num_chunks += 1

    def finish(self) -> None:
        if self.record.error is not None:
            return
        if not self.is_done:
            self.record.error = "stream ended before data: [DONE]"
        elif self.num_chunks == 0:
            self.record.error = "stream had no content chunks"
        elif self.record.output_tokens == 0:
            self.record.output_tokens = self.num_chunks


async def send_request(
    session: aiohttp.ClientSession,
    config: ClientConfig,
    prompt: Prompt,
    request_id: str,
    run_start: float,
    scheduled_s: float = 0.0,
) -> RequestRecord:
    """Send one streaming request and time it; failures are recorded, never raised."""
    record = RequestRecord(
        request_id=request_id,
        scheduled_s=scheduled_s,
        expected_output_tokens=prompt.output_len,
        class_name=prompt.class_name,
    )
    start = time.perf_counter()
    record.start_s = start - run_start
    try:
        await _stream(session, config, prompt, record, start)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # any transport or parse failure is data for the benchmark
        record.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if record.e2e_s is None or record.error is not None:
        record.e2e_s = time.perf_counter() - start
    return record


async def _stream(
    session: aiohttp.ClientSession,
    config: ClientConfig,
    prompt: Prompt,
    record: RequestRecord,
    start: float,
) -> None:
    payload = build_payload(config, prompt)
    headers = build_headers(config, record.request_id)
    async with session.post(config.url, json=payload, headers=headers) as response:
        if response.status != 200:
            body = await response.text(errors="replace")
            record.error = f"HTTP {response.status}: {body[:MAX_ERROR_CHARS]}"
            return
        await _read_events(response, StreamTimer(record, start))


async def _read_events(response: aiohttp.ClientResponse, timer: StreamTimer) -> None:
    parser = SSEParser()
    async for raw_line in response.content:
        now = time.perf_counter()
        data = parser.feed_line(raw_line.decode("utf-8", errors="replace"))
        if data is not None:
            timer.on_event(data, now)
        if timer.is_done or timer.record.error is not None:
            break
    trailing = parser.flush()
    if trailing is not None and not timer.is_done and timer.record.error is None:
        timer.on_event(trailing, time.perf_counter())
    timer.finish()
    if timer.is_done:
        await _drain(response)


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what follows `[DONE]` (the end of the chunked body), as the `openai` client does.

    Leaving it unread closes the connection: the server then sees every request as a client
    disconnect (Serve's proxy cancels the finished request) and each request pays a new TCP
    connection. Timing is already recorded, so this only affects what the server sees.
    """
    with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError):  # then not reused
        await asyncio.wait_for(response.read(), timeout=DRAIN_TIMEOUT_S)
