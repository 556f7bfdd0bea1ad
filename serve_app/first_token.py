"""The first token from prefill: a streamed completion gets prefill's token at once.

Prefill samples the first token anyway (it runs the prompt with `max_tokens=1`); in the plain
handoff that token is thrown away and decode samples it again after reading the blocks, so the
client's first token waits for prefill, the hop to decode, the NIXL read and one more forward.
Here the router streams prefill's token to the client as soon as prefill returns, and decode
continues from `prompt + [first token]`: it reads the prompt's blocks, computes the first token's
KV (the forward that yields the second token), and streams the rest. With greedy sampling the
tokens are exactly those of the plain handoff (and of one engine alone); the client sees the same
stream, chunk ids, usage and finish reason.

Only requests whose rest does not depend on the first token having been generated (rather than
prompted) continue this way: see `can_continue`. Everything else takes the plain handoff.
"""

from __future__ import annotations

import json
import time
from typing import Any

from serve_app.protocol import PrefillResult, copy_request

# Sampling features whose state covers the generated tokens (penalties over the output, stop
# strings over the output text, grammars, per-request processors, logprobs of each output token,
# seeded sampling streams): with the first token moved into the prompt they would restart at the
# second token, so such requests take the plain handoff.
_OUTPUT_STATEFUL = (
    "logprobs",
    "prompt_logprobs",
    "logprob_token_ids",
    "bad_words",
    "response_format",
    "structured_outputs",
    "watermarking",
    "repetition_detection",
    "thinking_token_budget",
    "vllm_xargs",
    "suffix",
    "prompt_embeds",
)


def can_continue(request: Any) -> bool:
    """Whether `request` (a vLLM `CompletionRequest`) may get its first token from prefill."""
    if not request.stream or request.echo or request.use_beam_search or (request.n or 1) != 1:
        return False
    if not _is_single_prompt(request.prompt):
        return False
    if request.max_tokens is not None and request.max_tokens < 2:
        return False  # the whole answer is prefill's token: nothing to continue
    if request.stop or request.frequency_penalty or request.presence_penalty:
        return False
    if request.seed is not None and request.temperature != 0:
        return False
    if request.return_token_offsets:
        return False
    return not any(getattr(request, name, None) for name in _OUTPUT_STATEFUL)


def _is_single_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    if isinstance(prompt, list) and prompt:
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return _is_single_prompt(prompt[0])
        return all(isinstance(token, int) for token in prompt)
    return False


def continues(result: PrefillResult) -> bool:
    """Whether prefill's answer leaves something for decode to continue: the first token did
    not end the request (end of sequence, stop token), it is whole text on its own, and the
    context has room for one more.

    A token that is part of a character (byte-level BPE splits emoji, CJK, ...) has no text of
    its own yet, and vLLM's detokenizer, given a prompt that ends inside a character, emits the
    whole prompt with decode's first token: such requests take the plain handoff."""
    return (
        result.finish_reason == "length"
        and bool(result.first_text)
        and "\ufffd" not in result.first_text
        and result.first_token_id is not None
        and result.prompt_token_ids is not None
        and len(result.prompt_token_ids) + 2 <= result.max_model_len
    )


def continuation_request(request: Any, request_id: str, result: PrefillResult) -> Any:
    """Decode's copy: the prompt's token ids plus the first token, one token fewer to make."""
    assert result.prompt_token_ids is not None and result.first_token_id is not None
    updates: dict[str, Any] = {
        "request_id": request_id,
        "prompt": [*result.prompt_token_ids, result.first_token_id],
        # Prefill already applied these to the prompt; the token ids are final.
        "truncate_prompt_tokens": None,
        "add_special_tokens": False,
        "min_tokens": max(0, (request.min_tokens or 0) - 1),
        "kv_transfer_params": result.kv_transfer_params.model_dump(),
    }
    if request.max_tokens is not None:
        updates["max_tokens"] = request.max_tokens - 1
    return copy_request(request, **updates)


def first_chunk(request: Any, request_id: str, result: PrefillResult) -> str:
    """The SSE event carrying prefill's token, shaped as vLLM's own first chunk."""
    from vllm.entrypoints.openai.completion.protocol import (
        CompletionResponseStreamChoice,
        CompletionStreamResponse,
    )

    from serve_app.engine import vllm_name

    UsageInfo = vllm_name("UsageInfo")  # noqa: N806 - vLLM's class

    choice = CompletionResponseStreamChoice(
        index=0,
        text=result.first_text,
        logprobs=None,
        finish_reason=None,
        stop_reason=None,
        prompt_token_ids=result.prompt_token_ids if request.return_token_ids else None,
        token_ids=[result.first_token_id] if request.return_token_ids else None,
    )
    chunk = CompletionStreamResponse(
        id=f"cmpl-{request_id}",
        object="text_completion",
        created=int(time.time()),
        model=request.model,
        choices=[choice],
    )
    options = request.stream_options
    if options is not None and options.include_usage and options.continuous_usage_stats:
        chunk.usage = UsageInfo(
            prompt_tokens=result.num_prompt_tokens,
            completion_tokens=1,
            total_tokens=result.num_prompt_tokens + 1,
        )
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


class ContinuationEvents:
    """Turns decode's SSE events into the events of the whole request.

    Decode counts the first token as prompt: every usage it reports moves one token from
    prompt to completion, and its first chunk's `prompt_token_ids` (with `return_token_ids`),
    which end with the first token, become null as in vLLM's later chunks (the first chunk
    already carried the prompt's).
    Events without either pass through as text, unparsed.
    """

    def __init__(self) -> None:
        self._seen_prompt_ids = False

    def __call__(self, text: str) -> str:
        if '"usage"' not in text and ('"prompt_token_ids"' not in text or self._seen_prompt_ids):
            return text
        return "".join(self._event(event) for event in text.split("\n\n") if event)

    def _event(self, event: str) -> str:
        data = event.removeprefix("data: ")
        if data.strip() == "[DONE]" or ("usage" not in data and "prompt_token_ids" not in data):
            return event + "\n\n"
        chunk = json.loads(data)
        _shift_usage(chunk, 1)
        for choice in chunk.get("choices") or ():
            if choice.get("prompt_token_ids") is not None:
                choice["prompt_token_ids"] = None
                self._seen_prompt_ids = True
        return _sse(chunk)


def move_usage(text: str, num_tokens: int) -> str:
    """`text`'s SSE events with every usage moving `num_tokens` from prompt to completion
    (tokens an engine was given as prompt that the client's request generated)."""
    return "".join(_moved(event, num_tokens) for event in text.split("\n\n") if event)


def _moved(event: str, num_tokens: int) -> str:
    data = event.removeprefix("data: ")
    if '"usage"' not in data or data.strip() == "[DONE]":
        return event + "\n\n"
    chunk = json.loads(data)
    _shift_usage(chunk, num_tokens)
    return _sse(chunk)


def _shift_usage(chunk: dict[str, Any], num_tokens: int) -> None:
    usage = chunk.get("usage")
    if usage:
        usage["prompt_tokens"] -= num_tokens
        usage["completion_tokens"] += num_tokens


def _sse(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"

