"""Prompts for a load run: synthetic with chosen lengths, or read from a JSONL dataset.

Synthetic prompts are random words, different for every request (so a prefix cache cannot hide
the prefill cost) and reproducible from `(seed, request index)`. With a tokenizer the prompt has
exactly `input_len` tokens as `/v1/completions` counts them (special tokens such as BOS included;
a chat template adds its own tokens on top). Without one, `input_len` words are used, which most
BPE vocabularies encode as about one token each.

Dataset rows (one JSON object per line; a JSON array file is accepted too):

- ShareGPT: `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}`;
  the first human turn is the prompt and the reply after it sets the output length (tokens with a
  tokenizer, words without). `role`/`content` keys are accepted as well as `from`/`value`.
- `{"prompt": ..., "output_len": ...}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

_WORD_TEXT = (
    "time person year way day thing man world life hand part child eye woman place work week case "
    "point number group problem fact cloud river stone light house water paper music city garden "
    "window table market engine signal model token cache block layer query answer story letter "
    "green blue red small large early late quick slow bright quiet strong simple open close keep "
    "find give tell call move play run turn start show hear write read learn build send carry "
    "over under after before between about around along across through during without within "
    "north south east west morning evening winter summer valley mountain forest ocean island road"
)
WORDS = tuple(_WORD_TEXT.split())

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "model", "bard")


@dataclass(frozen=True)
class Prompt:
    text: str
    output_len: int


@dataclass(frozen=True)
class WorkloadConfig:
    """Where prompts come from. A `*_range` is inclusive and overrides the fixed length."""

    input_len: int = 256
    output_len: int = 32
    input_len_range: tuple[int, int] | None = None
    output_len_range: tuple[int, int] | None = None
    dataset: str | None = None
    is_output_len_forced: bool = False
    tokenizer: str | None = None
    seed: int = 0


class PromptSource(Protocol):
    def get(self, index: int) -> Prompt: ...


class TextMaker(Protocol):
    def make(self, num_tokens: int, rng: np.random.Generator) -> str: ...

    def count(self, text: str) -> int: ...


class WordText:
    """One word per requested token: an approximation used when no tokenizer is given."""

    def make(self, num_tokens: int, rng: np.random.Generator) -> str:
        return " ".join(rng.choice(WORDS, size=max(num_tokens, 1)))

    def count(self, text: str) -> int:
        return len(text.split())


class TokenizerText:
    """Text whose token count under the model's tokenizer is exact."""

    def __init__(self, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer  # heavy; only when a tokenizer is asked for

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.num_special = len(self.tokenizer.encode("", add_special_tokens=True))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def make(self, num_tokens: int, rng: np.random.Generator) -> str:
        target = max(num_tokens - self.num_special, 1)
        ids = self.tokenizer.encode(WordText().make(target, rng), add_special_tokens=False)
        # Decoding then re-encoding can merge or split tokens at the cut: trim or pad until stable.
        for _ in range(16):
            ids = self._fit(ids, target, rng)
            text = self.tokenizer.decode(ids)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == target:
                return text
        return self.tokenizer.decode(ids[:target])

    def _fit(self, ids: list[int], target: int, rng: np.random.Generator) -> list[int]:
        while len(ids) < target:
            words = " " + WordText().make(target - len(ids), rng)
            ids = ids + self.tokenizer.encode(words, add_special_tokens=False)
        return ids[:target]


def make_text_maker(tokenizer_path: str | None) -> TextMaker:
    return TokenizerText(tokenizer_path) if tokenizer_path else WordText()


class SyntheticPrompts:
    def __init__(self, config: WorkloadConfig, text_maker: TextMaker) -> None:
        self.config = config
        self.text_maker = text_maker

    def get(self, index: int) -> Prompt:
        rng = np.random.default_rng([self.config.seed, index])
        input_len = _pick_len(self.config.input_len, self.config.input_len_range, rng)
        output_len = _pick_len(self.config.output_len, self.config.output_len_range, rng)
        return Prompt(text=self.text_maker.make(input_len, rng), output_len=output_len)


class DatasetPrompts:
    """Dataset prompts in a seeded shuffled order, cycled when a run needs more of them."""

    def __init__(self, prompts: list[Prompt], seed: int = 0) -> None:
        if not prompts:
            raise ValueError("dataset has no usable rows")
        self.prompts = prompts
        self.order = np.random.default_rng(seed).permutation(len(prompts))

    def get(self, index: int) -> Prompt:
        return self.prompts[int(self.order[index % len(self.prompts)])]


def make_prompt_source(config: WorkloadConfig) -> PromptSource:
    text_maker = make_text_maker(config.tokenizer)
    if config.dataset is None:
        return SyntheticPrompts(config, text_maker)
    forced = config.output_len if config.is_output_len_forced else None
    prompts = load_dataset(config.dataset, text_maker, forced_output_len=forced)
    return DatasetPrompts(prompts, seed=config.seed)


def load_dataset(
    path: str | Path, text_maker: TextMaker, forced_output_len: int | None = None
) -> list[Prompt]:
    """Usable rows of a JSONL (or JSON array) dataset; rows without a prompt are skipped."""
    prompts = []
    for row in _read_rows(Path(path)):
        prompt = parse_row(row, text_maker, forced_output_len)
        if prompt is not None:
            prompts.append(prompt)
    return prompts


def parse_row(
    row: dict[str, Any], text_maker: TextMaker, forced_output_len: int | None = None
) -> Prompt | None:
    if "conversations" in row:
        text, reply = _first_exchange(row["conversations"])
        output_len = text_maker.count(reply) if reply else 0
    else:
        text = row.get("prompt")
        output_len = int(row.get("output_len") or row.get("max_tokens") or 0)
    if forced_output_len is not None:
        output_len = forced_output_len
    if not text or output_len < 1:
        return None
    return Prompt(text=str(text), output_len=output_len)


def parse_len_range(spec: str) -> tuple[int, int]:
    """`"a:b"` -> `(a, b)` with 1 <= a <= b."""
    low_text, sep, high_text = spec.partition(":")
    if not sep:
        raise ValueError(f"length range must look like 'a:b', got {spec!r}")
    low, high = int(low_text), int(high_text)
    if not 1 <= low <= high:
        raise ValueError(f"length range needs 1 <= a <= b, got {spec!r}")
    return low, high


def _pick_len(fixed: int, bounds: tuple[int, int] | None, rng: np.random.Generator) -> int:
    if bounds is None:
        return fixed
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _first_exchange(turns: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """The first human turn and the assistant reply right after it."""
    for index, turn in enumerate(turns):
        if _role(turn) in HUMAN_ROLES:
            reply = turns[index + 1] if index + 1 < len(turns) else None
            has_reply = reply is not None and _role(reply) in ASSISTANT_ROLES
            return _content(turn), _content(reply) if has_reply else None
    return None, None


def _role(turn: dict[str, Any]) -> str:
    return str(turn.get("from") or turn.get("role") or "").lower()


def _content(turn: dict[str, Any] | None) -> str | None:
    if turn is None:
        return None
    value = turn.get("value", turn.get("content"))
    return value if isinstance(value, str) else None
