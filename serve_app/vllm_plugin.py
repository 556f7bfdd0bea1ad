"""A vLLM general plugin: NIXL's progress thread gets a poll delay; decode loads only what
prefill computed; an engine's processes die with the replica that started them; on the CPU
build they run on their phase's cores and may sleep while they wait for each other.

NIXL 1.5.1's Python API creates every agent with `pthrDelay = 0`, so each engine's progress
thread spins a whole core even when idle. On a many-core GPU host that is a bounded cost; on a
small machine two spinning threads starve the engines themselves (measured: 27 s TTFT stalls and
KV leases expiring before decode read the blocks). Disabling the thread instead makes multi-block
reads hang, so the fix is a delay between polls, set where the agent is created.

vLLM loads general plugins in every process it starts (API frontend, engine core, workers), which
is the only place that reaches the process that owns the NIXL agent. The poll delay is set only
where `PD_SERVE_NIXL_PROGRESS_DELAY_US` is (by `kv_transfer.progress_delay_us`).

The second patch, applied wherever this vLLM has the class it was written for, serves the first
token from prefill (`serve_app/first_token.py`): decode's prompt is then prefill's prompt plus
the first token, one token longer than what prefill computed. vLLM 0.32's pull connector asks to
load the whole prompt's length, which at a block boundary needs one block more than prefill
holds (an assertion in the read). Loading at most `remote_num_tokens` (what prefill reports it
computed) is the same count in the plain handoff and the right one for the continuation; the
scheduler then computes the rest locally.

Third, no orphans: vLLM 0.32 ties a worker to its EngineCore (a death pipe) but nothing ties the
EngineCore to the process that started it, so a replica killed by SIGKILL or `ray stop --force`
left both running (GBs of memory, the NIXL port held, the next start hung on that port). In every
process started under an engine's owner (`OWNER_PID_ENV`, set by `engine.Engine.start`), the
plugin asks the kernel for SIGKILL when the parent dies (`PR_SET_PDEATHSIG`), then checks the
parent is still the one that started it (it may have died before the request took effect).
Linux sends that signal when the *thread* that started the process exits: vLLM starts EngineCore
from the replica's long-lived user-code thread and its workers from EngineCore's main thread.

Fourth, on the CPU build, where an engine's processes run (`cpu_cores`): vLLM binds only the
worker's compute threads, so EngineCore waited for its worker on whichever core was free, and its
NIXL connector moves the worker's main thread (the one that runs the model) to the last core of
the NUMA node. The plugin pins every thread of EngineCore and its workers to the phase's cores,
and again right after the connector's choice.

Fifth, on the CPU build, how they wait for each other (`cpu_poll_sleep_us`). vLLM's
shared-memory queue between EngineCore and its worker keeps a reader busy-looping on
`sched_yield` for 1 s after each message before it blocks on its socket. Under steady load that
is never, so a waiting process spins on its core. Measured on 2 cores, 200 mixed requests at
6 req/s: decode's EngineCore burned 14.8 CPU-s unpinned (6.2 pinned), prefill's worker 14 CPU-s
on the core it shares with the Router and the HTTP proxy (2.8 with a 100 us sleep). Blocking
sooner is not an option: with a 0 s busy loop notifications get lost and steps stall ~5 s
(vLLM's recovery cap; measured: ITL P99 5 s). So the busy loop stays and sleeps between its
polls instead of yielding. A sleep's wake-up then delays each message that comes while the
reader sleeps, several a step; `cpu_poll_spin_us` keeps vLLM's yielding for the start of each
wait, which the next step's message mostly falls in (README, "Small machines").

Sixth, on the CPU build, a restarted engine loads the compiled model vLLM saved at its last start
instead of compiling it again (`_load_compile_cache_on_cpu`): ~3.7 s of a tiny-model engine's
5.7 s init, at every start and every restart after a failover.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any

ENV_VAR = "PD_SERVE_NIXL_PROGRESS_DELAY_US"
OWNER_PID_ENV = "PD_SERVE_ENGINE_OWNER_PID"
POLL_SLEEP_ENV = "PD_SERVE_ENGINE_POLL_SLEEP_US"
POLL_SPIN_ENV = "PD_SERVE_ENGINE_POLL_SPIN_US"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
logger = logging.getLogger(__name__)


class _BindingsWithPollDelay:
    """Stands in for `nixl._api.nixlBind`: the same bindings, but agents get the poll delay."""

    def __init__(self, bindings: Any, delay_us: int) -> None:
        self._bindings = bindings
        self._delay_us = delay_us

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bindings, name)

    def nixlAgent(self, name: str, agent_config: Any) -> Any:  # noqa: N802 (binding's name)
        agent_config.pthrDelay = self._delay_us
        return self._bindings.nixlAgent(name, agent_config)


def pull_scheduler_class() -> Any:
    """vLLM's NIXL pull scheduler, if this vLLM has the one the load clamp was written for."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl import pull_scheduler
    except ImportError:
        return None
    cls = getattr(pull_scheduler, "NixlPullConnectorScheduler", None)
    if cls is None or not hasattr(cls, "get_num_new_matched_tokens"):
        return None
    return cls


def clamp_remote_load(cls: Any) -> None:
    """Make `cls.get_num_new_matched_tokens` load no more than the remote computed."""
    original = cls.get_num_new_matched_tokens
    if getattr(original, "_pd_serve_clamped", False):
        return

    def get_num_new_matched_tokens(self, request, num_computed_tokens):  # noqa: ANN001
        count, is_async = original(self, request, num_computed_tokens)
        params = request.kv_transfer_params or {}
        remote = params.get("remote_num_tokens")
        if count > 0 and params.get("do_remote_prefill") and remote:
            count = min(count, remote - num_computed_tokens)
            if count <= 0:
                return 0, False
        return count, is_async

    get_num_new_matched_tokens._pd_serve_clamped = True  # type: ignore[attr-defined]
    cls.get_num_new_matched_tokens = get_num_new_matched_tokens


def register() -> None:
    """Entry point of the `vllm.general_plugins` group; safe to call more than once."""
    die_with_parent()
    _pin_to_cores()
    _lower_priority()
    cls = pull_scheduler_class()
    if cls is not None:
        clamp_remote_load(cls)
    _set_progress_delay()
    _sleep_between_polls()
    _load_compile_cache_on_cpu()


def _set_progress_delay() -> None:
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    try:
        from nixl import _api
    except ImportError:
        return
    if isinstance(_api.nixlBind, _BindingsWithPollDelay):
        return
    _api.nixlBind = _BindingsWithPollDelay(_api.nixlBind, int(raw))
    logger.info("NIXL progress thread poll delay set to %s us", raw)


def _is_engine_process() -> bool:
    """A process started under an engine's owner (EngineCore, its workers), not the owner itself
    (the replica, vLLM's frontend) nor any other process."""
    owner = os.environ.get(OWNER_PID_ENV)
    return bool(owner) and owner != str(os.getpid())


def die_with_parent() -> None:
    """In a process started under an engine's owner (EngineCore, its workers), die by SIGKILL
    as soon as the parent process does. Does nothing in the owner itself or anywhere else."""
    if not _is_engine_process() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
        return
    parent = multiprocessing.parent_process()
    orphaned = os.getppid() != parent.pid if parent is not None else os.getppid() == 1
    if orphaned:
        # Orphaned before the request took effect: the kernel will not signal any more.
        os.kill(os.getpid(), signal.SIGKILL)


CORES_ENV = "PD_SERVE_ENGINE_CORES"


def parse_cores(spec: str) -> set[int]:
    """`0`, `0-3`, `0,2-3`, `0-1|2-3` (`VLLM_CPU_OMP_THREADS_BIND`: `|` between ranks)."""
    cores: set[int] = set()
    for part in spec.replace("|", ",").split(","):
        first, _, last = part.strip().partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def _pin_to_cores() -> None:
    """CPU build: the engine's own processes (EngineCore and its workers) run on the phase's
    cores only. vLLM binds the worker's compute threads (`VLLM_CPU_OMP_THREADS_BIND`) but not
    EngineCore, which then waits for its worker on whichever core is free."""
    spec = os.environ.get(CORES_ENV)
    if not spec or not _is_engine_process():
        return
    cores = parse_cores(spec)
    _pin_threads(cores)
    _keep_nixl_worker_on(cores)


def _pin_threads(cores: set[int]) -> None:
    """Per thread on Linux: every thread that exists now; later ones inherit their creator's."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cores)


def nixl_worker_class() -> Any:
    """vLLM's NIXL connector worker base, if this vLLM has the one the re-pinning was written for."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
    except ImportError:
        return None
    return getattr(base_worker, "NixlBaseConnectorWorker", None)


def _keep_nixl_worker_on(cores: set[int]) -> None:
    """vLLM 0.32's NIXL connector, on the CPU build, moves the worker's main thread to the last
    core of each NUMA node ("reserve different cores for start_load_kv() from model_forward()").
    With one OpenMP thread that main thread is the one that runs the model: on this 2-core
    machine both engines' forwards ran on core 1 (measured: the prefill worker's compute on the
    decode engine's core). The connector's own choice is undone right after it is made."""
    cls = nixl_worker_class()
    if cls is None or getattr(cls.__init__, "_pd_serve_pinned", False):
        return
    original = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        original(self, *args, **kwargs)
        _pin_threads(cores)

    __init__._pd_serve_pinned = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


NICE_ENV = "PD_SERVE_ENGINE_NICE"
_niced = False


def _lower_priority() -> None:
    """CPU build: the engine's own processes (EngineCore, workers) yield the cores to the
    request path (Router, proxy, the servers' replicas) when both want them (`cpu_nice`)."""
    global _niced
    value = os.environ.get(NICE_ENV)
    if _niced or not value or not _is_engine_process():
        return
    os.nice(int(value))
    _niced = True


def _sleep_between_polls() -> None:
    """Readers of vLLM's shared-memory queues sleep `cpu_poll_sleep_us` between busy polls,
    after spinning the first `cpu_poll_spin_us` of each wait where that is set."""
    raw = os.environ.get(POLL_SLEEP_ENV)
    if not raw:
        return
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    cls = getattr(shm_broadcast, "SpinCondition", None)
    if cls is None or getattr(cls.wait, "_pd_serve_sleep", False):
        return
    import time

    original = cls.wait
    sleep_s = int(raw) / 1e6
    spin_s = int(os.environ.get(POLL_SPIN_ENV) or 0) / 1e6

    def wait(self, timeout_ms: int | None = None) -> None:  # noqa: ANN001
        now = time.monotonic()
        if now > self.last_read + self.busy_loop_s:
            original(self, timeout_ms)
            return
        if spin_s:
            # A wait begins at the first poll after a read: its first `spin_s` yield, as vLLM
            # does, so a message that comes soon (the next step's) is read at once.
            if self.__dict__.get("_pd_serve_read") != self.last_read:
                self._pd_serve_read = self.last_read
                self._pd_serve_spin_until = now + spin_s
            if now < self._pd_serve_spin_until:
                os.sched_yield()
                return
        time.sleep(sleep_s)

    wait._pd_serve_sleep = True  # type: ignore[attr-defined]
    cls.wait = wait


def _load_compile_cache_on_cpu() -> None:
    """CPU build: let vLLM load the compiled model it saved instead of compiling it again.

    vLLM 0.32 finishes loading its AOT compile cache with `compiled_fn.finalize_loading(...)`.
    On a GPU the compiled function is vLLM's own wrapper, which has that method; with the CPU
    build's stock inductor backend it is torch's `BundledAOTAutogradSerializableCallable`
    around a plain function, which has nothing to finalize and no such method. The call raised
    AttributeError, vLLM took it for a bad cache ("Compiling model again due to a load failure
    ... 'function' object has no attribute 'finalize_loading'") and compiled the model again at
    every engine start. Torch's wrapper gets the missing no-op here.
    """
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as cls
        from vllm.platforms import current_platform
    except ImportError:
        return
    if not current_platform.is_cpu() or "finalize_loading" in vars(cls):
        return

    def finalize_loading(self, vllm_config: Any) -> None:  # noqa: ANN001, ARG001
        """Nothing to finalize: the deserialized function is ready to call."""

    cls.finalize_loading = finalize_loading
