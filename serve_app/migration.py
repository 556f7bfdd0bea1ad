"""Stream migration: a completion stream whose engine dies midway continues on the other engine.

As Dynamo's request migration: the router keeps the token ids it has streamed so far (decode is
asked for them with `return_token_ids`, and they are cut out of the events again unless the
client asked for them too); when the stream breaks, the surviving engine runs the prompt plus
those tokens with what is left of `max_tokens`, and its events join the client's stream as if
nothing happened: the same chunk id, usage counted over the whole request, no token twice or
missing. With greedy sampling the tokens are those of an undisturbed run.

Only requests whose rest depends on nothing but the tokens so far migrate (the conditions of
`first_token.can_continue`: no stop strings, penalties, seeded sampling, logprobs, ...); others,
and chat (whose deltas would need its template's ids), end with an OpenAI error event as before.
"""

from __future__ import annotations

import re
from typing import Any

from serve_app import first_token
from serve_app.protocol import copy_request

_TOKEN_IDS = re.compile(r',"token_ids":\[([0-9,]*)\]')
_PROMPT_IDS = re.compile(r',"prompt_token_ids":(\[[0-9,]*\]|null)')


def can_migrate(endpoint: str, request: Any) -> bool:
    """Streamed single-prompt completions whose prompt the router holds as token ids."""
    if endpoint != "completions" or not first_token.can_continue(request):
        return False
    prompt = request.prompt
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def tracked_request(request: Any) -> Any:
    """The engine's copy: it reports the ids of the tokens it streams."""
    return copy_request(request, return_token_ids=True)


class TokenTracker:
    """Reads the generated ids out of each event (and out of the client's stream, unless the
    client asked for them)."""

    def __init__(self, request: Any, num_client_prompt: int) -> None:
        self.prompt_ids: list[int] = list(request.prompt)
        self.num_client_prompt = num_client_prompt
        """Prompt tokens of the client's own request (the engine's prompt may hold more)."""
        self.generated: list[int] = []
        self.is_shown = bool(getattr(request, "return_token_ids", False))

    def __call__(self, text: str) -> str:
        for ids in _TOKEN_IDS.findall(text):
            if ids:
                self.generated.extend(int(t) for t in ids.split(","))
        if self.is_shown:
            return text
        return _PROMPT_IDS.sub("", _TOKEN_IDS.sub("", text))


def continuation(request: Any, request_id: str, tracker: TokenTracker) -> Any | None:
    """The request that makes the rest of the answer on another engine; None if nothing is
    left to make."""
    num_done = len(tracker.generated)
    updates: dict[str, Any] = {
        "request_id": request_id,
        "prompt": [*tracker.prompt_ids, *tracker.generated],
        "truncate_prompt_tokens": None,
        "add_special_tokens": False,
        "min_tokens": max(0, (request.min_tokens or 0) - num_done),
        "kv_transfer_params": None,
        "return_token_ids": True,
    }
    if request.max_tokens is not None:
        if request.max_tokens - num_done < 1:
            return None
        updates["max_tokens"] = request.max_tokens - num_done
    return copy_request(request, **updates)


class MigratedEvents:
    """The continuation's events as the original stream's: its chunk id, usage over the whole
    request, its first chunk's prompt ids (prompt + tokens so far) dropped."""

    def __init__(self, original_id: str, new_id: str, num_moved: int) -> None:
        self.original_id = original_id
        self.new_id = new_id
        self.num_moved = num_moved

    def __call__(self, text: str) -> str:
        text = text.replace(self.new_id, self.original_id)
        text = _PROMPT_IDS.sub("", text)
        if '"usage"' not in text:
            return text
        return first_token.move_usage(text, self.num_moved)
