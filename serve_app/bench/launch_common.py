"""What the side-by-side launchers (`ray_llm_pd`, `direct_pd`) share.

Both launch the *same* two engines as this app's `configs/local-cpu.yaml`: the settings are read
from that file (validated by `AppConfig`) and turned into vLLM arguments and environment by this
app's own functions (`engine_argv`, `kv_transfer_config`, `phase_env`), so the comparison differs
only in what sits between the client and the engines. `--stock-nixl` drops the NIXL progress
thread poll delay (`PD_SERVE_NIXL_PROGRESS_DELAY_US`), leaving NIXL's busy spin.

Every launcher prints `READY http://127.0.0.1:PORT` once `GET /v1/models` answers 200, keeps
running, and on SIGTERM / SIGINT stops everything it started (by PID) and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from serve_app.config import AppConfig
from serve_app.engine import _to_argv, engine_argv
from serve_app.kv_transfer import kv_transfer_config
from serve_app.partition import phase_env, phase_memory_kwargs

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "local-cpu.yaml"
ROLES = ("prefill", "decode")
HOST = "127.0.0.1"

# Before Ray or vLLM start: loopback only, no Ray auth / usage reporting.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_HOST_IP": HOST,
}


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    parser.add_argument("--model", required=True, help="model directory (or Hugging Face id)")
    parser.add_argument("--served-model-name", required=True, help="the model id clients send")
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG,
        help="serve YAML whose first application's args give the engine settings "
        "(default: configs/local-cpu.yaml)",
    )
    parser.add_argument(
        "--stock-nixl", action="store_true",
        help="leave PD_SERVE_NIXL_PROGRESS_DELAY_US out (NIXL's progress thread spins)",
    )
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    return parser


def load_serve_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def load_app_config(
    config_path: Path, model: str, served_model_name: str, stock_nixl: bool
) -> AppConfig:
    """The config's engine settings, serving `model` as `served_model_name`."""
    serve_yaml = load_serve_yaml(config_path)
    args = dict(serve_yaml["applications"][0].get("args") or {})
    args["model"] = {
        **(args.get("model") or {}),
        "source": model_source(model),
        "served_model_name": served_model_name,
    }
    if stock_nixl:
        args["kv_transfer"] = {**(args.get("kv_transfer") or {}), "progress_delay_us": None}
    cfg = AppConfig.model_validate(args)
    if cfg.is_unified:
        raise ValueError(f"{config_path} is a unified config: a PD launcher needs two engines")
    return cfg


def model_source(model: str) -> str:
    """An existing local folder as an absolute path (any working directory finds it), else the
    model id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def request_timeout_s(config_path: Path) -> float | None:
    value = (load_serve_yaml(config_path).get("http_options") or {}).get("request_timeout_s")
    return None if value is None else float(value)


def engine_kwargs(cfg: AppConfig, role: str) -> dict[str, Any]:
    """The `role` engine's vLLM arguments as keywords, without `model` / `served_model_name`.

    Exactly the arguments this app's `engine_argv` passes; checked, so the two cannot drift.
    """
    kwargs: dict[str, Any] = {
        "dtype": cfg.model.dtype,
        "kv_transfer_config": kv_transfer_config(cfg, role),
        "enable_prefix_caching": False,
    }
    if cfg.model.max_model_len is not None:
        kwargs["max_model_len"] = cfg.model.max_model_len
    kwargs.update(phase_memory_kwargs(cfg, role))
    kwargs.update(cfg.phase(role).engine_kwargs)
    ours = engine_argv(cfg, role)
    mine = _to_argv({"model": cfg.model.source, "served_model_name": cfg.model.name, **kwargs})
    if mine != ours:
        raise RuntimeError(f"{role} engine arguments differ from this app's: {mine} != {ours}")
    return kwargs


def engine_env(cfg: AppConfig, role: str) -> dict[str, str]:
    """The `role` engine's environment: NIXL side channel, UCX, CPU pinning, KV space."""
    return phase_env(cfg, role)


def describe(cfg: AppConfig) -> str:
    lines = []
    for role in ROLES:
        lines.append(f"{role} engine: {' '.join(engine_argv(cfg, role))}")
        lines.append(f"{role} env: {engine_env(cfg, role)}")
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def announce_ready(port: int) -> None:
    print(f"READY http://{HOST}:{port}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, timeout_s: float = 5.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def wait_http_ok(url: str, timeout_s: float, alive: Any = None, interval_s: float = 1.0) -> None:
    """Poll `url` until it answers 200; `alive()` returning False aborts (process died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"gave up waiting for {url}: the server exited")
        if http_ok(url):
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")


class Stop(Exception):
    """Raised in the main thread by the first SIGTERM / SIGINT."""


class SignalStop:
    """The first SIGTERM / SIGINT raises `Stop` in the main thread; later ones are ignored so
    that the cleanup they triggered runs to the end. `install()` again after a library (Ray)
    replaced the handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.stopping:
            return
        self.stopping = True
        raise Stop(signal.Signals(signum).name)

    def install(self) -> None:
        for sig in self.SIGNALS:
            old = signal.signal(sig, self._handler)
            self._previous.setdefault(sig, old)

    def restore(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[SignalStop]:
    stopper = SignalStop()
    stopper.install()
    try:
        yield stopper
    finally:
        stopper.restore()


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def describe_procs(procs: Iterable[psutil.Process]) -> str:
    parts = []
    for proc in procs:
        try:
            parts.append(f"{proc.pid}:{proc.name()}")
        except psutil.NoSuchProcess:
            continue
    return ", ".join(parts)


def terminate(procs: Sequence[psutil.Process], grace_s: float = 30.0) -> list[psutil.Process]:
    """SIGTERM each process (by PID), SIGKILL whatever is left after `grace_s`.

    Returns the processes that were still alive when SIGKILL was sent."""
    alive = [p for p in procs if _running(p)]
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return alive


def reap_leftovers(procs: Sequence[psutil.Process], wait_s: float = 10.0) -> None:
    """After an orderly shutdown: give `procs` `wait_s` to exit, then stop the rest by PID."""
    _, alive = psutil.wait_procs([p for p in procs if _running(p)], timeout=wait_s)
    if alive:
        log(f"stopping processes left after shutdown: {describe_procs(alive)}")
        terminate(alive, grace_s=10.0)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Ray Serve's throughput-optimized mode as `scripts/serve-local` sets it (see there): the ingress
# replica serves HTTP itself from INGRESS_PORT on. Values already in the environment win
# (RAY_SERVE_THROUGHPUT_OPTIMIZED=0: every request through Serve's proxy).
INGRESS_PORT = 8001
THROUGHPUT_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(INGRESS_PORT),
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "8100",
    "RAY_SERVE_PORT_QUARANTINE_S": "0",
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serve_app.policy.door:middlewares",
}


def set_local_env() -> None:
    """Loopback-only settings and Serve's throughput mode; must run before Ray or vLLM is
    imported."""
    os.environ.update(LOCAL_ENV)
    for key, value in THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.pop("RAY_ADDRESS", None)
