"""MPS preflight and the node scripts, on a machine without a GPU or an MPS daemon."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from serve_app.mps import (
    MpsNotRunningError,
    check_mps_daemon,
    mps_env,
    preflight,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MPS_SCRIPTS = REPO_ROOT / "deploy" / "mps"


def test_env_for_a_partitioned_client() -> None:
    env = mps_env(30, "/run/mps/pipe", "/run/mps/log", "40G")
    assert env == {
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30",
        "CUDA_MPS_PIPE_DIRECTORY": "/run/mps/pipe",
        "CUDA_MPS_LOG_DIRECTORY": "/run/mps/log",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=40G",
    }


def test_env_without_a_share_or_a_memory_cap() -> None:
    env = mps_env(None, "/p", "/l", None)
    assert env == {"CUDA_MPS_PIPE_DIRECTORY": "/p", "CUDA_MPS_LOG_DIRECTORY": "/l"}


def test_env_validates_its_inputs() -> None:
    assert mps_env(None, "/p", "/l", "0=40G,1=512M")["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == (
        "0=40G,1=512M"
    )
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        mps_env(0, "/p", "/l", None)
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        mps_env(101, "/p", "/l", None)
    with pytest.raises(ValueError, match="pinned_mem_limit"):
        mps_env(50, "/p", "/l", "40 GiB")


def test_no_share_means_nothing_to_check(tmp_path: Path) -> None:
    preflight(None, str(tmp_path / "pipe"), allow_unpartitioned=False)


def test_share_without_a_daemon_is_refused(tmp_path: Path) -> None:
    pipe_dir = str(tmp_path / "pipe")  # no daemon can be behind a fresh directory
    assert not check_mps_daemon(pipe_dir).is_running
    with pytest.raises(MpsNotRunningError) as refused:
        preflight(40, pipe_dir, allow_unpartitioned=False)
    message = str(refused.value)
    assert "SM share of 40%" in message
    assert f"`bash deploy/mps/start.sh` (pipe dir {pipe_dir}" in message
    assert "`allow_unpartitioned: true`" in message
    assert isinstance(refused.value, RuntimeError)


def test_allow_unpartitioned_warns_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="serve_app.mps"):
        preflight(40, str(tmp_path / "pipe"), allow_unpartitioned=True)
    [record] = [r for r in caplog.records if r.name == "serve_app.mps"]
    assert record.levelno == logging.WARNING
    assert "WITHOUT its 40% SM share" in record.getMessage()


def test_check_positive_path_with_a_stand_in_control_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one stand-in: the real daemon cannot run without a GPU. It answers only when asked
    # get_server_list on the pipe dir the check passes it.
    pipe_dir = tmp_path / "pipe"
    pipe_dir.mkdir()
    os.mkfifo(pipe_dir / "control")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(
        "#!/bin/sh\n"
        f'[ "$CUDA_MPS_PIPE_DIRECTORY" = "{pipe_dir}" ] || exit 3\n'
        'read -r command; [ "$command" = get_server_list ] || exit 4\n'
        "echo 4242\n"
    )
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    status = check_mps_daemon(str(pipe_dir), timeout_s=10)
    assert status.is_running, status.detail
    assert "4242" in status.detail
    preflight(40, str(pipe_dir), allow_unpartitioned=False)


def _path_without_mps_control(tmp_path: Path) -> str:
    """A PATH with the tools the scripts use, and no nvidia-cuda-mps-control."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "timeout", "mkdir", "chmod", "tail", "sleep"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


@pytest.mark.parametrize("script", ["check.sh", "start.sh", "stop.sh"])
def test_scripts_fail_clearly_without_the_control_binary(tmp_path: Path, script: str) -> None:
    env = {
        "PATH": _path_without_mps_control(tmp_path),
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"),
    }
    result = subprocess.run(
        ["bash", str(MPS_SCRIPTS / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        executable=shutil.which("bash"),
    )
    assert result.returncode == 2, result.stderr
    assert "nvidia-cuda-mps-control not found on PATH" in result.stderr
    assert not (tmp_path / "pipe").exists()  # start.sh created nothing
