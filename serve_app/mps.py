"""CUDA MPS preflight: what a GPU replica checks and sets before CUDA initialises.

Under MPS the prefill and decode engines share one GPU with a cap on the SMs each may use
(`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`). The cap is read once, when the process first touches
CUDA, and only takes effect if an MPS control daemon answers on the same pipe directory.
Without the daemon CUDA silently runs the process unpartitioned, so a replica that was given
an SM share checks for the daemon first:

    os.environ.update(mps_env(sm_percentage, pipe_dir, log_dir, pinned_mem_limit))
    preflight(sm_percentage, pipe_dir, allow_unpartitioned)   # before vLLM/torch start CUDA

The daemon itself is managed per node by `deploy/mps/start.sh`, `check.sh` and `stop.sh`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MPS_CONTROL_BINARY = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/pd-serve-mps/pipe"
DEFAULT_LOG_DIR = "/tmp/pd-serve-mps/log"

# "<device ordinal>=<amount><unit>", comma-separated, as the CUDA MPS docs write it.
_PINNED_LIMIT_ITEM = re.compile(r"^\d+=\d+(M|MB|G|GB)$")
_PINNED_AMOUNT = re.compile(r"^\d+(M|MB|G|GB)$")


class MpsNotRunningError(RuntimeError):
    """An SM share was asked for but no MPS control daemon answers on the pipe directory."""


@dataclass(frozen=True)
class MpsStatus:
    """Whether the control daemon answered, and what was seen either way."""

    is_running: bool
    detail: str


def mps_env(
    sm_percentage: int | None,
    pipe_dir: str,
    log_dir: str,
    pinned_mem_limit: str | None,
) -> dict[str, str]:
    """Environment variables for one MPS client process.

    `sm_percentage` (1-100) caps the SMs this process may use; None leaves it uncapped.
    `pinned_mem_limit` caps device memory: "40G" (device 0, which is the replica's only
    visible GPU) or the full "0=40G,1=512M" form. The pipe and log directories are always set,
    so the client joins the same daemon that `deploy/mps/start.sh` started.
    """
    env = {"CUDA_MPS_PIPE_DIRECTORY": pipe_dir, "CUDA_MPS_LOG_DIRECTORY": log_dir}
    if sm_percentage is not None:
        if not 1 <= sm_percentage <= 100:
            raise ValueError(f"sm_percentage must be in [1, 100], got {sm_percentage}")
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(sm_percentage)
    if pinned_mem_limit is not None:
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = _normalize_pinned_limit(pinned_mem_limit)
    return env


def _normalize_pinned_limit(limit: str) -> str:
    value = limit.strip()
    if _PINNED_AMOUNT.match(value):
        return f"0={value}"
    if all(_PINNED_LIMIT_ITEM.match(item) for item in value.split(",")):
        return value
    raise ValueError(
        f"pinned_mem_limit {limit!r} must look like '40G', '512M' or '0=40G,1=512M' "
        "(units M, MB, G, GB)"
    )


def check_mps_daemon(pipe_dir: str, timeout_s: float = 5.0) -> MpsStatus:
    """Ask the control daemon behind `pipe_dir` for its server list.

    Running means: the control binary is on PATH, `pipe_dir/control` is a FIFO, and
    `echo get_server_list | nvidia-cuda-mps-control` exits 0 within `timeout_s`.
    """
    binary = shutil.which(MPS_CONTROL_BINARY)
    if binary is None:
        return MpsStatus(False, f"{MPS_CONTROL_BINARY} is not on PATH (no NVIDIA driver tools)")
    control = Path(pipe_dir) / "control"
    if not _is_fifo(control):
        return MpsStatus(False, f"no control pipe at {control}: no daemon uses this pipe dir")
    try:
        result = subprocess.run(
            [binary],
            input="get_server_list\n",
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir},
            check=False,
        )
    except subprocess.TimeoutExpired:
        return MpsStatus(False, f"{MPS_CONTROL_BINARY} did not answer within {timeout_s:g} s")
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip() or "no output"
        return MpsStatus(False, f"get_server_list exited {result.returncode}: {output}")
    servers = " ".join(result.stdout.split()) or "none yet"
    return MpsStatus(True, f"daemon answers on {pipe_dir}; server pids: {servers}")


def _is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(path.stat().st_mode)
    except OSError:
        return False


def preflight(sm_percentage: int | None, pipe_dir: str, allow_unpartitioned: bool) -> None:
    """Make sure an SM share will be enforced; call before CUDA initialises.

    No share (None): nothing to check. A share with a daemon answering: fine. A share without
    one raises MpsNotRunningError, unless `allow_unpartitioned` is true, in which case it logs
    a WARNING and the engine runs on all SMs.
    """
    if sm_percentage is None:
        return
    status = check_mps_daemon(pipe_dir)
    if status.is_running:
        logger.info("MPS: SM share %d%% will be enforced (%s)", sm_percentage, status.detail)
        return
    if allow_unpartitioned:
        logger.warning(
            "MPS control daemon not answering (%s): allow_unpartitioned is set, so this engine "
            "runs WITHOUT its %d%% SM share and competes for every SM with the other engine; "
            "decode latency will suffer under prefill load",
            status.detail,
            sm_percentage,
        )
        return
    raise MpsNotRunningError(
        f"an SM share of {sm_percentage}% needs the CUDA MPS control daemon, which is not "
        f"answering: {status.detail}. Start it on this node with `bash deploy/mps/start.sh` "
        f"(pipe dir {pipe_dir}; set CUDA_MPS_PIPE_DIRECTORY={pipe_dir} for the script), or set "
        "`allow_unpartitioned: true` in the config to run without the SM split."
    )
