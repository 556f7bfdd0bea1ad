"""NIXL connector settings per role: the `kv_transfer_config` and the environment of each engine.

Both engines run vLLM's `NixlConnector` as `kv_both`; which one prefills and which one decodes is
decided per request by `kv_transfer_params` (see `protocol.py`), not by the engine's role.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from serve_app.config import AppConfig

CONNECTOR = "NixlConnector"
# Same-GPU transfers need CUDA IPC / copy transports; without them UCX falls back to TCP through
# the host (vllm issue 52607: 0.5 GB/s instead of ~50 GB/s).
GPU_UCX_TLS = "cuda_ipc,cuda_copy,sm,self,tcp"


def kv_transfer_config(cfg: AppConfig, role: str) -> dict[str, Any]:
    """The vLLM `kv_transfer_config` of the `role` engine."""
    kv = cfg.kv_transfer
    return {
        "kv_connector": CONNECTOR,
        "kv_role": "kv_both",
        "kv_buffer_device": cfg.kv_buffer_device,
        # One per engine of the app: a pair's port is its own (`AppConfig.for_replica`).
        "engine_id": f"pd-serve-{role}-{cfg.phase(role).nixl_side_channel_port}",
        "kv_load_failure_policy": kv.load_failure_policy,
        "kv_connector_extra_config": {
            "kv_lease_duration": kv.lease_duration_s,
            "kv_recompute_threshold": kv.recompute_threshold_tokens,
            "num_threads": kv.num_threads,
        },
    }


def kv_transfer_env(cfg: AppConfig, role: str) -> dict[str, str]:
    """Environment variables the `role` engine's processes need for NIXL / UCX."""
    kv = cfg.kv_transfer
    env = {
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(cfg.phase(role).nixl_side_channel_port),
        "VLLM_NIXL_SIDE_CHANNEL_HOST": kv.side_channel_host,
        # vLLM sets this only if NIXL is not imported yet; our plugin may import it first.
        "UCX_RCACHE_MAX_UNRELEASED": "1024",
    }
    if kv.progress_delay_us is not None:
        env["PD_SERVE_NIXL_PROGRESS_DELAY_US"] = str(kv.progress_delay_us)
    if kv.ucx_tls and kv.ucx_tls != "auto":
        env["UCX_TLS"] = kv.ucx_tls
    elif cfg.device == "cuda":
        env["UCX_TLS"] = GPU_UCX_TLS
    if kv.side_channel_host.startswith("127."):
        # Keep UCX on loopback too: its default picks every interface it finds.
        env["UCX_NET_DEVICES"] = "lo"
    return env


def check_side_channel_free(cfg: AppConfig, role: str) -> None:
    """Raise naming the port and its config field if the `role` engine's NIXL side channel
    cannot be bound. vLLM binds it in a thread of EngineCore and waits for it without a timeout,
    so a port already taken (an orphaned engine, another app) would hang the start silently."""
    host = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", cfg.kv_transfer.side_channel_host)
    port = int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", cfg.phase(role).nixl_side_channel_port))
    field = f"{role}.nixl_side_channel_port"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As ZMQ binds it: a port left in TIME_WAIT is free, only a listener makes it taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RuntimeError(
                    f"NIXL side-channel port {port} on {host} ({field}) is already in use"
                    f"{_holder(port)}: stop what holds it or choose another {field}"
                ) from None
            raise RuntimeError(
                f"cannot bind the NIXL side channel {host}:{port} ({field}, "
                f"kv_transfer.side_channel_host): {exc.strerror}"
            ) from None


def _holder(port: int) -> str:
    """`by pid N (name)` for the process listening on `port`, where this process may see it."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                name = psutil.Process(conn.pid).name() if conn.pid else "?"
                return f" by pid {conn.pid} ({name})" if conn.pid else ""
    except Exception:  # noqa: BLE001 - only a hint in the message
        pass
    return ""
