"""The streaming client and load loop against a small real HTTP server on 127.0.0.1.

The server is a stand-in that streams OpenAI-shaped chunks with known sleeps: the point here is
the client's SSE parsing and timing arithmetic. Tests against the real app live elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from serve_app.bench.__main__ import main
from serve_app.bench.client import ClientConfig, SSEParser, make_session, send_request
from serve_app.bench.runner import LoadConfig, run_load
from serve_app.bench.stats import SLO
from serve_app.bench.sweep import run_sweep
from serve_app.bench.workload import Prompt, SyntheticPrompts, WordText, WorkloadConfig

FIRST_TOKEN_DELAY_S = 0.06
TOKEN_GAP_S = 0.03
SLEEP_SLACK_S = 0.005  # timers may fire a hair early relative to perf_counter
REQUESTS = web.AppKey("requests", list)


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def completion_chunk(text: str, is_chat: bool) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}} if is_chat else {"index": 0, "text": text}
    return {"id": "cmpl-1", "object": "chunk", "choices": [choice]}


async def stream_tokens(request: web.Request, is_chat: bool) -> web.StreamResponse:
    body = await request.json()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    request.app[REQUESTS].append({"body": body, "headers": request.headers.copy(), "peer": peer})
    prompt = body["messages"][0]["content"] if is_chat else body["prompt"]
    if prompt == "bad":
        error = {"message": "prompt is bad", "type": "BadRequestError", "param": None, "code": 400}
        return web.json_response({"error": error}, status=400)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if is_chat:
        # vLLM's first chat chunk: the role with empty content, not a token.
        role = {"role": "assistant", "content": ""}
        await response.write(sse({"choices": [{"index": 0, "delta": role}]}))
    await asyncio.sleep(FIRST_TOKEN_DELAY_S)
    num_tokens = body["max_tokens"]
    for index in range(num_tokens):
        if index:
            await asyncio.sleep(TOKEN_GAP_S)
        # A token that ends inside a multi-byte character streams with empty text (vLLM).
        text = "" if prompt == "fragment-first" and index == 0 else f" t{index}"
        await response.write(sse(completion_chunk(text, is_chat)))
        if prompt == "midstream-error":
            await response.write(sse({"error": {"message": "engine died", "code": 500}}))
            return response
        if prompt == "truncated":
            return response
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": num_tokens}
    await response.write(sse({"choices": [], "usage": usage}))
    await response.write(sse("[DONE]"))
    if prompt == "late-end":
        await asyncio.sleep(TOKEN_GAP_S)  # the body ends after [DONE], as Serve's does
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    return await stream_tokens(request, is_chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await stream_tokens(request, is_chat=True)


class ServerThread:
    """An aiohttp app served from its own thread and event loop on a free 127.0.0.1 port."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.app[REQUESTS] = []
        self.app.router.add_post("/v1/completions", completions)
        self.app.router.add_post("/v1/chat/completions", chat_completions)
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.runner = web.AppRunner(self.app)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.app[REQUESTS]

    def start(self) -> None:
        self.thread.start()
        self._call(self.runner.setup())
        self._call(web.SockSite(self.runner, self.sock).start())

    def stop(self) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    thread = ServerThread()
    thread.start()
    yield thread
    thread.stop()
    assert not thread.thread.is_alive()


async def send_one(server: ServerThread, prompt: Prompt, endpoint: str = "completions"):
    config = ClientConfig(base_url=server.base_url + "/v1", model="tiny", endpoint=endpoint)
    async with make_session(config) as session:
        return await send_request(session, config, prompt, "req-1", run_start=0.0)


def test_sse_parser_joins_data_lines_and_skips_comments() -> None:
    parser = SSEParser()
    lines = [": keep-alive\n", 'data: {"a":\n', "data: 1}\r\n", "\n", "event: x\n", "\n"]
    assert [parser.feed_line(line) for line in lines] == [None, None, None, '{"a":\n1}', None, None]
    parser.feed_line("data:[DONE]")
    assert parser.flush() == "[DONE]"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_streamed_record_fields(server: ServerThread, endpoint: str) -> None:
    record = await send_one(server, Prompt(text="one two three", output_len=4), endpoint)
    assert record.error is None
    assert record.prompt_tokens == 3
    assert record.output_tokens == 4
    assert record.expected_output_tokens == 4
    assert FIRST_TOKEN_DELAY_S - SLEEP_SLACK_S <= record.ttft_s < FIRST_TOKEN_DELAY_S + 1.0
    assert len(record.itl_s) == 3
    assert all(TOKEN_GAP_S - SLEEP_SLACK_S <= gap < TOKEN_GAP_S + 1.0 for gap in record.itl_s)
    assert record.e2e_s >= record.ttft_s + sum(record.itl_s)
    assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 3)
    sent = server.requests[-1]
    assert sent["headers"]["X-Request-Id"] == "req-1"
    body = sent["body"]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["ignore_eos"]) == (4, True)
    assert "min_tokens" not in body
    assert ("messages" in body) == (endpoint == "chat")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_a_first_token_without_text_of_its_own_is_the_first_token(
    server: ServerThread, endpoint: str
) -> None:
    """TTFT is the first token's chunk even when its text is empty (a byte of a character),
    not the next chunk's; the chat role chunk before it is no token."""
    record = await send_one(server, Prompt(text="fragment-first", output_len=4), endpoint)
    assert record.error is None and record.output_tokens == 4
    assert FIRST_TOKEN_DELAY_S - SLEEP_SLACK_S <= record.ttft_s < FIRST_TOKEN_DELAY_S + TOKEN_GAP_S
    assert len(record.itl_s) == 3


async def test_client_reads_to_the_end_and_reuses_its_connection(server: ServerThread) -> None:
    """Reading past `[DONE]` to the end of the body keeps the connection: a server sees no
    client disconnect after each request (Serve's proxy would cancel it) and no new TCP
    connection per request."""
    config = ClientConfig(base_url=server.base_url + "/v1", model="tiny")
    before = len(server.requests)
    async with make_session(config) as session:
        for index in range(3):
            record = await send_request(
                session, config, Prompt("late-end", 3), f"reuse-{index}", run_start=0.0
            )
            assert record.is_success, record.error
    peers = {request["peer"] for request in server.requests[before:]}
    assert len(peers) == 1, peers


async def test_http_error_is_recorded(server: ServerThread) -> None:
    record = await send_one(server, Prompt(text="bad", output_len=4))
    assert record.error.startswith("HTTP 400: ")
    assert "prompt is bad" in record.error
    assert record.ttft_s is None
    assert record.e2e_s is not None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("midstream-error", "stream error: "), ("truncated", "stream ended before data: [DONE]")],
)
async def test_broken_streams_are_errors(server: ServerThread, prompt: str, expected: str) -> None:
    record = await send_one(server, Prompt(text=prompt, output_len=3))
    assert record.error.startswith(expected)
    assert record.ttft_s is not None


async def test_connection_refused_is_recorded() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ClientConfig(base_url=f"http://127.0.0.1:{port}", model="tiny")
    async with make_session(config) as session:
        record = await send_request(session, config, Prompt("x", 2), "req-2", run_start=0.0)
    assert record.error.startswith("ClientConnectorError")


async def test_closed_loop_respects_concurrency(server: ServerThread) -> None:
    client = ClientConfig(base_url=server.base_url, model="tiny")
    load = LoadConfig(max_concurrency=2, num_requests=6, show_progress=False)
    source = SyntheticPrompts(WorkloadConfig(input_len=5, output_len=3), WordText())
    outcome = await run_load(client, load, source)
    records = sorted(outcome.records, key=lambda record: record.start_s)
    assert [record.error for record in records] == [None] * 6
    intervals = [(r.start_s, r.start_s + r.e2e_s) for r in records]
    for start, _ in intervals:
        in_flight = sum(begin <= start < end for begin, end in intervals)
        assert in_flight <= 2
    assert records[2].start_s >= min(end for _, end in intervals[:2]) - 0.01
    assert outcome.duration_s >= max(end for _, end in intervals)


async def test_sweep_runs_each_rate(server: ServerThread) -> None:
    client = ClientConfig(base_url=server.base_url, model="tiny")
    load = LoadConfig(num_requests=3, show_progress=False, seed=1)
    source = SyntheticPrompts(WorkloadConfig(input_len=5, output_len=2), WordText())
    slo = SLO(ttft_ms=5000, tpot_ms=5000)
    outcome = await run_sweep(client, load, source, [40.0, 20.0], slo)
    assert [run.request_rate for run in outcome.runs] == [20.0, 40.0]
    assert outcome.goodput.goodput_rps == 40.0
    assert all(run.summary["num_completed"] == 3 for run in outcome.runs)


def test_run_command_saves_records_summary_and_command(
    server: ServerThread, tmp_path: Path
) -> None:
    path = tmp_path / "run.json"
    argv = [
        "run",
        "--base-url",
        server.base_url,
        "--model",
        "tiny",
        "--request-rate",
        "50",
        "--num-requests",
        "4",
        "--input-len",
        "6",
        "--output-len",
        "3",
        "--slo-ttft-ms",
        "5000",
        "--slo-tpot-ms",
        "5000",
        "--label",
        "stand-in",
        "--save",
        str(path),
        "--no-progress",
        "--api-key",
        "secret-key",
    ]
    assert main(argv) == 0
    saved = json.loads(path.read_text())
    assert saved["kind"] == "run"
    assert saved["label"] == "stand-in"
    assert saved["request_rate"] == 50.0
    assert "secret-key" not in path.read_text()
    assert saved["command"].startswith("python -m serve_app.bench run --base-url")
    assert saved["config"]["load"]["num_requests"] == 4
    assert saved["summary"]["num_completed"] == 4
    assert saved["summary"]["slo_attainment"] == 1.0
    assert len(saved["records"]) == 4
    assert {len(record["itl_s"]) for record in saved["records"]} == {2}
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer secret-key"


def test_sweep_command_saves_runs_and_goodput(server: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "sweep.json"
    argv = [
        "sweep", "--base-url", server.base_url, "--model", "tiny", "--rates", "40,20",
        "--num-requests", "3", "--input-len", "4", "--output-len", "2", "--slo-ttft-ms", "5000",
        "--label", "stand-in", "--save", str(path), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads(path.read_text())
    assert saved["kind"] == "sweep"
    assert [run["request_rate"] for run in saved["runs"]] == [20.0, 40.0]
    assert saved["goodput"]["goodput_rps"] == 40.0
    assert saved["config"]["load"]["request_rate"] == [40.0, 20.0]
    assert main(["plot", str(path), "--out", str(tmp_path / "plots")]) == 0
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4


def test_mixed_sweep_command_records_classes(server: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "mixed.json"
    before = len(server.requests)
    argv = [
        "sweep", "--base-url", server.base_url, "--model", "tiny", "--rates", "40,20",
        "--num-requests", "8", "--mix", "chat:3:4:3,doc:1:12:1", "--slo-ttft-ms", "5000",
        "--class-slo", "doc:6000:-", "--label", "stand-in", "--save", str(path), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads(path.read_text())
    assert [c["name"] for c in saved["config"]["workload"]["mix"]] == ["chat", "doc"]
    assert saved["config"]["slo"]["per_class"] == {"doc": {"ttft_ms": 6000.0, "tpot_ms": None}}
    lengths = {"chat": (4, 3), "doc": (12, 1)}
    bodies = [request["body"] for request in server.requests[before:]]
    for run in saved["runs"]:
        records = run["records"]
        assert {record["class_name"] for record in records} == {"chat", "doc"}
        for record in records:
            assert (record["prompt_tokens"], record["output_tokens"]) == lengths[
                record["class_name"]]
        classes = run["summary"]["classes"]
        assert sum(part["num_requests"] for part in classes.values()) == 8
        assert classes["doc"]["slo"] == {"ttft_ms": 6000.0, "tpot_ms": None}
    # The same seed: both rates send the same prompts, each with its class's max_tokens.
    assert [body["prompt"] for body in bodies[:8]] == [body["prompt"] for body in bodies[8:]]
    assert all(body["ignore_eos"] is True for body in bodies)
    assert main(["plot", str(path), "--out", str(tmp_path / "plots")]) == 0
    assert len(list((tmp_path / "plots").glob("*_doc.png"))) == 4
