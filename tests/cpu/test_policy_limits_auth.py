"""Input limits, API keys and the OpenAI error JSON of the HTTP layer, without Ray.

The same checks run in the Router's HTTP layer; `test_guarded_app.py` drives them through the
real app.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from serve_app.config import AppConfig, AuthConfig, LimitsConfig
from serve_app.policy import limits
from serve_app.policy.auth import ApiKeys
from serve_app.policy.errors import Rejection
from serve_app.policy.http_errors import install_openai_errors

LIMITS = LimitsConfig()


def rejected(call, *args) -> Rejection:
    with pytest.raises(Rejection) as info:
        call(*args)
    return info.value


# ---- body size ------------------------------------------------------------------------------


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_body_within_the_limit_is_read_whole() -> None:
    assert await limits.read_body("6", chunks(b"abc", b"def"), 6) == b"abcdef"
    assert await limits.read_body(None, chunks(b"abc", b"def"), 6) == b"abcdef"


@pytest.mark.parametrize("content_length", ["7", None])
async def test_body_past_the_limit_is_413_by_header_or_by_bytes(content_length: str | None) -> None:
    with pytest.raises(Rejection) as info:
        # A lying Content-Length ("6") with more bytes is caught by counting too.
        await limits.read_body(content_length, chunks(b"abcd", b"efg"), 6)
    assert info.value.status == 413
    assert "at most 6 bytes" in info.value.message
    with pytest.raises(Rejection) as info:
        await limits.read_body("6", chunks(b"abcd", b"efg"), 6)
    assert info.value.status == 413


async def test_content_length_that_is_not_a_number_is_400() -> None:
    with pytest.raises(Rejection) as info:
        await limits.read_body("ten", chunks(b""), 6)
    assert info.value.status == 400


# ---- JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"9" * 10_000, "10000 digits"),
        (b'{"seed": ' + b"1" * 5000 + b"}", "5000 digits"),
        (b'{"seed": 9223372036854775808}', "out of range"),
        (b'{"seed": -9223372036854775809}', "out of range"),
        (b'{"temperature": NaN}', "NaN"),
        (b'{"temperature": Infinity}', "Infinity"),
        (b'{"temperature": -Infinity}', "-Infinity"),
        (b'{"temperature": 1e400}', "overflows"),
        (b'{"temperature": ' + b"9" * 400 + b".5}", "overflows"),
        (b"[" * 100_000 + b"]" * 100_000, "deeper than"),
        (b'{"a": ' * 65 + b"1" + b"}" * 65, "deeper than 64"),
        (b"{", "Malformed"),
        (b"\xff\xfe\x00", "Malformed"),
        (b"", "Malformed"),
    ],
)
def test_json_the_parser_refuses_is_400(raw: bytes, words: str) -> None:
    error = rejected(limits.parse_body, raw, LIMITS)
    assert error.status == 400
    assert words in error.message
    assert error.body["error"]["code"] == 400


def test_json_within_the_limits_parses_as_usual() -> None:
    body = {
        "seed": 9223372036854775807, "min": -9223372036854775808, "t": 1e300, "small": 1e-400,
        "ids": list(range(1000)), "nested": {"a": [[{"b": [1]}]]}, "text": "1" * 50,
    }
    assert limits.parse_body(json.dumps(body).encode(), LIMITS) == json.loads(json.dumps(body))
    depth_64 = b'{"a": ' * 63 + b"[1]" + b"}" * 63
    assert limits.parse_body(depth_64, LIMITS)


def test_parsing_a_large_token_id_body_stays_fast() -> None:
    raw = json.dumps({"prompt": list(range(1_000_000))}).encode()
    started = time.perf_counter()
    limits.parse_body(raw, LIMITS)
    plain = time.perf_counter()
    json.loads(raw)
    assert time.perf_counter() - plain < 2 * (plain - started) + 0.05  # no slow path taken


# ---- prompts ---------------------------------------------------------------------------------

SMALL = LimitsConfig(max_prompts=3, max_prompt_length=10, max_messages=2)


@pytest.mark.parametrize(
    ("endpoint", "body", "param", "words"),
    [
        ("completions", {"prompt": "x" * 11}, "prompt", "prompt: 11 characters"),
        ("completions", {"prompt": list(range(11))}, "prompt", "prompt: 11 token ids"),
        ("completions", {"prompt": ["a", "b", "c", "d"]}, "prompt", "4 prompts"),
        ("completions", {"prompt": ["a", "x" * 11]}, "prompt", "prompt[1]: 11 characters"),
        ("completions", {"prompt": [[1], list(range(11))]}, "prompt", "prompt[1]: 11 token ids"),
        ("chat", {"messages": [{"role": "user", "content": "a"}] * 3}, "messages", "3 messages"),
        ("chat", {"messages": [{"role": "user", "content": "x" * 11}]}, "messages",
         "messages[0].content: 11 characters"),
        ("chat", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "x" * 6}, {"type": "text", "text": "y" * 6}]}]},
         "messages", "12 characters"),
    ],
)
def test_too_many_or_too_large_prompts_are_400_naming_the_param(
    endpoint: str, body: dict, param: str, words: str
) -> None:
    error = rejected(limits.check_prompts, endpoint, body, SMALL)
    assert (error.status, error.param) == (400, param)
    assert words in error.message


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("completions", {"prompt": "x" * 10}),
        ("completions", {"prompt": ["a", "b", "x" * 10]}),
        ("completions", {"prompt": [list(range(10))] * 3}),
        ("completions", {"prompt": 5}),  # the wrong type is the request model's to report
        ("completions", {}),
        ("chat", {"messages": [{"role": "user", "content": "x" * 10}, {"role": "user"}]}),
        ("chat", {"messages": "hello"}),
        ("chat", [1, 2]),
    ],
)
def test_prompts_within_the_limits_pass(endpoint: str, body: dict) -> None:
    limits.check_prompts(endpoint, body, SMALL)


def test_limits_are_validated_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="limits.max_body_bytes"):
        AppConfig.model_validate({"limits": {"max_body_bytes": 10}})
    assert AppConfig().limits.max_body_bytes == 8 * 1024 * 1024


# ---- API keys --------------------------------------------------------------------------------


def test_keys_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# operators\nkey-one\n\n  key-two  \n")
    keys = ApiKeys.load(
        AuthConfig(api_keys_file=str(path), api_keys_env="PD_KEYS"), {"PD_KEYS": "env-a, env-b"}
    )
    assert keys.is_enabled
    for key in ("key-one", "key-two", "env-a", "env-b"):
        keys.check(f"Bearer {key}")
        keys.check(f"bearer  {key} ")
    for header, words in [
        (None, "Missing"), ("", "Missing"), ("Bearer", "Missing"), ("Basic key-one", "Missing"),
        ("Bearer key-on", "Invalid"), ("Bearer key-one2", "Invalid"), ("Bearer # operators", "Invalid"),
    ]:
        error = rejected(keys.check, header)
        assert (error.status, error.err_type) == (401, "AuthenticationError"), header
        assert words in error.message
        assert error.headers == {"WWW-Authenticate": "Bearer"}


def test_auth_is_off_without_a_source() -> None:
    keys = ApiKeys.load(AuthConfig())
    assert not keys.is_enabled
    keys.check(None)
    assert not AppConfig().auth.is_enabled


@pytest.mark.parametrize(
    ("cfg", "environ", "words"),
    [
        (AuthConfig(api_keys_env="PD_KEYS"), {}, "auth.api_keys_env: the environment variable PD_KEYS"),
        (AuthConfig(api_keys_env="PD_KEYS"), {"PD_KEYS": " , "}, "auth.api_keys_env"),
        (AuthConfig(api_keys_file="/nonexistent/keys"), {}, "auth.api_keys_file: cannot read"),
    ],
)
def test_auth_on_without_a_key_fails_naming_the_field(
    cfg: AuthConfig, environ: dict, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        ApiKeys.load(cfg, environ)


def test_key_file_without_a_key_fails(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.load(AuthConfig(api_keys_file=str(path)))


def test_the_yaml_cannot_hold_a_key() -> None:
    with pytest.raises(ValidationError, match="api_keys"):
        AppConfig.model_validate({"auth": {"api_keys": ["secret"]}})
    with pytest.raises(ValidationError, match="auth.api_keys_env"):
        AppConfig.model_validate({"auth": {"api_keys_env": "not a name"}})


# ---- errors as OpenAI JSON -------------------------------------------------------------------


def app_with_errors() -> FastAPI:
    app = FastAPI()
    install_openai_errors(app)

    @app.post("/reject")
    async def reject() -> None:
        raise Rejection(429, "slow down", "RateLimitError", headers={"Retry-After": "1"})

    @app.post("/crash")
    async def crash() -> None:
        raise RuntimeError("boom")

    @app.post("/gone")
    async def gone() -> None:
        from ray.exceptions import TaskCancelledError

        raise TaskCancelledError()  # what Ray Serve raises in the app once the client left

    @app.get("/typed/{number}")
    async def typed(number: int) -> dict:
        return {"number": number}

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            yield "data: 1\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.mark.parametrize(
    ("method", "path", "status", "err_type"),
    [
        ("POST", "/reject", 429, "RateLimitError"),
        ("POST", "/crash", 500, "InternalServerError"),
        ("GET", "/nowhere", 404, "NotFoundError"),
        ("GET", "/reject", 405, "MethodNotAllowedError"),
        ("GET", "/typed/abc", 400, "BadRequestError"),
    ],
)
async def test_every_error_is_openai_json(method: str, path: str, status: int, err_type: str) -> None:
    transport = httpx.ASGITransport(app=app_with_errors())
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        response = await client.request(method, path)
        assert response.status_code == status
        error = response.json()["error"]
        assert (error["type"], error["code"]) == (err_type, status)
        assert error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        if status == 429:
            assert response.headers["retry-after"] == "1"
        if status == 405:
            assert response.headers["allow"] == "POST"
        ok = await client.get("/stream")
        assert ok.text == "data: 1\n\n"


async def test_a_client_gone_is_not_logged_as_an_unexpected_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ray.exceptions import TaskCancelledError

    transport = httpx.ASGITransport(app=app_with_errors())
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        with pytest.raises(TaskCancelledError):
            await client.post("/gone")
        assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
        await client.post("/crash")
        assert [r for r in caplog.records if "unexpected error" in r.getMessage()]
