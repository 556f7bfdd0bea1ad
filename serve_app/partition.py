"""One GPU, two tenants: what each phase's replica gets from Ray, MPS and the engine's memory.

Ray's `num_gpus` fraction only places the replicas on the same card; the SM split is MPS's
(`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, set before CUDA initialises, so it goes into the replica's
runtime_env) and the memory split is the engines' own (`gpu_memory_utilization` or a fixed KV
pool). On the CPU build, the same slots pin each engine to its own cores instead.
"""

from __future__ import annotations

from typing import Any

from serve_app.config import AppConfig
from serve_app.kv_transfer import kv_transfer_env
from serve_app.mps import mps_env


def phase_env(cfg: AppConfig, role: str) -> dict[str, str]:
    """The full environment of the `role` replica (inherited by its engine processes)."""
    phase = cfg.phase(role)
    env: dict[str, str] = {"VLLM_HOST_IP": "127.0.0.1"} if _is_local(cfg) else {}
    env.update(kv_transfer_env(cfg, role))
    if cfg.device == "cpu":
        env.update(_cpu_env(cfg, role))
    elif phase.sm_percentage is not None or phase.pinned_device_mem_limit is not None:
        env.update(
            mps_env(
                phase.sm_percentage,
                cfg.mps.pipe_dir,
                cfg.mps.log_dir,
                phase.pinned_device_mem_limit,
            )
        )
    env.update(phase.env)
    return env


def phase_actor_options(cfg: AppConfig, role: str) -> dict[str, Any]:
    """`ray_actor_options` of the `role` deployment."""
    phase = cfg.phase(role)
    return {
        "num_gpus": phase.num_gpus,
        "num_cpus": phase.num_cpus,
        "runtime_env": {"env_vars": phase_env(cfg, role)},
    }


def phase_memory_kwargs(cfg: AppConfig, role: str) -> dict[str, Any]:
    """The engine arguments that carry the phase's memory share."""
    phase = cfg.phase(role)
    kwargs: dict[str, Any] = {}
    if phase.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = phase.kv_cache_memory_bytes
    elif phase.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = phase.gpu_memory_utilization
    return kwargs


def _cpu_env(cfg: AppConfig, role: str) -> dict[str, str]:
    phase = cfg.phase(role)
    env = {}
    if phase.cpu_cores is not None:
        # vLLM's CPU worker busy-waits between steps: two engines sharing cores starve each other.
        env["VLLM_CPU_OMP_THREADS_BIND"] = phase.cpu_cores
        # EngineCore too, which vLLM leaves free to wait for its worker on any core.
        env["PD_SERVE_ENGINE_CORES"] = phase.cpu_cores
    if phase.cpu_kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(phase.cpu_kv_cache_gib)
    if phase.cpu_nice is not None:
        env["PD_SERVE_ENGINE_NICE"] = str(phase.cpu_nice)
    if phase.cpu_poll_sleep_us is not None:
        env["PD_SERVE_ENGINE_POLL_SLEEP_US"] = str(phase.cpu_poll_sleep_us)
    if phase.cpu_poll_spin_us is not None:
        env["PD_SERVE_ENGINE_POLL_SPIN_US"] = str(phase.cpu_poll_spin_us)
    return env


def _is_local(cfg: AppConfig) -> bool:
    return cfg.kv_transfer.side_channel_host.startswith("127.")
