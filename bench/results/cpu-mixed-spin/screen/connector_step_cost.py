"""vLLM offline, the same batch with and without NixlConnector: seconds per generate()."""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    from vllm import LLM, SamplingParams

    mode, model = sys.argv[1], sys.argv[2]
    kw = dict(model=model, max_model_len=2048, block_size=32, enable_prefix_caching=False)
    if mode == "nixl":
        kw["kv_transfer_config"] = {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_both",
            "kv_buffer_device": "cpu",
        }
    llm = LLM(**kw)
    sp = SamplingParams(max_tokens=128, ignore_eos=True, temperature=0)
    prompts = [{"prompt_token_ids": [5 + (i * 7 + j) % 900 for j in range(64)]} for i in range(4)]
    llm.generate(prompts, sp, use_tqdm=False)
    res = []
    for _ in range(int(os.environ.get("REPS", 5))):
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        res.append(time.perf_counter() - t)
    print(json.dumps({"mode": mode, "s": sorted(res)}))


if __name__ == "__main__":
    main()
