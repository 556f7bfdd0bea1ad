"""The memory planner against hand arithmetic for real architectures, and its CLI."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from math import prod
from pathlib import Path

import pytest

from serve_app.plan import (
    BUILTIN_MODELS,
    GIB,
    MIB,
    ModelShape,
    PlanError,
    load_model_shape,
    plan_split,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = REPO_ROOT / "models" / "tiny-llama"

# Hand arithmetic, Llama-3.1-8B (hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128,
# intermediate 14336, vocab 128256, untied, bf16).
LLAMA_8B_EMBEDDING = 128256 * 4096  # = 525,336,576; the lm_head is the same size
LLAMA_8B_LAYER = (
    4096 * 4096  # q_proj
    + 2 * 4096 * (8 * 128)  # k_proj, v_proj
    + 4096 * 4096  # o_proj
    + 3 * 4096 * 14336  # gate, up, down
    + 2 * 4096  # input and post-attention RMSNorm
)  # = 218,112,000
LLAMA_8B_PARAMS = 2 * LLAMA_8B_EMBEDDING + 32 * LLAMA_8B_LAYER + 4096  # + final norm
LLAMA_8B_KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, layers, KV heads, head_dim, bf16

# Qwen2.5-7B (hidden 3584, 28 layers, 28 heads, 4 KV heads, head_dim 128, intermediate 18944,
# vocab 152064, untied, bf16); Qwen2 has a bias on q, k and v.
QWEN_7B_EMBEDDING = 152064 * 3584
QWEN_7B_LAYER = (
    3584 * 3584  # q_proj
    + 2 * 3584 * 512  # k_proj, v_proj (4 KV heads * 128 = 512)
    + (3584 + 2 * 512)  # q, k, v biases
    + 3584 * 3584  # o_proj
    + 3 * 3584 * 18944  # gate, up, down
    + 2 * 3584  # two RMSNorms
)
QWEN_7B_PARAMS = 2 * QWEN_7B_EMBEDDING + 28 * QWEN_7B_LAYER + 3584
QWEN_7B_KV_PER_TOKEN = 2 * 28 * 4 * 128 * 2

LLAMA_8B_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}
QWEN_7B_HF_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve_app.plan", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


def test_llama_3_1_8b_shape_matches_hand_arithmetic() -> None:
    model = BUILTIN_MODELS["llama-3.1-8b"]
    assert LLAMA_8B_PARAMS == 8_030_261_248  # the published parameter count
    assert model.num_params == LLAMA_8B_PARAMS
    assert model.weight_bytes == LLAMA_8B_PARAMS * 2
    assert model.kv_bytes_per_token() == LLAMA_8B_KV_PER_TOKEN == 131072
    assert model.kv_bytes_per_token(kv_dtype_bytes=1) == 65536


def test_qwen2_5_7b_shape_matches_hand_arithmetic() -> None:
    model = BUILTIN_MODELS["qwen2.5-7b"]
    assert QWEN_7B_PARAMS == 7_615_616_512
    assert model.num_params == QWEN_7B_PARAMS
    assert model.kv_bytes_per_token() == QWEN_7B_KV_PER_TOKEN == 57344


def test_llama_3_2_1b_ties_its_embeddings() -> None:
    embedding = 128256 * 2048
    layer = 2048 * 2048 * 2 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert BUILTIN_MODELS["llama-3.2-1b"].num_params == embedding + 16 * layer + 2048


@pytest.mark.parametrize(
    ("hf_config", "builtin"),
    [(LLAMA_8B_HF_CONFIG, "llama-3.1-8b"), (QWEN_7B_HF_CONFIG, "qwen2.5-7b")],
)
def test_config_json_reads_as_the_builtin(
    tmp_path: Path, hf_config: dict[str, object], builtin: str
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    expected = BUILTIN_MODELS[builtin]
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        model = load_model_shape(spec)
        assert model.num_params == expected.num_params
        assert model.kv_bytes_per_token() == expected.kv_bytes_per_token()
        assert model.dtype == "bfloat16"


def test_builtin_names_and_hub_ids_resolve() -> None:
    assert load_model_shape("Llama-3.1-8B") is BUILTIN_MODELS["llama-3.1-8b"]
    assert load_model_shape("Qwen/Qwen2.5-7B-Instruct") is BUILTIN_MODELS["qwen2.5-7b"]
    with pytest.raises(ValueError, match="built-in architecture"):
        load_model_shape("no-such-model")


def test_unsupported_architectures_are_refused() -> None:
    moe = {**LLAMA_8B_HF_CONFIG, "num_local_experts": 8}
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelShape.from_hf_config(moe)
    with pytest.raises(ValueError, match="lacks num_hidden_layers"):
        ModelShape.from_hf_config(
            {k: v for k, v in LLAMA_8B_HF_CONFIG.items() if k != "num_hidden_layers"}
        )


def test_llama_split_on_80_gib_matches_hand_arithmetic() -> None:
    plan = plan_split(BUILTIN_MODELS["llama-3.1-8b"], 80 * GIB, 0.45, 0.45)
    budget = int(0.45 * 80 * GIB)  # 36 GiB
    kv_pool = budget - LLAMA_8B_PARAMS * 2 - 2 * GIB  # 36 - 14.96 - 2 = 19.04 GiB
    kv_tokens = kv_pool // (LLAMA_8B_KV_PER_TOKEN * 16) * 16  # whole 16-token blocks
    for engine in (plan.prefill, plan.decode):
        assert engine.budget_bytes == budget
        assert engine.kv_pool_bytes == kv_pool
        assert engine.num_kv_tokens == kv_tokens == 155_984
        assert engine.max_num_seqs == kv_tokens // 8192 == 19
        assert engine.min_memory_share == 0.23  # (14.96 + 2 + 8192 * 128 KiB) / 80 = 0.2245
    assert plan.handoff_bytes_per_request == 2048 * LLAMA_8B_KV_PER_TOKEN == 256 * MIB
    assert plan.total_used_bytes == 2 * budget
    assert plan.free_bytes == 80 * GIB - 2 * budget


def test_fp8_kv_cache_halves_bytes_per_token() -> None:
    plan = plan_split(BUILTIN_MODELS["qwen2.5-7b"], 80 * GIB, 0.45, 0.45, kv_cache_dtype="fp8")
    assert plan.kv_bytes_per_token == 2 * 28 * 4 * 128 * 1 == 28672
    assert plan.handoff_bytes_per_request == 2048 * 28672


def test_too_small_a_share_is_refused_with_the_minimum() -> None:
    with pytest.raises(PlanError) as refused:
        plan_split(BUILTIN_MODELS["llama-3.1-8b"], 80 * GIB, 0.2, 0.45)
    assert str(refused.value) == (
        "prefill: memory share 0.2 of 80.00 GiB = 16.00 GiB leaves -0.96 GiB for KV after "
        "14.96 GiB weights and 2.00 GiB overhead; raise --prefill-memory-share to at least 0.23"
    )
    plan_split(BUILTIN_MODELS["llama-3.1-8b"], 80 * GIB, 0.23, 0.45)


def test_a_pool_smaller_than_one_sequence_is_refused() -> None:
    # 0.22 * 80 GiB = 17.6 GiB leaves 0.64 GiB = ~5.2k tokens, under one 8192-token sequence.
    with pytest.raises(PlanError, match=r"decode: .*less than one 8192-token sequence needs"):
        plan_split(BUILTIN_MODELS["llama-3.1-8b"], 80 * GIB, 0.45, 0.22)


def test_shares_over_the_headroom_limit_are_refused() -> None:
    model = BUILTIN_MODELS["llama-3.1-8b"]
    with pytest.raises(PlanError, match=r"0.5 \+ 0.5 = 1.00 exceed the limit 0.95"):
        plan_split(model, 80 * GIB, 0.5, 0.5)
    plan_split(model, 80 * GIB, 0.5, 0.5, max_total_share=1.0)
    with pytest.raises(PlanError, match="exceed the limit 1 of the card"):
        plan_split(model, 80 * GIB, 0.6, 0.5, max_total_share=1.0)


def test_malformed_inputs_are_value_errors_not_refusals() -> None:
    model = BUILTIN_MODELS["llama-3.1-8b"]
    with pytest.raises(ValueError, match="prefill-memory-share must be in"):
        plan_split(model, 80 * GIB, 0.0, 0.45)
    with pytest.raises(ValueError, match="prompt-len"):
        plan_split(model, 80 * GIB, 0.45, 0.45, prompt_len=9000)
    with pytest.raises(ValueError, match="unknown dtype"):
        plan_split(model, 80 * GIB, 0.45, 0.45, kv_cache_dtype="int3")


def _safetensors_num_params(path: Path) -> int:
    """Count the elements in a safetensors file from its JSON header."""
    with path.open("rb") as file:
        (header_len,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_len))
    return sum(prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def test_tiny_llama_from_its_directory() -> None:
    if not (TINY_LLAMA / "config.json").exists():
        pytest.skip("build it with: python -m serve_app.tiny_model models/tiny-llama")
    model = load_model_shape(str(TINY_LLAMA))
    embedding = 1024 * 128
    layer = 128 * 128 * 2 + 2 * 128 * (2 * 32) + 3 * 128 * 256 + 2 * 128
    assert model.num_params == 2 * embedding + 2 * layer + 128 == 557_696
    assert model.num_params == _safetensors_num_params(TINY_LLAMA / "model.safetensors")
    assert model.kv_bytes_per_token() == 2 * 2 * 2 * 32 * 2 == 512
    plan = plan_split(model, 80 * GIB, 0.45, 0.45, context_len=2048, prompt_len=256)
    assert plan.handoff_bytes_per_request == 256 * 512


def test_cli_table() -> None:
    result = run_cli("llama-3.1-8b", "--gpu-memory-gib", "80")
    assert result.returncode == 0, result.stderr
    assert "8,030,261,248" in result.stdout
    assert "131,072 B/token" in result.stdout
    assert "155,984" in result.stdout
    assert "256.0 MiB" in result.stdout
    assert "total used: 72.00 GiB of 80.00 GiB" in result.stdout


def test_cli_json_with_gpu_preset_and_fp8() -> None:
    result = run_cli("qwen2.5-7b", "--gpu", "h200-141gb", "--kv-cache-dtype", "fp8", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["gpu_memory_bytes"] == 143771 * MIB
    assert plan["num_params"] == QWEN_7B_PARAMS
    assert plan["kv_bytes_per_token"] == 28672
    assert plan["prefill"]["weight_bytes"] == QWEN_7B_PARAMS * 2
    assert plan["total_used_bytes"] == plan["prefill"]["budget_bytes"] * 2


def test_cli_reads_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_HF_CONFIG))
    result = run_cli(str(tmp_path), "--json", "--context-len", "4096", "--prompt-len", "1024")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["num_params"] == LLAMA_8B_PARAMS
    assert plan["handoff_bytes_per_request"] == 1024 * LLAMA_8B_KV_PER_TOKEN


def test_cli_refusal_exits_non_zero_with_the_reason() -> None:
    result = run_cli("llama-3.1-8b", "--prefill-memory-share", "0.2")
    assert result.returncode == 1
    assert "raise --prefill-memory-share to at least 0.23" in result.stderr
    as_json = run_cli(
        "llama-3.1-8b", "--prefill-memory-share", "0.6", "--decode-memory-share", "0.6", "--json"
    )
    assert as_json.returncode == 1
    assert "exceed the limit 0.95" in json.loads(as_json.stdout)["error"]


def test_cli_bad_arguments_exit_2() -> None:
    assert run_cli("no-such-model").returncode == 2
    assert run_cli("llama-3.1-8b", "--gpu", "h100-80gb", "--gpu-memory-gib", "80").returncode == 2


def test_cli_speaks_in_pairs_and_cluster_totals() -> None:
    one = json.loads(run_cli("llama-3.1-8b", "--gpu", "h100-80gb", "--json").stdout)
    eight = json.loads(run_cli("llama-3.1-8b", "--gpu", "h100-80gb", "--pairs", "8", "--json").stdout)
    assert eight["decode"] == one["decode"]  # the plan is one pair's, on one GPU
    assert eight["cluster"]["gpus"] == 8
    assert eight["cluster"]["decode_kv_tokens"] == 8 * one["decode"]["num_kv_tokens"]
    assert eight["cluster"]["decode_max_seqs"] == 8 * one["decode"]["max_num_seqs"]
    table = run_cli("llama-3.1-8b", "--gpu", "h100-80gb", "--pairs", "8").stdout
    assert "one pair, one GPU" in table and "cluster: 8 pairs on 8 GPUs" in table
    assert run_cli("llama-3.1-8b", "--pairs", "0").returncode == 2
