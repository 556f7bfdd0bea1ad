"""Typed messages between the deployments, and the two request rewrites of the handoff.

The OpenAI request and response models are vLLM's own (`CompletionRequest`,
`ChatCompletionRequest`, `ErrorResponse`, ...); this module only adds what crosses the
prefill -> decode boundary. Requests are never edited in place: each phase gets a copy.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Endpoint = Literal["completions", "chat"]


class KVTransferParams(BaseModel):
    """What prefill's NixlConnector returns and decode's reads, forwarded verbatim.

    The named fields are the ones the router relies on; vLLM may add others (`tp_size`,
    `transfer_mode`, ...), which ride along untouched.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    do_remote_prefill: bool = False
    do_remote_decode: bool = False
    remote_engine_id: str | None = None
    remote_request_id: str | None = None
    remote_block_ids: list[Any] | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_num_tokens: int | None = None

    @classmethod
    def for_prefill(cls) -> KVTransferParams:
        """Ask the prefill engine to keep the prompt's blocks for a remote decode."""
        return cls(do_remote_decode=True)


class PrefillResult(BaseModel):
    """Prefill's answer to the router: where the prompt's KV blocks wait for decode."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    kv_transfer_params: KVTransferParams
    num_prompt_tokens: int
    # Prefill's own token and what decode needs to continue after it (`first_token.py`).
    first_token_id: int | None = None
    first_text: str = ""
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    max_model_len: int = 0


class RequestError(Exception):
    """An OpenAI error for a caller of the Python handle API (HTTP callers get the JSON)."""

    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        # Both in args: Ray re-creates the exception in the caller from them.
        super().__init__(status_code, body)
        self.status_code = status_code
        self.body = body

    def __str__(self) -> str:
        return f"{self.status_code}: {self.body.get('error', {}).get('message', self.body)}"


def prepare_prefill_request(request: Any, request_id: str) -> Any:
    """The prefill copy: one token, no streaming, blocks kept for the remote decode."""
    return copy_request(
        request,
        request_id=request_id,
        max_tokens=1,
        max_completion_tokens=1,
        min_tokens=0,
        n=1,
        stream=False,
        stream_options=None,
        echo=False,
        # The prompt's and the first token's ids: decode may continue from them.
        return_token_ids=True,
        kv_transfer_params=KVTransferParams.for_prefill().model_dump(),
    )


def prepare_decode_request(request: Any, request_id: str, result: PrefillResult | None) -> Any:
    """The decode copy: the client's request, reading the prompt's blocks from prefill.

    With `result=None` (no prefill: fallback, or a request that cannot be split) decode runs the
    whole request itself.
    """
    params = None if result is None else result.kv_transfer_params.model_dump()
    return copy_request(request, request_id=request_id, kv_transfer_params=params)


def can_disaggregate(request: Any) -> bool:
    """Requests whose prompt KV one prefill can hand to one decode: one prompt (prefill returns
    one set of `kv_transfer_params`, so a list of prompts would hand every prompt the first
    one's blocks), n == 1, no beam search."""
    if (getattr(request, "n", 1) or 1) != 1 or getattr(request, "use_beam_search", False):
        return False
    prompt = getattr(request, "prompt", None)
    return not (isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int))


def max_output_tokens(request: Any) -> int | None:
    """The most tokens the request asks for (chat: `max_completion_tokens`, else `max_tokens`);
    None when it leaves that to the context length."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(request, name, None)
        if value is not None:
            return value
    return None


def copy_request(request: Any, **updates: Any) -> Any:
    """A copy of `request` with `updates` applied, skipping fields its model does not have."""
    fields = type(request).model_fields
    return request.model_copy(update={k: v for k, v in updates.items() if k in fields})
