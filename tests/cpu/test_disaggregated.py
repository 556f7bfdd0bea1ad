"""End to end through real Ray Serve, two real vLLM engines and a real NIXL handoff.

All tests share one running app (module fixture `pd_app`): engines take minutes to start here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.cpu.conftest import MODEL_NAME, TINY_MODEL

BLOCK_SIZE = 32  # configs/local-cpu.yaml engine_kwargs.block_size
# Tiny Llama: 2 layers x (K and V) x 2 KV heads x head_dim 32 x 2 bytes (bf16).
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 2

PROMPTS = [
    "Prefill reads the whole prompt at once.",
    "The quick brown fox jumps over the lazy dog. " * 3,
    # Longer than several KV blocks (about 300 tokens, 10 blocks of 32).
    " ".join(f"step {i} of the journey begins with one more word" for i in range(30)),
]


@pytest.fixture(scope="module")
def client(pd_app: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=pd_app["base_url"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def stats(pd_app: dict[str, Any], role: str) -> dict[str, Any]:
    return pd_app[role].stats.remote().result()


def wait_until_released(pd_app: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll both engines until they hold no request and no KV block; return the last report."""
    deadline = time.monotonic() + timeout_s
    while True:
        reports = {role: pd_app[role].leak_report.remote().result() for role in ("prefill", "decode")}
        clean = all(
            r["num_unfinished_requests"] == 0 and r["all_blocks_free"] for r in reports.values()
        )
        if clean or time.monotonic() > deadline:
            return reports
        time.sleep(0.5)


def test_decode_engine_started_after_prefill_engine(pd_app: dict[str, Any]) -> None:
    prefill, decode = stats(pd_app, "prefill"), stats(pd_app, "decode")
    assert decode["engine_start_began"] >= prefill["engine_ready_at"]


def test_each_engine_runs_on_its_phase_cores(pd_app: dict[str, Any]) -> None:
    """EngineCore and its worker on the phase's `cpu_cores`; the replica (vLLM's frontend) not."""
    from tests.cpu.conftest import TEST_PORT_BASE

    ports = {str(TEST_PORT_BASE): "0", str(TEST_PORT_BASE + 10): "1"}  # app_args: prefill, decode
    seen: dict[str, dict[str, set[str]]] = {cores: {} for cores in ports.values()}
    for process in psutil.process_iter(["name"]):
        try:
            port = process.environ().get("VLLM_NIXL_SIDE_CHANNEL_PORT")
            if port not in ports:
                continue
            allowed = ",".join(map(str, sorted(process.cpu_affinity())))
            name = process.info["name"]  # comm is cut at 15 characters: VLLM::EngineCor
            kind = next((k for k in ("EngineCor", "Worker") if k in name), "replica")
            seen[ports[port]].setdefault(kind, set()).add(allowed)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for cores, kinds in seen.items():
        assert kinds.get("EngineCor") == {cores}, seen
        assert kinds.get("Worker") == {cores}, seen
        assert cores not in kinds.get("replica", {cores}), seen


def test_greedy_output_equals_one_engine_alone(
    client: openai.OpenAI, tokenizer: Any, tmp_path: Path
) -> None:
    max_tokens = 24
    assert len(tokenizer(PROMPTS[-1]).input_ids) > 4 * BLOCK_SIZE
    out = tmp_path / "reference.json"
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("reference_engine.py")), str(TINY_MODEL),
         str(max_tokens), str(out)],
        input=json.dumps(PROMPTS), capture_output=True, text=True, timeout=600, check=True,
    )
    expected = json.loads(out.read_text())
    for prompt, alone in zip(PROMPTS, expected, strict=True):
        response = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        assert response.choices[0].token_ids == alone["token_ids"]
        assert response.choices[0].text == alone["text"]


def test_prompt_kv_crosses_nixl_instead_of_recompute(
    pd_app: dict[str, Any], client: openai.OpenAI, tokenizer: Any
) -> None:
    before = {role: stats(pd_app, role) for role in ("prefill", "decode")}
    num_blocks = 0
    for prompt in PROMPTS:
        response = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0.0
        )
        num_blocks += math.ceil(response.usage.prompt_tokens / BLOCK_SIZE)
    after = {role: stats(pd_app, role) for role in ("prefill", "decode")}

    decode_xfer = after["decode"]["transfers"]
    assert decode_xfer["num_transfers"] - before["decode"]["transfers"]["num_transfers"] == 3
    assert decode_xfer["num_failed_transfers"] == before["decode"]["transfers"]["num_failed_transfers"]
    moved = decode_xfer["bytes_transferred"] - before["decode"]["transfers"]["bytes_transferred"]
    # Every block of every prompt was read from prefill: nothing was recomputed on decode.
    assert moved == num_blocks * BLOCK_SIZE * KV_BYTES_PER_TOKEN
    # Prefill produced exactly one token per request, decode all the others.
    prefill_tokens = after["prefill"]["num_generation_tokens"] - before["prefill"]["num_generation_tokens"]
    assert prefill_tokens == len(PROMPTS)
    decode_tokens = after["decode"]["num_generation_tokens"] - before["decode"]["num_generation_tokens"]
    assert decode_tokens == 4 * len(PROMPTS)


def test_openai_completions_usage_and_streaming(client: openai.OpenAI, tokenizer: Any) -> None:
    prompt = PROMPTS[1]
    num_prompt_tokens = len(tokenizer(prompt).input_ids)
    full = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert full.usage.prompt_tokens == num_prompt_tokens
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == num_prompt_tokens + 12

    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ))
    # Token ids, not text: random weights emit special tokens, which incremental
    # detokenization renders differently from whole-sequence detokenization.
    full_ids = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0].token_ids
    streamed_ids = [t for c in chunks if c.choices for t in (c.choices[0].token_ids or [])]
    assert streamed_ids == full_ids
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def token_prompt(tokenizer: Any, num_tokens: int) -> list[int]:
    ids = tokenizer(PROMPTS[-1]).input_ids
    return (ids * (num_tokens // len(ids) + 1))[:num_tokens]


# On a block boundary decode's prompt (prompt + first token) needs one block more than prefill
# holds: the plugin's clamp makes decode load only what prefill computed.
@pytest.mark.parametrize("num_prompt_tokens", [8 * BLOCK_SIZE, 8 * BLOCK_SIZE - 5])
def test_streamed_first_token_comes_from_prefill(
    pd_app: dict[str, Any], client: openai.OpenAI, tokenizer: Any, num_prompt_tokens: int
) -> None:
    prompt, max_tokens = token_prompt(tokenizer, num_prompt_tokens), 10
    extra = {"ignore_eos": True, "return_token_ids": True}
    # Not streamed: the plain handoff, decode makes every token.
    plain = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0, extra_body=extra
    )
    before = {role: stats(pd_app, role) for role in ("prefill", "decode")}
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body=extra,
    ))
    after = {role: stats(pd_app, role) for role in ("prefill", "decode")}

    def made(role: str) -> int:
        return after[role]["num_generation_tokens"] - before[role]["num_generation_tokens"]

    # Prefill's token went to the client; decode made only the others.
    assert (made("prefill"), made("decode")) == (1, max_tokens - 1)
    transfers = {k: after["decode"]["transfers"][k] - before["decode"]["transfers"][k]
                 for k in ("num_transfers", "num_failed_transfers", "bytes_transferred")}
    num_blocks = math.ceil(num_prompt_tokens / BLOCK_SIZE)
    assert transfers == {"num_transfers": 1, "num_failed_transfers": 0,
                         "bytes_transferred": num_blocks * BLOCK_SIZE * KV_BYTES_PER_TOKEN}

    # The client sees what the plain handoff gives, in vLLM's stream shape.
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].token_ids == plain.choices[0].token_ids[:1]
    assert [t for c in content for t in c.choices[0].token_ids] == plain.choices[0].token_ids
    assert "".join(c.choices[0].text for c in content) == plain.choices[0].text
    assert getattr(content[0].choices[0], "prompt_token_ids", None) == prompt
    assert all(getattr(c.choices[0], "prompt_token_ids", None) is None for c in content[1:])
    assert len({c.id for c in chunks}) == 1
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    made_so_far = [len(c.choices[0].token_ids) for c in content]
    assert [c.usage.completion_tokens for c in content] == [
        sum(made_so_far[: i + 1]) for i in range(len(content))
    ]
    assert {c.usage.prompt_tokens for c in content} == {num_prompt_tokens}


def test_requests_that_cannot_continue_take_the_plain_handoff(
    pd_app: dict[str, Any], client: openai.OpenAI, tokenizer: Any
) -> None:
    prompt, max_tokens = token_prompt(tokenizer, 100), 6
    before = stats(pd_app, "decode")["num_generation_tokens"]
    # A stop string could span prefill's token and decode's first one.
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        stop=["never appears here"], extra_body={"ignore_eos": True, "return_token_ids": True},
    ))
    assert stats(pd_app, "decode")["num_generation_tokens"] - before == max_tokens
    assert sum(len(c.choices[0].token_ids or []) for c in chunks if c.choices) == max_tokens


def test_client_gone_after_the_first_token_leaves_nothing_behind(pd_app: dict[str, Any]) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPTS[-1], "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    # Ten times: the client leaves while decode's call is anywhere from not yet sent to reading
    # the blocks, and a release that the cancellation skipped (seen about once in 40 requests)
    # leaves prefill's blocks to the lease (120 s, past this wait).
    for _ in range(10):
        with httpx.stream("POST", pd_app["base_url"] + "/v1/completions", json=body) as response:
            assert next(response.iter_lines()).startswith("data: ")
    reports = wait_until_released(pd_app)
    for role, report in reports.items():
        assert report == {"num_unfinished_requests": 0, "all_blocks_free": True}, role


def test_openai_chat_usage_and_streaming(client: openai.OpenAI, tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What does prefill do?"},
    ]
    prompt_text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    expected_prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
    full = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == len(expected_prompt)
    assert full.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_raw_sse_ends_with_done(pd_app: dict[str, Any]) -> None:
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", pd_app["base_url"] + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_models_and_health(pd_app: dict[str, Any], client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(pd_app["base_url"] + "/health").status_code == 200


def test_deployment_handle_unary_and_streaming(pd_app: dict[str, Any]) -> None:
    router = pd_app["router"]
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    unary = router.completions.remote(body).result()
    assert unary["usage"]["completion_tokens"] == 6
    chunks = list(router.options(stream=True).stream.remote("completions", body))
    streamed_ids = [t for c in chunks if c["choices"] for t in c["choices"][0]["token_ids"] or []]
    assert streamed_ids == unary["choices"][0]["token_ids"]

    chat_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": 4, "temperature": 0.0}
    chat = router.chat_completions.remote(chat_body).result()
    assert chat["choices"][0]["message"]["role"] == "assistant"
    streamed = list(router.options(stream=True).stream.remote("chat", chat_body))
    assert streamed[0]["object"] == "chat.completion.chunk"
    assert [c["choices"][0]["finish_reason"] for c in streamed if c["choices"]][-1] == "length"


def test_deployment_handle_raises_request_error(pd_app: dict[str, Any]) -> None:
    from serve_app.protocol import RequestError

    with pytest.raises(RequestError) as info:
        pd_app["router"].completions.remote({"model": "nope", "prompt": "x"}).result()
    assert info.value.status_code == 404


BAD_REQUESTS = [
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {"model": MODEL_NAME}, 400, "prompt"),
    ("chat", {"model": MODEL_NAME}, 400, "messages"),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("chat", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("completions", {"model": MODEL_NAME, "prompt": "word " * 3000, "max_tokens": 4}, 400, None),
    ("completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": MODEL_NAME, "prompt": 5.5}, 400, "prompt"),
    ("chat", {"model": MODEL_NAME, "messages": "hello"}, 400, "messages"),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_openai_error_and_service_keeps_serving(
    pd_app: dict[str, Any], client: openai.OpenAI, endpoint: str, body: Any, status: int,
    param: str | None,
) -> None:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        pd_app["base_url"] + path, content=content,
        headers={"content-type": "application/json"}, timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    assert error["type"]
    assert error["code"] == status
    if param is not None:
        assert param in (error["param"] or "") or param in error["message"]
    ok = client.completions.create(model=MODEL_NAME, prompt="still there?", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="word " * 3000, max_tokens=2)


def test_client_disconnect_mid_stream_leaves_nothing_behind(pd_app: dict[str, Any]) -> None:
    before = stats(pd_app, "decode")["num_generation_tokens"]
    body = {"model": MODEL_NAME, "prompt": PROMPTS[-1], "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", pd_app["base_url"] + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert all(line.startswith("data: ") or not line for line in received)
    reports = wait_until_released(pd_app)
    for role, report in reports.items():
        assert report == {"num_unfinished_requests": 0, "all_blocks_free": True}, role
    generated = stats(pd_app, "decode")["num_generation_tokens"] - before
    assert generated < 1500  # aborted, not run to the end


def test_no_request_or_block_left_after_the_suite(pd_app: dict[str, Any]) -> None:
    reports = wait_until_released(pd_app)
    for role, report in reports.items():
        assert report == {"num_unfinished_requests": 0, "all_blocks_free": True}, role


def test_bench_load_generator_against_the_app(pd_app: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "serve_app.bench", "run", "--base-url", pd_app["base_url"],
         "--model", MODEL_NAME, "--tokenizer", str(TINY_MODEL), "--input-len", "64",
         "--output-len", "20", "--concurrency", "2", "--num-requests", "6", "--no-progress",
         "--slo-ttft-ms", "10000", "--slo-tpot-ms", "10000", "--label", "pd", "--save", str(out)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    results = json.loads(out.read_text())
    records = results["records"]
    assert len(records) == 6
    for record in records:
        assert record["error"] is None
        assert record["prompt_tokens"] == 64
        assert record["output_tokens"] == 20
        assert 0 < record["ttft_s"] <= record["e2e_s"]
        # One gap per pair of content chunks; the decode engine streams every 8 tokens
        # (`stream_interval` in configs/local-cpu.yaml), so 20 tokens come in 2 to 19 chunks.
        assert 1 <= len(record["itl_s"]) <= 19
    summary = results["summary"]
    assert summary["slo_attainment"] == 1.0


def test_prefill_engine_death_falls_back_to_decode(
    pd_app: dict[str, Any], client: openai.OpenAI
) -> None:
    """Last in the module: it kills the prefill engine (Serve restarts the replica later)."""
    body = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0.0,
            "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    expected = client.completions.create(**body).choices[0].token_ids
    replica = psutil.Process(stats(pd_app, "prefill")["pid"])
    cores = [p for p in replica.children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
    assert cores
    for core in cores:
        core.kill()
    time.sleep(3)
    response = client.with_options(timeout=120).completions.create(**body)
    assert response.choices[0].token_ids == expected
