"""The vLLM plugin's CPU-build settings of an engine's processes: `cpu_cores` pins EngineCore
beside its worker, `cpu_poll_sleep_us` makes them sleep between polls of their shared queue
(after `cpu_poll_spin_us` of spinning, where set), and a restarted engine loads the model vLLM
compiled before instead of compiling it again.

Each case runs in its own interpreter (the plugin patches the process it runs in). The queue case
uses a real vLLM `shm_broadcast.MessageQueue`, the one between EngineCore and its worker: a
reader that got a message less than 1 s ago busy-waits for the next. A writer here and a reader
in a spawned child exchange messages 0.3 s apart (inside the busy loop) while the reader's CPU
time is measured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.partition import phase_env
from tests.cpu.conftest import app_args, run_json_script
from tests.cpu.test_partition import gpu_args

QUEUE_SCRIPT = """
import json, multiprocessing, resource, time


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read(handle, results):
    from serve_app import vllm_plugin

    vllm_plugin.register()
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue, SpinCondition

    wait_after_first = SpinCondition.wait
    vllm_plugin.register()  # a second call must not wrap twice
    queue = MessageQueue.create_from_handle(handle, 0)
    queue.wait_until_ready()
    values, lags_ms, gap_cpu_s = [], [], []
    for _ in range(5):
        before = cpu_seconds()
        value, sent_at = queue.dequeue()
        lags_ms.append((time.monotonic() - sent_at) * 1000)
        if values:  # the first wait began before the writer was ready
            gap_cpu_s.append(cpu_seconds() - before)
        values.append(value)
    results.put({
        "values": values,
        "lags_ms": lags_ms,
        "gap_cpu_s": gap_cpu_s,
        "is_patched": getattr(SpinCondition.wait, "_pd_serve_sleep", False),
        "is_wrapped_once": SpinCondition.wait is wait_after_first,
    })


if __name__ == "__main__":
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    context = multiprocessing.get_context("spawn")
    queue = MessageQueue(1, 1)
    results = context.Queue()
    reader = context.Process(target=read, args=(queue.export_handle(), results))
    reader.start()
    queue.wait_until_ready()
    for value in range(5):
        time.sleep(0.3)
        queue.enqueue((value, time.monotonic()))
    print(json.dumps(results.get(timeout=60)))
    reader.join(30)
"""


def run_queue(sleep_us: int | None, tmp_path: Path, spin_us: int | None = None
              ) -> dict[str, Any]:
    env = dict(os.environ)
    for name, value in (("PD_SERVE_ENGINE_POLL_SLEEP_US", sleep_us),
                        ("PD_SERVE_ENGINE_POLL_SPIN_US", spin_us)):
        env.pop(name, None)
        if value is not None:
            env[name] = str(value)
    # A file, not `-c`: the spawned reader imports its target from the parent's main module.
    script = tmp_path / "queue_probe.py"
    script.write_text(QUEUE_SCRIPT)
    return run_json_script([str(script)], env, timeout_s=180)


def test_a_waiting_reader_sleeps_between_polls_and_misses_nothing(tmp_path: Path) -> None:
    sleeping = run_queue(100, tmp_path)
    spinning = run_queue(None, tmp_path)
    assert sleeping["is_patched"] and sleeping["is_wrapped_once"]
    assert not spinning["is_patched"]
    # Every message arrives, in order, with the reader still in its busy loop (no 5 s stall of
    # a lost notification, which a reader that blocks instead would risk).
    assert sleeping["values"] == spinning["values"] == [0, 1, 2, 3, 4]
    assert max(sleeping["lags_ms"]) < 1000

    sleep_cpu, spin_cpu = sum(sleeping["gap_cpu_s"]), sum(spinning["gap_cpu_s"])
    print(
        f"reader CPU over 4 waits of 0.3 s: spinning {spin_cpu:.3f} s, sleeping {sleep_cpu:.3f} s;"
        f" lag P50 spinning {sorted(spinning['lags_ms'])[2]:.2f} ms,"
        f" sleeping {sorted(sleeping['lags_ms'])[2]:.2f} ms"
    )
    # Measured here: ~1.1-1.2 s vs ~0.13-0.22 s. The bounds leave room for a busy 2-core
    # machine, where the spinning reader gets less than a whole core.
    assert sleep_cpu < 0.5
    assert spin_cpu > sleep_cpu + 0.3


def test_a_reader_that_spins_first_then_sleeps_spins_only_the_start_of_each_wait(
        tmp_path: Path) -> None:
    """`cpu_poll_spin_us`: a message that comes within the spin is read without a sleep's
    delay; a longer wait costs the spin, then sleeps. Here 0.1 s of each 0.3 s wait spins."""
    hybrid = run_queue(100, tmp_path, spin_us=100_000)
    assert hybrid["is_patched"] and hybrid["values"] == [0, 1, 2, 3, 4]
    assert max(hybrid["lags_ms"]) < 1000
    spin_cpu = sum(hybrid["gap_cpu_s"])
    print(f"reader CPU over 4 waits of 0.3 s, spinning the first 0.1 s of each: {spin_cpu:.3f} s")
    # 4 x 0.1 s spun at most, plus the sleeps' polls (~0.03-0.05 s a wait, test above); at
    # least part of the spin even on a busy machine, where the spinner gets less than a core.
    assert 0.1 < spin_cpu < 0.75


PIN_SCRIPT = """
import json, os, threading, time
from serve_app import vllm_plugin

started = threading.Event()
threading.Thread(target=lambda: (started.set(), time.sleep(5)), daemon=True).start()
started.wait()
before = os.sched_getaffinity(0)
vllm_plugin.register()
later = []
thread = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
thread.start()
thread.join()
print(json.dumps({
    "before": sorted(before),
    "threads": sorted({tuple(sorted(os.sched_getaffinity(int(tid))))
                       for tid in os.listdir("/proc/self/task")}),
    "later_thread": later[0],
}))
"""


def run_pinned(env_update: dict[str, str]) -> dict[str, Any]:
    from serve_app.vllm_plugin import CORES_ENV, OWNER_PID_ENV

    env = {k: v for k, v in os.environ.items() if k not in (CORES_ENV, OWNER_PID_ENV)}
    return run_json_script(["-c", PIN_SCRIPT], {**env, **env_update}, timeout_s=120)


def test_an_engine_process_runs_on_its_phase_cores_with_all_its_threads() -> None:
    from serve_app.vllm_plugin import CORES_ENV, OWNER_PID_ENV, parse_cores

    assert parse_cores("0") == {0}
    assert parse_cores("0,2-3") == {0, 2, 3}
    assert parse_cores("0-1|2-3") == {0, 1, 2, 3}
    # As EngineCore: started under an owner (the replica), with the phase's cores.
    engine = run_pinned({OWNER_PID_ENV: str(os.getpid()), CORES_ENV: "0"})
    assert engine["threads"] == [[0]] and engine["later_thread"] == [0]
    # The owner itself (the replica, vLLM's frontend) and processes outside an engine: untouched.
    owner = run_pinned({CORES_ENV: "0"})
    assert owner["threads"] == [owner["before"]] and owner["later_thread"] == owner["before"]


def test_this_vllm_has_the_nixl_worker_whose_core_choice_the_plugin_undoes() -> None:
    """vLLM's NIXL connector moves the CPU worker's main thread (the one that runs the model) to
    the last core of each NUMA node; the plugin puts it back on the phase's cores right after.
    The running app's check is `test_disaggregated.test_each_engine_runs_on_its_phase_cores`."""
    import inspect

    from serve_app.vllm_plugin import nixl_worker_class

    cls = nixl_worker_class()
    assert cls is not None
    assert "sched_setaffinity" in inspect.getsource(cls)


def test_the_phase_settings_reach_the_engine_env_on_cpu_only() -> None:
    args = app_args(prefill={"cpu_poll_sleep_us": 100},
                    decode={"cpu_poll_sleep_us": None, "cpu_poll_spin_us": None})
    cfg = AppConfig.model_validate(args)
    assert phase_env(cfg, "prefill")["PD_SERVE_ENGINE_POLL_SLEEP_US"] == "100"
    assert "PD_SERVE_ENGINE_POLL_SLEEP_US" not in phase_env(cfg, "decode")
    # cpu_cores pins the worker's compute threads (vLLM) and the engine's processes (plugin).
    for role, cores in (("prefill", "0"), ("decode", "1")):
        env = phase_env(cfg, role)
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == env["PD_SERVE_ENGINE_CORES"] == cores
    with pytest.raises(ValidationError, match="cpu_poll_sleep_us"):
        AppConfig.model_validate(app_args(prefill={"cpu_poll_sleep_us": 0}))
    spin = AppConfig.model_validate(app_args(decode={"cpu_poll_sleep_us": 50,
                                                      "cpu_poll_spin_us": 300}))
    assert phase_env(spin, "decode")["PD_SERVE_ENGINE_POLL_SPIN_US"] == "300"
    assert "PD_SERVE_ENGINE_POLL_SPIN_US" not in phase_env(spin, "prefill")
    with pytest.raises(ValidationError, match="decode.cpu_poll_spin_us needs decode.cpu_poll"):
        AppConfig.model_validate(app_args(decode={"cpu_poll_sleep_us": None,
                                                  "cpu_poll_spin_us": 300}))
    with pytest.raises(ValidationError, match="prefill.cpu_poll_sleep_us applies to device: cpu"):
        AppConfig.model_validate(gpu_args(prefill={"cpu_poll_sleep_us": 100}))


# One real engine on the embedded model: greedy tokens of prompts of several lengths (the
# compiled graph's dynamic shapes), and whether vLLM loaded its compile cache or compiled.
ENGINE_SCRIPT = """
import json, sys


def main():
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], max_model_len=512, block_size=32)
    prompts = ["hello world " * k for k in (1, 5, 20, 60)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


if __name__ == "__main__":
    main()
"""


def test_a_restarted_engine_loads_its_compiled_model_and_answers_the_same(
    tmp_path: Path, tiny_model: Path
) -> None:
    """vLLM 0.32 on the CPU build recompiled the model at every start: loading its own AOT
    compile cache failed on `finalize_loading` ('function' object has no attribute ...). With
    the plugin the second start loads what the first saved, and the greedy tokens match."""
    import json
    import subprocess
    import sys

    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache"),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, str(script), str(tiny_model)], env=env, capture_output=True,
            text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        logs = result.stdout + result.stderr
        assert "Compiling model again due to a load failure" not in logs, logs[-4000:]
        tokens = next(line for line in result.stdout.splitlines() if line.startswith("TOKENS "))
        runs.append((json.loads(tokens.removeprefix("TOKENS ")), logs))
    (compiled, first_logs), (loaded, second_logs) = runs
    assert "saved AOT compiled function" in first_logs
    assert "Directly load AOT compilation" in second_logs
    assert loaded == compiled and all(len(ids) == 24 for ids in loaded)
