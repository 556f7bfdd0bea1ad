"""A stand-in for a replica and its engine: owner -> child -> grandchild, each started the way vLLM
starts EngineCore and its workers (multiprocessing spawn), each loading the vLLM plugin's
`die_with_parent` as vLLM loads general plugins in every process it starts.

    python process_tree.py plugin|none OUT_DIR [GATE_FILE]

Each process writes its pid to OUT_DIR/<depth> and then sleeps. With GATE_FILE the child waits
for that file before it loads the plugin (to kill the owner first: the race the plugin closes).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path


def level(depth: int, use_plugin: bool, out_dir: str, gate: str) -> None:
    if depth == 1 and gate:
        while not Path(gate).exists():
            time.sleep(0.02)
    if use_plugin:
        from serve_app.vllm_plugin import die_with_parent

        die_with_parent()
    if depth < 2:
        context = multiprocessing.get_context("spawn")
        context.Process(target=level, args=(depth + 1, use_plugin, out_dir, gate)).start()
    (Path(out_dir) / str(depth)).write_text(str(os.getpid()))
    time.sleep(300)


if __name__ == "__main__":
    from serve_app.vllm_plugin import OWNER_PID_ENV

    os.environ[OWNER_PID_ENV] = str(os.getpid())
    level(0, sys.argv[1] == "plugin", sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
