"""Build a tiny Llama with random weights that vLLM loads offline.

    python -m serve_app.tiny_model models/tiny-llama
    python -m serve_app.tiny_model models/small-llama --size small

It writes `config.json`, `model.safetensors`, a BPE tokenizer trained here on an embedded corpus,
and a chat template. Nothing is downloaded. The weights are random but seeded, so greedy outputs
are stable across runs and engines, which is what the equivalence tests need.

`tiny` (0.4M parameters, the one `make run` and the tests serve) is so small that an engine's
step is mostly per-step work, not arithmetic. `small` (26M: 8 layers of 512) is for benchmarks on
a CPU where the model's compute should dominate, as a real model's does on a GPU: on one core of
this machine a 1,700-token prompt takes ~0.2 s and a decode step a few ms.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

_CORPUS_SEED = """
Prefill reads the whole prompt at once and fills the key value cache. Decode then produces one
token at a time, reading that cache again for every new token. The two phases want different
things from a GPU: prefill is bound by compute, decode by memory bandwidth. Disaggregation runs
them in separate engines so that a long prompt never stalls the tokens of a running answer.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Ray Serve routes requests between deployments. vLLM pages the cache in blocks. NIXL moves the
blocks from one engine to the other without a copy through the host when it can.
Once upon a time there was a small model that wanted to answer every question it was asked.
"""


def _corpus() -> list[str]:
    words = _CORPUS_SEED.split()
    lines = [_CORPUS_SEED]
    # Deterministic shuffles widen the merge table without any external data.
    for step in range(1, 60):
        lines.append(" ".join(words[(i * step) % len(words)] for i in range(len(words))))
    lines.append(" ".join(str(n) for n in range(1000)))
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))


# Each size's shape; everything else (vocabulary, dtype, positions) is shared.
SIZES = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    ),
}


def build_model(out_dir: Path, vocab_size: int, seed: int, size: str = "tiny") -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        **SIZES[size],
        max_position_embeddings=2048,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out_dir), safe_serialization=True)


def build(out_dir: Path, vocab_size: int = 1024, seed: int = 0, size: str = "tiny") -> Path:
    """Write the model to `out_dir` (idempotent: a complete directory is left alone)."""
    out_dir = Path(out_dir)
    marker = out_dir / ".complete"
    if marker.exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, vocab_size)
    build_model(out_dir, vocab_size, seed, size)
    gen_cfg = out_dir / "generation_config.json"
    # vLLM applies generation_config defaults; keep them neutral so requests mean what they say.
    gen_cfg.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    marker.write_text("ok\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    print(build(args.out_dir, args.vocab_size, args.seed, args.size))


if __name__ == "__main__":
    main()
