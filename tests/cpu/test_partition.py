"""One GPU, two tenants: what each deployment gets (Ray fractions, MPS, UCX/NIXL, CPU pinning),
which splits the schema refuses, and the engine arguments each phase's vLLM is started with.

Building the app only binds deployments (no Ray, no engine), so these tests walk the bound graph
that `serve run` would deploy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application

from serve_app.app import build_app
from serve_app.config import AppConfig
from serve_app.engine import engine_argv, parse_engine_args
from serve_app.partition import phase_actor_options, phase_env
from tests.cpu.conftest import ROOT, TINY_MODEL, app_args

CONFIGS = ROOT / "configs"


def preset_args(name: str, **overrides: Any) -> dict[str, Any]:
    """A preset's `args:` with `overrides` merged one level deep (like conftest's `app_args`)."""
    (application,) = yaml.safe_load((CONFIGS / name).read_text())["applications"]
    args = application["args"]
    if args["model"]["source"] == "models/tiny-llama":
        args["model"]["source"] = str(TINY_MODEL)
    for key, value in overrides.items():
        args[key] = {**args.get(key, {}), **value} if isinstance(value, dict) else value
    return args


def gpu_args(**overrides: Any) -> dict[str, Any]:
    return preset_args("h100-llama3.1-8b-pd.yaml", **overrides)


def bound_deployments(app: Application) -> dict[str, Any]:
    """Every deployment in the bound graph by name (Ray 2.60: `Application._bound_deployment`,
    whose `init_args` / `init_kwargs` hold the child applications)."""
    found: dict[str, Any] = {}
    pending = [app]
    while pending:
        deployment = pending.pop()._bound_deployment
        found[deployment.name] = deployment
        children = [*deployment.init_args, *deployment.init_kwargs.values()]
        pending += [child for child in children if isinstance(child, Application)]
    return found


def env_of(deployment: Any) -> dict[str, str]:
    return deployment.ray_actor_options["runtime_env"]["env_vars"]


# --- building binds, it does not start anything ---------------------------------------------


def run_in_fresh_interpreter(script: str) -> None:
    """Run `script` in a new Python process (clean `sys.modules`, no Ray); it must succeed."""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_build_app_does_not_start_ray() -> None:
    script = (
        "import ray\n"
        "from serve_app.app import build_app\n"
        "from tests.cpu.conftest import app_args\n"
        "build_app(app_args())\n"
        "assert not ray.is_initialized(), 'build_app started Ray'\n"
    )
    run_in_fresh_interpreter(script)


def test_disaggregated_graph_is_router_prefill_decode() -> None:
    deployments = bound_deployments(build_app(gpu_args()))
    assert set(deployments) == {"Router", "PrefillServer", "DecodeServer"}
    router, prefill, decode = (deployments[n] for n in ("Router", "PrefillServer", "DecodeServer"))
    assert router.init_args[1]._bound_deployment is prefill
    assert router.init_args[2]._bound_deployment is decode
    assert decode.init_args[1]._bound_deployment is prefill
    # Every replica re-validates the same config it was built from.
    assert AppConfig.model_validate(prefill.init_args[0]) == AppConfig.model_validate(gpu_args())


@pytest.mark.parametrize("preset", ["h100-llama3.1-8b-unified.yaml", "unified-cpu.yaml"])
def test_unified_graph_is_router_and_one_engine(preset: str) -> None:
    deployments = bound_deployments(build_app(preset_args(preset)))
    assert set(deployments) == {"Router", "EngineServer"}
    assert deployments["Router"].init_args[1] is None
    engine = deployments["EngineServer"]
    assert engine.ray_actor_options["num_gpus"] == 1.0
    argv = engine_argv(AppConfig.model_validate(preset_args(preset)), "decode")
    assert "--kv-transfer-config" not in argv
    assert "--enable-chunked-prefill" in argv


# --- what each replica gets on a GPU ---------------------------------------------------------


def test_gpu_phases_get_their_fractions_and_mps_shares() -> None:
    deployments = bound_deployments(build_app(gpu_args()))
    prefill, decode = deployments["PrefillServer"], deployments["DecodeServer"]
    assert prefill.ray_actor_options["num_gpus"] == 0.8
    assert decode.ray_actor_options["num_gpus"] == 0.2
    for deployment, share in ((prefill, "80"), (decode, "20")):
        env = env_of(deployment)
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == share
        # Client and daemon meet on the same pipe dir (deploy/mps/start.sh's default).
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/pd-serve-mps/pipe"
        assert env["CUDA_MPS_LOG_DIRECTORY"] == "/tmp/pd-serve-mps/log"
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env
        assert not any(key.startswith("VLLM_CPU_") for key in env)
        # The preset leaves NIXL's progress thread spinning on a many-core host.
        assert "PD_SERVE_NIXL_PROGRESS_DELAY_US" not in env


def test_gpu_mps_directories_and_pinned_limit_follow_the_config() -> None:
    cfg = AppConfig.model_validate(
        gpu_args(
            mps={"pipe_dir": "/run/mps/pipe", "log_dir": "/run/mps/log"},
            prefill={"pinned_device_mem_limit": "40G"},
        )
    )
    prefill, decode = phase_env(cfg, "prefill"), phase_env(cfg, "decode")
    assert prefill["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=40G"
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in decode
    for env in (prefill, decode):
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps/pipe"
        assert env["CUDA_MPS_LOG_DIRECTORY"] == "/run/mps/log"


def test_gpu_pinned_limit_without_sm_share_is_refused() -> None:
    # The MPS preflight runs only for an SM share: a memory cap alone would go unchecked.
    with pytest.raises(ValidationError, match="decode.pinned_device_mem_limit is an MPS limit"):
        AppConfig.model_validate(
            gpu_args(decode={"sm_percentage": None, "pinned_device_mem_limit": "30G"})
        )


def test_gpu_ucx_uses_same_gpu_transports_on_loopback() -> None:
    cfg = AppConfig.model_validate(gpu_args())
    ports = set()
    for role in ("prefill", "decode"):
        env = phase_env(cfg, role)
        transports = env["UCX_TLS"].split(",")
        assert {"cuda_ipc", "cuda_copy"} <= set(transports)
        assert env["UCX_NET_DEVICES"] == "lo"
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
        assert env["VLLM_HOST_IP"] == "127.0.0.1"
        ports.add(env["VLLM_NIXL_SIDE_CHANNEL_PORT"])
    assert ports == {"5600", "5610"}


def test_gpu_ucx_tls_defaults_to_same_gpu_transports_and_can_be_overridden() -> None:
    unset = AppConfig.model_validate(gpu_args(kv_transfer={"ucx_tls": None}))
    assert "cuda_ipc" in phase_env(unset, "decode")["UCX_TLS"]
    explicit = AppConfig.model_validate(gpu_args(kv_transfer={"ucx_tls": "rc,cuda_copy"}))
    assert phase_env(explicit, "decode")["UCX_TLS"] == "rc,cuda_copy"


def test_remote_side_channel_keeps_ucx_off_loopback() -> None:
    cfg = AppConfig.model_validate(gpu_args(kv_transfer={"side_channel_host": "10.0.0.5"}))
    env = phase_env(cfg, "prefill")
    assert "UCX_NET_DEVICES" not in env
    assert "VLLM_HOST_IP" not in env
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.5"


def test_phase_env_overrides_come_last() -> None:
    cfg = AppConfig.model_validate(gpu_args(decode={"env": {"UCX_TLS": "tcp", "X_FOO": "1"}}))
    env = phase_env(cfg, "decode")
    assert env["UCX_TLS"] == "tcp"
    assert env["X_FOO"] == "1"
    assert phase_env(cfg, "prefill")["UCX_TLS"] != "tcp"


# --- what each replica gets on the CPU build -------------------------------------------------


def test_cpu_phases_are_pinned_to_their_own_cores() -> None:
    cfg = AppConfig.model_validate(app_args())
    deployments = bound_deployments(build_app(cfg))
    prefill, decode = deployments["PrefillServer"], deployments["DecodeServer"]
    assert (prefill.ray_actor_options["num_gpus"], decode.ray_actor_options["num_gpus"]) == (
        0.8,
        0.2,
    )
    assert prefill.ray_actor_options["num_cpus"] == decode.ray_actor_options["num_cpus"] == 0
    cores = []
    for deployment in (prefill, decode):
        env = env_of(deployment)
        cores.append(env["VLLM_CPU_OMP_THREADS_BIND"])
        assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
        assert env["PD_SERVE_NIXL_PROGRESS_DELAY_US"] == "20000"
        assert env["UCX_NET_DEVICES"] == "lo"
        assert not any(key.startswith("CUDA_MPS_") for key in env)
        # No same-GPU transports to ask for on a CPU; UCX picks its own.
        assert "UCX_TLS" not in env
    assert cores == ["0", "1"]
    ports = [env_of(d)["VLLM_NIXL_SIDE_CHANNEL_PORT"] for d in (prefill, decode)]
    assert ports == [str(p.nixl_side_channel_port) for p in (cfg.prefill, cfg.decode)]
    assert len(set(ports)) == 2


def test_cpu_ucx_tls_auto_asks_for_no_gpu_transports() -> None:
    cfg = AppConfig.model_validate(app_args(kv_transfer={"ucx_tls": "auto"}))
    assert "UCX_TLS" not in phase_env(cfg, "prefill")


def test_phase_actor_options_match_the_bound_deployment() -> None:
    cfg = AppConfig.model_validate(app_args())
    deployments = bound_deployments(build_app(cfg))
    assert deployments["PrefillServer"].ray_actor_options == phase_actor_options(cfg, "prefill")
    assert deployments["DecodeServer"].ray_actor_options == phase_actor_options(cfg, "decode")


# --- splits the schema refuses ---------------------------------------------------------------

IMPOSSIBLE_SPLITS = {
    "num_gpus sum > 1": (
        gpu_args(prefill={"num_gpus": 0.9}),
        ["prefill.num_gpus + decode.num_gpus", "1.1", "<= 1"],
    ),
    "memory shares over 1 - headroom": (
        gpu_args(prefill={"gpu_memory_utilization": 0.5}, decode={"gpu_memory_utilization": 0.5}),
        [
            "prefill.gpu_memory_utilization + decode.gpu_memory_utilization",
            "<= 0.95",
            "memory_headroom",
        ],
    ),
    "memory shares over a larger headroom": (
        gpu_args(memory_headroom=0.2),
        ["= 0.9 must be <= 0.8", "memory_headroom"],
    ),
    "sm_percentage 0": (
        gpu_args(prefill={"sm_percentage": 0}),
        ["prefill.sm_percentage", "greater than or equal to 1"],
    ),
    "sm_percentage 101": (
        gpu_args(decode={"sm_percentage": 101}),
        ["decode.sm_percentage", "less than or equal to 100"],
    ),
    "equal NIXL ports": (
        gpu_args(decode={"nixl_side_channel_port": 5600}),
        ["prefill.nixl_side_channel_port and decode.nixl_side_channel_port must differ", "5600"],
    ),
    "sm_percentage on cpu": (
        app_args(decode={"sm_percentage": 20}),
        ["decode.sm_percentage", "device: cuda"],
    ),
    "parallel start without fixed pools on cuda": (
        gpu_args(
            start_order="parallel",
            prefill={"kv_cache_memory_bytes": 8 << 30, "gpu_memory_utilization": None},
        ),
        ["start_order: parallel", "decode.kv_cache_memory_bytes", "prefill_first"],
    ),
    "engine_kwargs sets model": (
        gpu_args(prefill={"engine_kwargs": {"model": "other/model"}}),
        ["prefill.engine_kwargs", "may not set ['model']"],
    ),
    "engine_kwargs sets a reserved flag in dashed form": (
        gpu_args(decode={"engine_kwargs": {"gpu-memory-utilization": 0.9}}),
        ["decode.engine_kwargs", "gpu_memory_utilization"],
    ),
    "unknown phase field": (
        gpu_args(decode={"num_gpu": 0.2}),
        ["decode.num_gpu", "Extra inputs are not permitted"],
    ),
    "unknown top-level field": (
        gpu_args(prefil={"num_gpus": 0.5}),
        ["prefil", "Extra inputs are not permitted"],
    ),
    "port out of range": (
        gpu_args(prefill={"nixl_side_channel_port": 80}),
        ["prefill.nixl_side_channel_port", "greater than or equal to 1024"],
    ),
}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE_SPLITS))
def test_impossible_split_is_refused_with_field_and_range(case: str) -> None:
    args, fragments = IMPOSSIBLE_SPLITS[case]
    with pytest.raises(ValidationError) as error:
        AppConfig.model_validate(args)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_build_app_refuses_before_binding() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        build_app(gpu_args(decode={"nixl_side_channel_port": 5600}))


def test_parallel_start_is_allowed_with_fixed_pools_or_on_cpu() -> None:
    pools = {"kv_cache_memory_bytes": 8 << 30, "gpu_memory_utilization": None}
    AppConfig.model_validate(gpu_args(start_order="parallel", prefill=pools, decode=pools))
    AppConfig.model_validate(app_args(start_order="parallel"))


def test_presets_sit_at_the_edge_the_validators_allow() -> None:
    # The sum of the fractions may be exactly 1 (0.8 + 0.2 in floating point is fine).
    assert AppConfig.model_validate(gpu_args()).prefill.num_gpus == 0.8
    AppConfig.model_validate(
        gpu_args(prefill={"gpu_memory_utilization": 0.4}, decode={"gpu_memory_utilization": 0.55})
    )


# --- engine arguments ------------------------------------------------------------------------


def kv_transfer_config_of(argv: list[str]) -> dict[str, Any]:
    return json.loads(argv[argv.index("--kv-transfer-config") + 1])


@pytest.mark.parametrize(
    ("args", "buffer_device"), [(app_args(), "cpu"), (gpu_args(), "cuda")], ids=["cpu", "cuda"]
)
def test_engine_argv_carries_the_nixl_connector(args: dict[str, Any], buffer_device: str) -> None:
    cfg = AppConfig.model_validate(args)
    engine_ids = set()
    for role in ("prefill", "decode"):
        kv = kv_transfer_config_of(engine_argv(cfg, role))
        assert kv["kv_connector"] == "NixlConnector"
        assert kv["kv_role"] == {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
        assert kv["kv_buffer_device"] == buffer_device
        assert kv["kv_connector_extra_config"]["kv_lease_duration"] == 120
        engine_ids.add(kv["engine_id"])
    assert len(engine_ids) == 2


def test_engine_argv_carries_each_phases_memory_share() -> None:
    cfg = AppConfig.model_validate(gpu_args())
    for role, share in (("prefill", "0.35"), ("decode", "0.55")):
        argv = engine_argv(cfg, role)
        assert argv[argv.index("--gpu-memory-utilization") + 1] == share
        assert argv[argv.index("--max-model-len") + 1] == "8192"
        assert argv[argv.index("--model") + 1] == "meta-llama/Llama-3.1-8B-Instruct"


def test_engine_argv_explicit_buffer_device_wins() -> None:
    cfg = AppConfig.model_validate(app_args(kv_transfer={"buffer_device": "cuda"}))
    assert kv_transfer_config_of(engine_argv(cfg, "prefill"))["kv_buffer_device"] == "cuda"


def test_engine_module_imports_no_vllm() -> None:
    script = (
        "import sys\n"
        "from serve_app.config import AppConfig\n"
        "from serve_app.engine import engine_argv\n"
        "engine_argv(AppConfig(), 'prefill')\n"
        "assert 'vllm' not in sys.modules, 'serve_app.engine imported vLLM'\n"
    )
    run_in_fresh_interpreter(script)


def test_vllm_parses_the_local_cpu_engine_args() -> None:
    """vLLM's own parser accepts what `engine_argv` produces (imports vLLM: ~10 s, once)."""
    cfg = AppConfig.model_validate(app_args())
    prefill = parse_engine_args(engine_argv(cfg, "prefill"))
    assert Path(prefill.model) == TINY_MODEL
    assert prefill.max_model_len == 2048
    assert prefill.block_size == 32
    assert prefill.enable_prefix_caching is False
    kv = prefill.kv_transfer_config
    kv = kv if isinstance(kv, dict) else kv.model_dump() if hasattr(kv, "model_dump") else vars(kv)
    assert kv["kv_connector"] == "NixlConnector"
    assert kv["kv_buffer_device"] == "cpu"
    unified = AppConfig.model_validate(app_args(mode="unified"))
    assert parse_engine_args(engine_argv(unified, "decode")).kv_transfer_config is None


def test_invalid_config_fails_at_build_time_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"prefill\.num_gpus \+ decode\.num_gpus = 1\.1"):
        build_app(app_args(prefill={"num_gpus": 0.9}, decode={"num_gpus": 0.2}))
    with pytest.raises(ValidationError, match=r"decode\.sm_percentage"):
        build_app(gpu_args(decode={"sm_percentage": 150}))
    with pytest.raises(ValidationError, match=r"kv_transfer\.lease_duration_s"):
        build_app(app_args(kv_transfer={"lease_duration_s": 1}))
