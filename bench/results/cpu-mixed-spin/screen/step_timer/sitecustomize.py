"""Per-call wall time of vLLM's step functions and NIXL connector hooks, in every process.

Put this directory on PYTHONPATH and set STEP_TIMER=LABEL: each vLLM process (EngineCore,
worker) writes `{label: [calls, seconds]}` to /tmp/step-timer-LABEL-PID.json every 0.5 s. The
classes are wrapped once their modules are imported (a watcher thread), so nothing of vLLM is
imported early. Used with `connector_step_cost.py` (README, "connector_step_cost.py").
"""

import json
import os
import sys
import threading
import time

_CONNECTOR = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector"
_HOOKS = (
    "bind_connector_metadata", "wait_for_save", "get_transfer_results",
    "get_block_ids_with_load_errors", "get_kv_connector_stats",
    "get_kv_connector_kv_cache_events", "build_connector_worker_meta",
    "clear_connector_metadata", "build_connector_meta", "update_connector_output",
    "wait_for_layer_load", "save_kv_layer", "get_num_new_matched_tokens",
    "update_state_after_alloc", "request_finished", "has_pending_push_work",
)
TARGETS = {
    _CONNECTOR: [("NixlBaseConnector", m) for m in _HOOKS] + [("NixlPullConnector", "start_load_kv")],
    "vllm.v1.worker.gpu_model_runner": [
        ("GPUModelRunner", "execute_model"),
        ("GPUModelRunner", "sample_tokens"),
        ("GPUModelRunner", "_prepare_inputs"),
    ],
    "vllm.v1.engine.core": [("EngineCore", "step")],
    "vllm.v1.core.sched.scheduler": [("Scheduler", "schedule"), ("Scheduler", "update_from_output")],
}
stats: dict[str, list] = {}


def _timed(cls, name):
    original = cls.__dict__.get(name)
    if original is None or getattr(original, "_timed", False):
        return
    label = f"{cls.__name__}.{name}"

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            entry = stats.setdefault(label, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - started

    timed._timed = True
    setattr(cls, name, timed)


def _watch(label):
    done = set()
    while True:
        for module, items in TARGETS.items():
            if module in done or module not in sys.modules:
                continue
            found = [getattr(sys.modules[module], cls, None) for cls, _ in items]
            for cls, (_, method) in zip(found, items, strict=True):
                if cls is not None:
                    _timed(cls, method)
            if all(found):
                done.add(module)
        if stats:
            with open(f"/tmp/step-timer-{label}-{os.getpid()}.json", "w") as out:
                json.dump(stats, out)
        time.sleep(0.5)


if os.environ.get("STEP_TIMER"):
    threading.Thread(target=_watch, args=(os.environ["STEP_TIMER"],), daemon=True).start()
