"""Input limits: what one HTTP request may carry before any engine sees it.

Three checks, in the order the Router's HTTP layer runs them:

1. `read_body`: the body's size, by its Content-Length and by the bytes actually received
   (a chunked body has no Content-Length): 413 past `limits.max_body_bytes`.
2. `parse_body`: JSON that Python's parser refuses or takes in a form the engines must not see
   is a 400: malformed JSON, bad encodings, `NaN`/`Infinity`, integers past 64 bits (a
   10,000-digit number trips Python's int-string limit), floats that overflow to infinity, and
   nesting past `limits.max_json_depth` (the parser and pickle recurse).
3. `check_prompts`: the number of prompts in one completions request and the size of each, the
   number of chat messages and the text of each: 400 naming the parameter.

Every refusal is a `Rejection`: the Router answers it as OpenAI error JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any

from serve_app.config import LimitsConfig
from serve_app.policy.errors import Rejection

# Only bodies with 19 digits in a row (as long as int64's largest) or a 3-digit exponent take
# the slower parse with number hooks; every other body is parsed at full speed.
_MAYBE_HUGE_NUMBER = re.compile(rb"[0-9]{19}|[eE][+-]?[0-9]{3}")
_INT64_LIMIT = 2**63


async def read_body(
    content_length: str | None, chunks: AsyncIterator[bytes], max_bytes: int
) -> bytes:
    """The whole body, refused (413) as soon as it is known to be larger than `max_bytes`."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise Rejection(400, f"Content-Length {content_length[:40]!r} is not a number") from None
        if declared > max_bytes:
            raise _too_large(f"{declared} bytes", max_bytes)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(f"more than {max_bytes} bytes", max_bytes)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(size: str, max_bytes: int) -> Rejection:
    return Rejection(
        413, f"The request body is {size}; at most {max_bytes} bytes are accepted.",
        "RequestTooLargeError",
    )


def parse_body(raw: bytes, limits: LimitsConfig) -> Any:
    """The body as JSON, or a 400 `Rejection` saying what the parser refused."""
    hooks: dict[str, Any] = {"parse_constant": _refuse_constant}
    if _MAYBE_HUGE_NUMBER.search(raw):
        hooks.update(parse_int=_int64, parse_float=_finite_float)
    try:
        body = json.loads(raw, **hooks)
    except Rejection:
        raise
    except RecursionError:
        raise _too_deep(limits.max_json_depth) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise Rejection(400, f"Malformed JSON body: {exc}") from None
    # A body with fewer brackets than the limit cannot nest deeper: no walk for most bodies.
    if raw.count(b"[") + raw.count(b"{") > limits.max_json_depth and _nests_deeper(
        body, limits.max_json_depth
    ):
        raise _too_deep(limits.max_json_depth)
    return body


def _refuse_constant(name: str) -> Any:
    raise Rejection(400, f"Malformed JSON body: {name} is not a JSON number")


def _int64(text: str) -> int:
    num_digits = len(text.lstrip("-"))
    if num_digits > 19:
        raise Rejection(400, f"Malformed JSON body: an integer of {num_digits} digits is out of range (64 bits)")
    value = int(text)
    if not -_INT64_LIMIT <= value < _INT64_LIMIT:
        raise Rejection(400, f"Malformed JSON body: the integer {text} is out of range (64 bits)")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejection(400, f"Malformed JSON body: the number {text[:40]} overflows a float")
    return value


def _too_deep(max_depth: int) -> Rejection:
    return Rejection(400, f"The JSON body nests arrays and objects deeper than {max_depth} levels.")


def _nests_deeper(value: Any, max_depth: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def check_prompts(endpoint: str, body: Any, limits: LimitsConfig) -> None:
    """Refuse (400, naming the parameter) too many prompts or messages, or one too large.

    Values of the wrong type pass: the request model reports those with its own message.
    """
    if not isinstance(body, dict):
        return
    if endpoint == "completions":
        _check_completion_prompts(body.get("prompt"), limits)
    else:
        _check_messages(body.get("messages"), limits)


def _check_completion_prompts(prompt: Any, limits: LimitsConfig) -> None:
    # One prompt (text, or token ids), or a list of them.
    is_single = isinstance(prompt, str) or (
        isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)
    )
    if is_single:
        _check_size("prompt", prompt, limits.max_prompt_length)
        return
    if not isinstance(prompt, list):
        return
    if len(prompt) > limits.max_prompts:
        raise Rejection(
            400, f"prompt: {len(prompt)} prompts in one request; at most {limits.max_prompts}.",
            param="prompt",
        )
    for index, item in enumerate(prompt):
        _check_size(f"prompt[{index}]", item, limits.max_prompt_length)


def _check_messages(messages: Any, limits: LimitsConfig) -> None:
    if not isinstance(messages, list):
        return
    if len(messages) > limits.max_messages:
        raise Rejection(
            400, f"messages: {len(messages)} messages in one request; at most "
            f"{limits.max_messages}.", param="messages",
        )
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts: the text parts together
            content = sum(
                len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        _check_size(f"messages[{index}].content", content, limits.max_prompt_length)


def _check_size(name: str, value: Any, max_length: int) -> None:
    """`value`: a text, a list of token ids, or an already counted number of characters."""
    if isinstance(value, int):
        size, unit = value, "characters"
    elif isinstance(value, (str, list)):
        size, unit = len(value), "characters" if isinstance(value, str) else "token ids"
    else:
        return
    if size > max_length:
        raise Rejection(
            400, f"{name}: {size} {unit}; at most {max_length} per prompt.",
            param=name.split("[")[0],
        )
