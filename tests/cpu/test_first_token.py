"""The first token from prefill, piece by piece: which requests continue after prefill's token,
the decode copy, the events decode sends back, and the plugin's clamp of the remote load.

End to end (real engines, the block boundary included): tests/cpu/test_disaggregated.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve_app import first_token, vllm_plugin
from serve_app.protocol import KVTransferParams, PrefillResult

MODEL = "tiny-llama"


def completion(**fields: Any) -> Any:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest.model_validate(
        {"model": MODEL, "prompt": "hello", "stream": True, "max_tokens": 8, **fields}
    )


def prefill_result(**fields: Any) -> PrefillResult:
    values: dict[str, Any] = {
        "request_id": "r",
        "kv_transfer_params": KVTransferParams(
            do_remote_prefill=True, remote_block_ids=[[1, 2]], remote_num_tokens=40
        ),
        "num_prompt_tokens": 40,
        "first_token_id": 7,
        "first_text": " the",
        "finish_reason": "length",
        "prompt_token_ids": list(range(40)),
        "max_model_len": 2048,
    }
    return PrefillResult(**{**values, **fields})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, True),
        ({"prompt": [1, 2, 3]}, True),
        ({"prompt": ["one prompt"]}, True),
        ({"max_tokens": None}, True),
        ({"temperature": 0.0, "seed": 3}, True),
        ({"stream": False}, False),
        ({"prompt": ["two", "prompts"]}, False),
        ({"max_tokens": 1}, False),
        ({"echo": True}, False),
        ({"n": 2}, False),
        ({"logprobs": 2}, False),
        ({"stop": ["."]}, False),
        ({"presence_penalty": 0.5}, False),
        ({"frequency_penalty": 0.5}, False),
        ({"seed": 3}, False),
        ({"structured_outputs": {"regex": "a+"}}, False),
        ({"suffix": "!"}, False),
    ],
)
def test_which_requests_continue_after_prefills_token(fields: dict, expected: bool) -> None:
    assert first_token.can_continue(completion(**fields)) is expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, True),
        ({"finish_reason": "stop"}, False),  # end of sequence or a stop token: nothing to add
        ({"first_text": ""}, False),  # part of a character, or a special token
        ({"first_text": "\ufffd"}, False),
        ({"max_model_len": 41}, False),  # no room for one more token after it
        ({"first_token_id": None}, False),
    ],
)
def test_which_prefill_answers_leave_decode_something(fields: dict, expected: bool) -> None:
    assert first_token.continues(prefill_result(**fields)) is expected


def test_decode_copy_continues_after_the_first_token() -> None:
    request = completion(max_tokens=8, min_tokens=3, truncate_prompt_tokens=20)
    result = prefill_result()
    copy = first_token.continuation_request(request, "abc", result)
    assert copy.prompt == [*range(40), 7]
    assert (copy.max_tokens, copy.min_tokens) == (7, 2)
    assert copy.truncate_prompt_tokens is None  # prefill applied it already
    assert copy.request_id == "abc"
    assert copy.kv_transfer_params == result.kv_transfer_params.model_dump()
    assert request.max_tokens == 8 and request.prompt == "hello"  # the original is untouched


def test_first_chunk_is_shaped_as_vllms() -> None:
    request = completion(
        return_token_ids=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    event = first_token.first_chunk(request, "abc", prefill_result())
    assert event.startswith("data: ") and event.endswith("\n\n")
    chunk = json.loads(event.removeprefix("data: "))
    assert chunk["id"] == "cmpl-abc"
    assert chunk["object"] == "text_completion"
    assert chunk["model"] == MODEL and isinstance(chunk["created"], int)
    assert chunk["choices"][0]["text"] == " the"
    assert chunk["choices"][0]["token_ids"] == [7]
    assert chunk["choices"][0]["prompt_token_ids"] == list(range(40))
    assert chunk["usage"] == {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41}
    plain = json.loads(first_token.first_chunk(completion(), "abc", prefill_result())[6:])
    # As vLLM's own chunks: token ids null unless asked for, no usage unless continuous.
    assert "usage" not in plain and plain["choices"][0]["token_ids"] is None


def test_decode_events_count_the_first_token_as_completion() -> None:
    rewrite = first_token.ContinuationEvents()
    first = {"id": "cmpl-abc", "choices": [{"text": " a", "prompt_token_ids": [1, 2, 7]}]}
    usage = {"prompt_tokens": 41, "completion_tokens": 2, "total_tokens": 43}
    text = rewrite(
        f"data: {json.dumps(first)}\n\ndata: {json.dumps({'choices': [], 'usage': usage})}\n\n"
    )
    events = [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n") if e]
    assert events[0]["choices"][0]["prompt_token_ids"] is None
    assert events[1]["usage"] == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}
    untouched = 'data: {"choices":[{"text":" b"}]}\n\ndata: [DONE]\n\n'
    assert rewrite(untouched) is untouched


class _PullScheduler:
    """Stands in for vLLM's scheduler-side connector: asks to load the whole prompt."""

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        return len(request.prompt_token_ids) - num_computed_tokens, True


class _Request:
    def __init__(self, num_prompt_tokens: int, params: dict[str, Any]) -> None:
        self.prompt_token_ids = list(range(num_prompt_tokens))
        self.kv_transfer_params = params


def test_decode_loads_no_more_than_prefill_computed() -> None:
    vllm_plugin.clamp_remote_load(_PullScheduler)
    vllm_plugin.clamp_remote_load(_PullScheduler)  # a second call must not wrap twice
    scheduler = _PullScheduler()
    handoff = {"do_remote_prefill": True, "remote_num_tokens": 64}
    # The continuation: prompt + first token, one token more than prefill computed.
    assert scheduler.get_num_new_matched_tokens(_Request(65, handoff), 0) == (64, True)
    # The plain handoff: the same count as without the clamp.
    assert scheduler.get_num_new_matched_tokens(_Request(64, handoff), 0) == (64, True)
    # Not a handoff, or no count from prefill: untouched.
    assert scheduler.get_num_new_matched_tokens(_Request(65, {}), 0) == (65, True)
    unknown = {"do_remote_prefill": True}
    assert scheduler.get_num_new_matched_tokens(_Request(65, unknown), 0) == (65, True)


def test_the_clamp_targets_this_vllms_pull_scheduler() -> None:
    cls = vllm_plugin.pull_scheduler_class()
    assert cls is not None and cls.__name__ == "NixlPullConnectorScheduler"
