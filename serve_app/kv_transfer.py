"""NIXL connector settings per role: the `kv_transfer_config` and the environment of each engine.

Both engines run vLLM's `NixlConnector`, prefill as `kv_producer` and decode as `kv_consumer`
(vLLM 0.32 deprecates `kv_both`). Whether a request is handed over is decided per request by
`kv_transfer_params` (see `protocol.py`); a request without them runs whole on either engine
(decode-local, whole on prefill, failover), which neither role prevents.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from typing import IO, Any

from serve_app.config import AppConfig

CONNECTOR = "NixlConnector"
# Same-GPU transfers need CUDA IPC / copy transports; without them UCX falls back to TCP through
# the host (vllm issue 52607: 0.5 GB/s instead of ~50 GB/s).
GPU_UCX_TLS = "cuda_ipc,cuda_copy,sm,self,tcp"
# Prefill only ever gives KV, decode only ever takes it.
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


def kv_transfer_config(cfg: AppConfig, role: str) -> dict[str, Any]:
    """The vLLM `kv_transfer_config` of the `role` engine."""
    kv = cfg.kv_transfer
    return {
        "kv_connector": CONNECTOR,
        "kv_role": KV_ROLES[role],
        "kv_buffer_device": cfg.kv_buffer_device,
        # One per engine in the cluster: a port is one engine's on its host (`claim_side_channel`),
        # and decode keys what it learnt of a prefill engine (its NIXL agent) by this id.
        "engine_id": f"pd-serve-{role}-{socket.gethostname()}-{cfg.phase(role).nixl_side_channel_port}",
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


def claim_side_channel(cfg: AppConfig, role: str) -> tuple[AppConfig, IO[str]]:
    """`cfg` with the `role` engine's NIXL side-channel port set to the first of its pair ports
    (`nixl_side_channel_port + 0..max_pairs-1`) that no other replica on this host has claimed
    and nothing listens on, and the claim: an flock to keep open for the replica's life (its
    end, or the process's, frees the port for the next replica).

    Ports come from claims rather than from Serve's replica ranks: Serve renumbers the ranks
    when replicas leave, so a new replica's rank can be the one whose port a replica that
    stayed on the same host still holds. A port held by something else (an orphaned engine,
    another app) is passed over where there are others, and named in the error where none is
    left."""
    import fcntl

    base = cfg.phase(role).nixl_side_channel_port
    taken: list[str] = []
    for slot in range(cfg.max_pairs):
        port = base + slot
        path = os.path.join(tempfile.gettempdir(), f"pd-serve-nixl-port-{port}.lock")
        claim = open(path, "a")  # noqa: SIM115 - held open while the replica lives
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            claim.close()
            taken.append(f"{port} is another replica's on this host")
            continue
        candidate = cfg.for_replica(role, slot)
        try:
            check_side_channel_free(candidate, role, port)
        except RuntimeError as exc:
            claim.close()
            if cfg.max_pairs == 1:
                raise
            taken.append(str(exc))
            continue
        return candidate, claim
    raise RuntimeError(
        f"no free NIXL side-channel port for a {role} engine on this host: "
        + "; ".join(taken)
        + f" ({role}.nixl_side_channel_port + 0..{cfg.max_pairs - 1}, one per pair)"
    )


def check_side_channel_free(cfg: AppConfig, role: str, port: int | None = None) -> None:
    """Raise naming the port and its config field if the `role` engine's NIXL side channel
    cannot be bound. vLLM binds it in a thread of EngineCore and waits for it without a timeout,
    so a port already taken (an orphaned engine, another app) would hang the start silently."""
    host = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", cfg.kv_transfer.side_channel_host)
    if port is None:
        port = int(
            os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", cfg.phase(role).nixl_side_channel_port)
        )
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
