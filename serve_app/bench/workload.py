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

A mix (`--mix`) is n classes of synthetic requests, each with a weight and exact lengths:
`"chat:0.8:64:128,doc:0.2:1700:8"` (`name:weight:input_len:output_len`, weights need not sum to
1), or a JSON file holding a list of `{"name", "weight", "input_len", "output_len"}` objects (or
`{"classes": [...]}`). Request `index` draws its class, then its words, from the RNG seeded with
`(seed, index)`, so a request is the same in every run and system; its `Prompt.class_name` goes
into its record.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
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


CLASS_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")  # safe in file names and table rows


@dataclass(frozen=True)
class Prompt:
    text: str
    output_len: int
    class_name: str | None = None


@dataclass(frozen=True)
class MixClass:
    """One class of a mixed workload: its share of requests and its exact lengths."""

    name: str
    weight: float
    input_len: int
    output_len: int


@dataclass(frozen=True)
class WorkloadConfig:
    """Where prompts come from. A `*_range` is inclusive and overrides the fixed length; a `mix`
    replaces the lengths (it cannot be combined with ranges or a dataset)."""

    input_len: int = 256
    output_len: int = 32
    input_len_range: tuple[int, int] | None = None
    output_len_range: tuple[int, int] | None = None
    dataset: str | None = None
    is_output_len_forced: bool = False
    tokenizer: str | None = None
    seed: int = 0
    mix: tuple[MixClass, ...] | None = None

    def __post_init__(self) -> None:
        if self.mix is None:
            return
        if not self.mix:
            raise ValueError("--mix needs at least one class")
        if self.dataset is not None:
            raise ValueError("--mix and --dataset are exclusive: a mix makes its own prompts")
        if self.input_len_range is not None or self.output_len_range is not None:
            raise ValueError("--mix sets every class's lengths: drop --input/output-len-range")


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


class MixedPrompts:
    """Synthetic prompts of a mix: request `index` draws its class from `(seed, index)`."""

    def __init__(self, classes: tuple[MixClass, ...], seed: int, text_maker: TextMaker) -> None:
        total = sum(mix_class.weight for mix_class in classes)
        self.classes = classes
        self.seed = seed
        self.text_maker = text_maker
        self.cumulative = [part / total for part in itertools.accumulate(c.weight for c in classes)]

    def get(self, index: int) -> Prompt:
        rng = np.random.default_rng([self.seed, index])
        mix_class = self._draw(rng)
        text = self.text_maker.make(mix_class.input_len, rng)
        return Prompt(text=text, output_len=mix_class.output_len, class_name=mix_class.name)

    def class_of(self, index: int) -> MixClass:
        """The class request `index` gets, without making its text."""
        return self._draw(np.random.default_rng([self.seed, index]))

    def _draw(self, rng: np.random.Generator) -> MixClass:
        position = bisect.bisect_right(self.cumulative, float(rng.random()))
        return self.classes[min(position, len(self.classes) - 1)]


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
    if config.mix is not None:
        return MixedPrompts(config.mix, config.seed, text_maker)
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


def parse_mix(spec: str) -> tuple[MixClass, ...]:
    """`"name:weight:input_len:output_len,..."`, or a path ending in `.json` (see the docstring).

    Every error names the bad part: weights must be > 0, lengths >= 1, names unique and made of
    letters, digits, `_` and `-`.
    """
    if spec.strip().endswith(".json"):
        return _mix_from_json(Path(spec.strip()))
    parts = [part.strip() for part in spec.split(",")]
    if not any(parts):
        raise ValueError("--mix is empty: give name:weight:input_len:output_len[,...]")
    return _checked_mix([_mix_class_from_text(part) for part in parts])


def _mix_class_from_text(part: str) -> MixClass:
    fields = part.split(":")
    if len(fields) != 4:
        raise ValueError(
            f"--mix part {part!r}: expected name:weight:input_len:output_len (4 fields), "
            f"got {len(fields)}"
        )
    name, weight, input_len, output_len = fields
    return _mix_class(f"part {part!r}", name, weight, input_len, output_len)


def _mix_from_json(path: Path) -> tuple[MixClass, ...]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--mix file {str(path)!r}: {exc}") from exc
    rows = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"--mix file {str(path)!r}: expected a non-empty list of classes")
    classes = []
    for number, row in enumerate(rows, start=1):
        where = f"{path.name} class {number}"
        keys = ("name", "weight", "input_len", "output_len")
        if not isinstance(row, dict) or any(key not in row for key in keys):
            raise ValueError(f"--mix {where}: expected an object with keys {', '.join(keys)}")
        classes.append(_mix_class(where, *(str(row[key]) for key in keys)))
    return _checked_mix(classes)


def _mix_class(where: str, name: str, weight: str, input_len: str, output_len: str) -> MixClass:
    name = name.strip()
    if not CLASS_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"--mix {where}: class name {name!r} must be letters, digits, '_' or '-'")
    return MixClass(
        name=name,
        weight=_weight(where, weight),
        input_len=_length(where, "input_len", input_len),
        output_len=_length(where, "output_len", output_len),
    )


def _weight(where: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError(f"--mix {where}: weight must be a number > 0, got {text.strip()!r}")
    return value


def _length(where: str, field: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--mix {where}: {field} must be an integer >= 1, got {text.strip()!r}")
    return value


def _checked_mix(classes: list[MixClass]) -> tuple[MixClass, ...]:
    names = [mix_class.name for mix_class in classes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--mix: class names must be unique, repeated: {', '.join(repeated)}")
    return tuple(classes)


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
