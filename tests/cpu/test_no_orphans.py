"""No orphans: an engine's processes never outlive the replica that started them.

First the mechanism on a stand-in process tree (`process_tree.py`, no vLLM, a second each), then
the real thing: the app on a Ray cluster of the test's own, killed as `ray stop --force` kills a
node, leaves no vLLM process and frees its NIXL ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.cpu.conftest import MODEL_NAME, ROOT, TEST_PORT_BASE, app_args, free_port

TREE = Path(__file__).with_name("process_tree.py")


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_tree(tmp_path: Path, mode: str, gate: Path | None = None) -> tuple[subprocess.Popen, dict]:
    out = tmp_path / "pids"
    out.mkdir()
    args = [sys.executable, str(TREE), mode, str(out)] + ([str(gate)] if gate else [])
    owner = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    expected = 1 if gate else 3
    assert wait_for(lambda: len(list(out.iterdir())) == expected, 60), "the tree did not start"
    pids = {int(p.name): int(p.read_text()) for p in out.iterdir()}
    return owner, pids


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_engine_processes_die_with_their_owner(tmp_path: Path) -> None:
    owner, pids = start_tree(tmp_path, "plugin")
    try:
        assert pids[0] == owner.pid and alive(pids[1]) and alive(pids[2])
        owner.kill()  # SIGKILL: no cleanup of any kind runs in the owner
        owner.wait()
        assert wait_for(lambda: not alive(pids[1]) and not alive(pids[2]), 5)
    finally:
        kill_all(list(pids.values()))


def test_without_the_plugin_they_would_be_orphans(tmp_path: Path) -> None:
    """The control: the same tree without the plugin outlives its owner."""
    owner, pids = start_tree(tmp_path, "none")
    try:
        owner.kill()
        owner.wait()
        time.sleep(1)
        assert alive(pids[1]) and alive(pids[2])
    finally:
        kill_all(list(pids.values()))


def test_a_process_orphaned_before_the_plugin_loads_kills_itself(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    out = tmp_path / "pids"
    out.mkdir()
    child: list[psutil.Process] = []
    owner = subprocess.Popen(
        [sys.executable, str(TREE), "plugin", str(out), str(gate)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert wait_for(lambda: (out / "0").exists(), 60)
        child += [
            c for c in psutil.Process(owner.pid).children()
            if "resource_tracker" not in " ".join(c.cmdline())
        ]
        assert len(child) == 1
        owner.kill()
        owner.wait()
        assert alive(child[0].pid)
        gate.touch()  # now the orphaned child loads the plugin
        assert wait_for(lambda: not alive(child[0].pid), 5)
        assert not (out / "2").exists()
    finally:
        kill_all([owner.pid, *(c.pid for c in child)])


# ---- the real thing: `ray stop --force` on a node serving the app -----------------------------

DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from ray import serve
    from serve_app.app import build_app

    address, http_port, args = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(build_app(args), name="pd", route_prefix="/")
    pids = {name: serve.get_deployment_handle(name, app_name="pd").stats.remote().result()["pid"]
            for name in ("PrefillServer", "DecodeServer")}
    print("PIDS " + json.dumps(pids), flush=True)
""")


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the Ray cluster whose temp dir is `temp_dir`: its daemons (they name
    the dir on their command line) and everything the raylet started (workers, replicas)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if temp_dir in " ".join(proc.cmdline()):
                found[proc.pid] = proc
                if proc.name() == "raylet":
                    found.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            pass
    return list(found.values())


def ray_stop_force(processes: list[psutil.Process]) -> list[int]:
    """`ray stop --force` limited to `processes`: the same process keywords and matching
    (ray.autoscaler._private.constants.RAY_PROCESSES), the same SIGKILL. The real command
    kills every Ray process on the machine, other people's clusters included."""
    from ray.autoscaler._private.constants import RAY_PROCESSES

    killed = []
    for proc in processes:
        try:
            name, cmdline = proc.name(), subprocess.list2cmdline(proc.cmdline())
        except psutil.Error:
            continue
        if any(k in (name if by_name else cmdline) for k, by_name in RAY_PROCESSES):
            proc.kill()
            killed.append(proc.pid)
    return killed


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[dict]:
    """A Ray head node of the test's own (127.0.0.1, its own ports and temp dir)."""
    import tempfile

    # Short: Ray's socket paths under the temp dir must stay within 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-orphans-", dir="/tmp")
    gcs_port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "VLLM_HOST_IP": "127.0.0.1"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=1", "--include-dashboard=false",
         "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--node-manager-port={free_port()}",
         f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}"],
        check=True, env=env, capture_output=True, timeout=120,
    )
    try:
        yield {"address": f"127.0.0.1:{gcs_port}", "temp_dir": temp_dir, "env": env}
    finally:
        for proc in cluster_processes(temp_dir):  # whatever is left, the test's own only
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_stop_force_leaves_no_vllm_process(own_cluster: dict) -> None:
    import httpx

    http_port = free_port()
    ports = (TEST_PORT_BASE + 40, TEST_PORT_BASE + 50)
    args = app_args(prefill={"nixl_side_channel_port": ports[0]},
                    decode={"nixl_side_channel_port": ports[1]})
    driver = subprocess.run(
        [sys.executable, "-c", DRIVER, own_cluster["address"], str(http_port), json.dumps(args)],
        env=own_cluster["env"], capture_output=True, text=True, timeout=900,
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    line = next(x for x in driver.stdout.splitlines() if x.startswith("PIDS "))
    replicas = json.loads(line.removeprefix("PIDS "))
    engine_processes = [
        child for pid in replicas.values() for child in psutil.Process(pid).children(recursive=True)
    ]
    titles = " ".join(p.name() for p in engine_processes)
    assert "EngineCore" in titles and "Worker" in titles, titles
    response = httpx.post(
        f"http://127.0.0.1:{http_port}/v1/completions", timeout=60,
        json={"model": MODEL_NAME, "prompt": "still serving", "max_tokens": 4},
    )
    assert response.status_code == 200, response.text
    assert not any(port_is_free(p) for p in ports)  # both engines hold their side channel

    killed = ray_stop_force(cluster_processes(own_cluster["temp_dir"]))
    assert set(replicas.values()) <= set(killed)
    try:
        assert wait_for(lambda: not any(alive(p.pid) for p in engine_processes), 10, 0.2), [
            (p.pid, p.name()) for p in engine_processes if alive(p.pid)
        ]
        assert all(port_is_free(p) for p in ports)
    finally:
        kill_all([p.pid for p in engine_processes])
