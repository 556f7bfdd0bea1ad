"""The HTTP layer's guards through the real app: API keys, input limits, OpenAI JSON for every
error, a fuzz of both endpoints; and a start with a NIXL port already taken.

One app start for the module, with API keys on (a key file) and small input limits.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cpu.conftest import MODEL_NAME, TEST_PORT_BASE, app_args

KEY = "sk-test-guarded-0123456789"
MAX_BODY_BYTES = 64 * 1024
MAX_PROMPTS = 4


@pytest.fixture(scope="module")
def guarded(tiny_model: Path, http_port: int, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, Any]]:
    from ray import serve

    from serve_app.app import build_app

    key_file = tmp_path_factory.mktemp("auth") / "api-keys"
    key_file.write_text(f"# test keys\n{KEY}\nsk-second-key\n")
    args = app_args(
        auth={"api_keys_file": str(key_file)},
        limits={"max_body_bytes": MAX_BODY_BYTES, "max_prompts": MAX_PROMPTS},
        prefill={"nixl_side_channel_port": TEST_PORT_BASE + 20},
        decode={"nixl_side_channel_port": TEST_PORT_BASE + 30},
    )
    serve.run(build_app(args), name="guarded", route_prefix="/")
    base_url = f"http://127.0.0.1:{http_port}"
    yield {
        "base_url": base_url,
        "http": httpx.Client(base_url=base_url, timeout=120, headers={"authorization": f"Bearer {KEY}"}),
        "prefill": serve.get_deployment_handle("PrefillServer", app_name="guarded"),
        "decode": serve.get_deployment_handle("DecodeServer", app_name="guarded"),
    }
    serve.delete("guarded")


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["type"] and error["code"] == status
    return error


def completion(**fields: Any) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, **fields}


# ---- API keys ----------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer sk-wrong"},
                                     {"authorization": KEY}, {"authorization": f"Basic {KEY}"}])
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/completions"),
                                              ("POST", "/v1/chat/completions"),
                                              ("GET", "/v1/models")])
def test_no_key_or_a_wrong_key_is_401_json(
    guarded: dict, headers: dict, method: str, path: str
) -> None:
    response = httpx.request(method, guarded["base_url"] + path, headers=headers,
                             json=completion(), timeout=60)
    error = assert_openai_error(response, 401)
    assert error["type"] == "AuthenticationError"
    assert response.headers["www-authenticate"] == "Bearer"


def test_the_right_key_is_served(guarded: dict) -> None:
    for key in (KEY, "sk-second-key"):
        client = openai.OpenAI(base_url=guarded["base_url"] + "/v1", api_key=key, max_retries=0)
        assert client.completions.create(**completion()).usage.completion_tokens == 2
        assert client.models.list().data[0].id == MODEL_NAME
    wrong = openai.OpenAI(base_url=guarded["base_url"] + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(**completion())


def test_health_is_open(guarded: dict) -> None:
    assert httpx.get(guarded["base_url"] + "/health", timeout=60).status_code == 200


# ---- errors and limits ---------------------------------------------------------------------

def test_unknown_paths_and_methods_are_json(guarded: dict) -> None:
    error = assert_openai_error(guarded["http"].post("/v1/embeddings", json={}), 404)
    assert "/v1/embeddings" in error["message"]
    response = guarded["http"].get("/v1/completions")
    assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"


def test_the_ten_thousand_digit_body_is_400(guarded: dict) -> None:
    for content in (b"9" * 10_000, b'{"model": "tiny-llama", "prompt": "x", "seed": ' + b"1" * 10_000 + b"}"):
        error = assert_openai_error(guarded["http"].post("/v1/completions", content=content), 400)
        assert "10000 digits" in error["message"]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_past_the_limit_is_413(guarded: dict, chunked: bool) -> None:
    body = json.dumps(completion(prompt="x" * MAX_BODY_BYTES)).encode()
    content = iter([body[i:i + 8192] for i in range(0, len(body), 8192)]) if chunked else body
    response = guarded["http"].post("/v1/completions", content=content,
                                    headers={"content-type": "application/json"})
    error = assert_openai_error(response, 413)
    assert f"at most {MAX_BODY_BYTES} bytes" in error["message"]


def test_too_many_prompts_is_400_naming_the_param(guarded: dict) -> None:
    body = completion(prompt=["a"] * (MAX_PROMPTS + 1))
    error = assert_openai_error(guarded["http"].post("/v1/completions", json=body), 400)
    assert error["param"] == "prompt" and f"at most {MAX_PROMPTS}" in error["message"]
    ok = guarded["http"].post("/v1/completions", json=completion(prompt=["a"] * MAX_PROMPTS))
    assert ok.status_code == 200 and len(ok.json()["choices"]) == MAX_PROMPTS


def test_a_list_of_prompts_gets_each_prompts_own_greedy_output(guarded: dict) -> None:
    """Found by the prompt-count test: prefill runs every prompt of the list, but hands one set
    of `kv_transfer_params` to decode, which reads prompt 0's blocks for every prompt (wrong
    text with HTTP 200) and leaves the other prompts' blocks on prefill until their lease ends.
    A list of prompts must not be disaggregated as one request (`protocol.can_disaggregate`)."""
    prompts = ["The quick brown fox jumps over", "Hello world, my name is Anna and I live in a"]
    body = completion(max_tokens=8, temperature=0.0)
    alone = [
        guarded["http"].post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"]
        for p in prompts
    ]
    together = guarded["http"].post("/v1/completions", json={**body, "prompt": prompts}).json()
    texts = [c["text"] for c in sorted(together["choices"], key=lambda c: c["index"])]
    assert texts == alone


# ---- fuzz --------------------------------------------------------------------------------------

# Numbers at the edges (0, negatives, past 32 and 64 bits, NaN, infinities) and small ones, but
# not the mid-range values that would make a valid request generate for seconds.
NUMBERS = (
    st.integers(-3, 8) | st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True) | st.integers()
)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=20)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
PROMPTS = (st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=6)
           | st.lists(st.integers(-5, 40_000), max_size=30) | VALUES)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | VALUES},
                          optional={"content": st.text(max_size=40) | VALUES, "name": VALUES}),
    max_size=4,
) | VALUES
FIELDS = {
    "model": st.just(MODEL_NAME) | VALUES,
    "max_tokens": NUMBERS | VALUES, "max_completion_tokens": NUMBERS, "n": NUMBERS,
    "temperature": NUMBERS, "top_p": NUMBERS, "top_k": NUMBERS, "min_tokens": NUMBERS,
    "presence_penalty": NUMBERS, "frequency_penalty": NUMBERS, "seed": NUMBERS,
    "logprobs": NUMBERS | st.booleans(), "top_logprobs": NUMBERS, "echo": VALUES,
    "stream": st.booleans() | VALUES, "stream_options": VALUES, "stop": VALUES,
    "logit_bias": VALUES, "response_format": VALUES, "ignore_eos": VALUES,
    "tools": VALUES, "tool_choice": VALUES, "suffix": VALUES, "user": VALUES,
    "best_of": NUMBERS, "use_beam_search": VALUES, "prompt_logprobs": NUMBERS,
}
BODIES = st.builds(
    lambda required, optional, extra: {**required, **optional, **extra},
    st.fixed_dictionaries({"prompt": PROMPTS, "messages": MESSAGES}),
    st.fixed_dictionaries({}, optional=FIELDS),
    st.dictionaries(st.text(max_size=10), VALUES, max_size=2),
)
RAW = (
    BODIES.map(lambda b: json.dumps(b).encode())
    | VALUES.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=64)
    | st.sampled_from([b"9" * 10_000, b"[" * 5000, b'{"prompt": "\\ud800"}', b"{}", b"null"])
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), content=RAW)
def test_fuzzed_bodies_get_no_5xx_and_every_4xx_is_openai_json(
    guarded: dict, endpoint: str, content: bytes
) -> None:
    response = guarded["http"].post(endpoint, content=content,
                                    headers={"content-type": "application/json"})
    assert response.status_code < 500, (content[:300], response.text[:500])
    if response.status_code >= 400:
        assert_openai_error(response, response.status_code)


def test_the_app_serves_after_the_fuzz_and_holds_nothing(guarded: dict) -> None:
    response = guarded["http"].post("/v1/completions", json=completion())
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    deadline = time.monotonic() + 60
    while True:
        reports = [guarded[r].leak_report.remote().result() for r in ("prefill", "decode")]
        if all(r == {"num_unfinished_requests": 0, "all_blocks_free": True} for r in reports):
            break
        assert time.monotonic() < deadline, reports
        time.sleep(0.5)


# ---- a start that cannot succeed ---------------------------------------------------------

def test_a_taken_nixl_port_fails_the_start_naming_it(ray_cluster: None, http_port: int) -> None:
    """The prefill replica refuses before its engine starts (so no engine start here); Serve
    reports the deployment failed with the port and the config field in `serve status`."""
    from ray import serve

    from serve_app.app import build_app

    port = TEST_PORT_BASE + 60
    args = app_args(
        prefill={"nixl_side_channel_port": port, "num_gpus": 0},
        decode={"nixl_side_channel_port": TEST_PORT_BASE + 70, "num_gpus": 0},
    )
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        started = time.monotonic()
        try:
            with pytest.raises(RuntimeError, match="PrefillServer"):
                serve.run(build_app(args), name="clash", route_prefix="/clash")
            elapsed = time.monotonic() - started
            status = serve.status().applications["clash"]
            message = status.deployments["PrefillServer"].message
        finally:
            serve.delete("clash")
    assert status.status == "DEPLOY_FAILED"
    assert f"NIXL side-channel port {port}" in message and "prefill.nixl_side_channel_port" in message
    print(f"failed in {elapsed:.0f} s")
    assert elapsed < 120
