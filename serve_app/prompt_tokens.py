"""The router's one tokenization of a prompt: counted for the route decision, then handed on.

A completion's text prompt is tokenized here, once, with the engines' own tokenizer (vLLM's
`get_tokenizer` on the same model) and the request continues with the token ids as its prompt,
so neither engine tokenizes it again. A chat request is not rendered here (its template, tools
and multimodal parts are the engine's business): its length is estimated from the characters of
its messages at the tokenizer's own characters-per-token ratio, measured once at start, which is
all a threshold needs.
"""

from __future__ import annotations

import logging
from typing import Any

from serve_app.protocol import copy_request

logger = logging.getLogger("ray.serve")
_DEFAULT_CHARS_PER_TOKEN = 4.0  # English BPE, when no tokenizer is at hand

# English prose for the chat estimate: tokenized once at start to measure characters per token.
_SAMPLE = (
    "The quick brown fox jumps over the lazy dog. A request arrives at the router, which decides "
    "whether the prompt is long enough to be worth a separate prefill engine; short prompts stay "
    "on the decode engine, where computing them costs less than the hop and the transfer."
)
_CHAT_TOKENS_PER_MESSAGE = 4  # role markers and separators of a typical chat template
# Fields whose meaning depends on the prompt being text: such requests keep their text prompt.
_TEXT_PROMPT_FIELDS = ("echo", "truncate_prompt_tokens", "prompt_embeds", "suffix")


class PromptTokens:
    def __init__(self, tokenizer_source: str | None) -> None:
        self.tokenizer: Any = None
        self.chars_per_token = _DEFAULT_CHARS_PER_TOKEN
        if tokenizer_source is None:
            logger.warning("no tokenizer for the router: prompt lengths are estimated")
            return
        from vllm.tokenizers import get_tokenizer

        self.tokenizer = get_tokenizer(tokenizer_source)
        self.chars_per_token = len(_SAMPLE) / len(self.tokenizer.encode(_SAMPLE))

    def count(self, endpoint: str, request: Any) -> tuple[int, Any]:
        """The prompt's token count and the request to send on (its prompt as token ids where
        that is the same request to the engine)."""
        if endpoint == "chat":
            return self.estimate_chat(request), request
        prompt = request.prompt
        if _is_token_ids(prompt):
            return len(prompt), request
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
            if _is_token_ids(prompt):
                return len(prompt), request
        if not isinstance(prompt, str):
            # Several prompts: each is counted by the engine; the route needs only the longest.
            return max((self._len(p) for p in prompt), default=0), request
        if self.tokenizer is None:
            return self._len(prompt), request
        add_special = getattr(request, "add_special_tokens", True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special)
        if any(getattr(request, name, None) for name in _TEXT_PROMPT_FIELDS):
            return len(ids), request
        return len(ids), copy_request(request, prompt=ids, add_special_tokens=False)

    def estimate_chat(self, request: Any) -> int:
        num_chars = 0
        for message in request.messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                num_chars += len(content)
            elif isinstance(content, list):
                num_chars += sum(len(str(part.get("text", ""))) for part in content
                                 if isinstance(part, dict))
        num_tokens = num_chars / self.chars_per_token
        return int(num_tokens) + _CHAT_TOKENS_PER_MESSAGE * len(request.messages)

    def _len(self, prompt: Any) -> int:
        if _is_token_ids(prompt):
            return len(prompt)
        return int(len(str(prompt)) / self.chars_per_token)


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
