"""Ray Serve LLM's own prefill/decode app (`ray.serve.llm.build_pd_openai_app`) on this machine.

    python -m serve_app.bench.ray_llm_pd --port 8100 --model models/tiny-llama \\
        --served-model-name tiny-llama [--stock-nixl]

Starts a private Ray (127.0.0.1 only), Serve's HTTP proxy on 127.0.0.1:PORT and Ray's graph
ingress -> `PDDecodeServer` -> `PDPrefillServer`, each server with the same vLLM engine
arguments and environment as this app's `configs/local-cpu.yaml` (see `launch_common`). Prints
`READY http://127.0.0.1:PORT` once `/v1/models` answers; SIGTERM / SIGINT shuts Serve and Ray
down, stops anything they left behind by PID, and exits 0.

Ray LLM specifics handled here:
- A CPU-only machine needs CPU placement bundles: with no `placement_group_config` Ray LLM
  defaults to `GPUConfig` (`core/configs/llm_config.py`, `_resolve_accelerator_config`), whose
  engines get `distributed_executor_backend="ray"` (`engines/vllm/vllm_models.py`,
  `get_initialization_kwargs`), which vLLM's CPU platform refuses. `{"bundles": [{"CPU": 1}]}`
  makes it `CPUConfig` and the `mp` executor.
- `model` / `served_model_name` may not be engine kwargs; `model_loading_config` carries them.
- The engine's environment goes in `LLMConfig.runtime_env` (merged into the replica's
  `ray_actor_options.runtime_env` in `LLMServer.get_deployment_options`); an explicit
  `VLLM_NIXL_SIDE_CHANNEL_PORT` there takes precedence over Ray's own port base
  (`engines/vllm/kv_transfer/nixl.py`, `_set_side_channel_port`).
- `num_replicas: 1` everywhere (Ray LLM's default is an autoscaling config) and `num_cpus: 0`
  for the replica actors, as this app's config gives its own replicas.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from serve_app.bench.launch_common import (
    HOST,
    ROLES,
    Stop,
    announce_ready,
    build_parser,
    descendants,
    describe,
    engine_env,
    engine_kwargs,
    load_app_config,
    log,
    reap_leftovers,
    request_timeout_s,
    set_local_env,
    stop_on_signals,
    wait_http_ok,
)
from serve_app.config import AppConfig

APP_NAME = "ray-pd"


def placement_group_config(cfg: AppConfig, role: str) -> dict[str, Any]:
    """One bundle for the engine; the replica actor (0 CPUs) is merged into it by Ray LLM."""
    if cfg.device == "cpu":
        return {"bundles": [{"CPU": 1}], "strategy": "PACK"}
    # Ray LLM's fractional-GPU recipe (not exercised on this CPU-only machine).
    return {"bundles": [{"GPU": cfg.phase(role).num_gpus, "CPU": 1}], "strategy": "PACK"}


def llm_config(cfg: AppConfig, role: str) -> dict[str, Any]:
    """Ray LLM's `LLMConfig` (as a dict) of the `role` engine."""
    return {
        "model_loading_config": {"model_id": cfg.model.name, "model_source": cfg.model.source},
        "engine_kwargs": engine_kwargs(cfg, role),
        "runtime_env": {"env_vars": engine_env(cfg, role)},
        "placement_group_config": placement_group_config(cfg, role),
        "deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
    }


def pd_serving_args(cfg: AppConfig) -> dict[str, Any]:
    """The argument of `build_pd_openai_app` (validated there as `PDServingArgs`)."""
    return {
        "prefill_config": llm_config(cfg, "prefill"),
        "decode_config": llm_config(cfg, "decode"),
        "ingress_deployment_config": {
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": cfg.router.num_cpus},
        },
    }


def logical_cpus(cfg: AppConfig) -> int:
    """Enough logical CPUs for the placement bundles (one per engine) and the ingress."""
    needed = len(ROLES) + math.ceil(cfg.router.num_cpus)
    return max(needed, os.cpu_count() or 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser((__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--log-to-driver", action="store_true",
        help="stream the replicas' logs to this process's output (default: Ray's log files)",
    )
    args = parser.parse_args(argv)
    set_local_env()  # before Ray is imported
    cfg = load_app_config(args.config, args.model, args.served_model_name, args.stock_nixl)
    serving_args = pd_serving_args(cfg)
    log(describe(cfg))
    started = time.monotonic()
    code = 0
    with stop_on_signals() as stopper:
        try:
            import ray
            from ray import serve
            from ray.serve.llm import build_pd_openai_app

            ray.init(
                address="local",  # a new cluster of our own, never one left in /tmp/ray
                _node_ip_address=HOST,
                include_dashboard=False,
                num_cpus=logical_cpus(cfg),
                num_gpus=1 if cfg.device == "cuda" else 0,
                log_to_driver=args.log_to_driver,
            )
            # `ray.init` installs a SIGTERM handler of its own (sys.exit): ours again.
            stopper.install()
            log(f"Ray logs: {_session_dir(ray)}/logs")
            http_options: dict[str, Any] = {"host": HOST, "port": args.port}
            timeout = request_timeout_s(args.config)
            if timeout is not None:
                http_options["request_timeout_s"] = timeout
            serve.start(http_options=http_options)
            app = build_pd_openai_app(serving_args)
            serve.run(app, name=APP_NAME, route_prefix="/")
            wait_http_ok(f"http://{HOST}:{args.port}/v1/models", args.start_timeout_s)
            log(f"started in {time.monotonic() - started:.0f} s")
            announce_ready(args.port)
            while True:
                time.sleep(3600)
        except (Stop, SystemExit) as exc:
            log(f"stopping ({exc or 'signal'})")
        except BaseException as exc:  # noqa: BLE001 - reported, then everything is stopped
            log(f"failed: {exc!r}")
            code = 1
        finally:
            stopper.stopping = True  # a signal now must not interrupt the cleanup
            _shutdown_ray()
    return code


def _session_dir(ray: Any) -> str:
    try:
        return str(ray._private.worker._global_node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - only for the log line
        return "/tmp/ray/session_latest"


def _shutdown_ray() -> None:
    """Serve, then Ray, in order; then anything they left running, by PID."""
    procs = descendants(os.getpid())  # raylet, gcs_server, workers, engine processes
    if "ray" in sys.modules:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            except Exception as exc:  # noqa: BLE001 - Ray still has to go
                log(f"serve.shutdown failed: {exc!r}")
        try:
            ray.shutdown()
        except Exception as exc:  # noqa: BLE001
            log(f"ray.shutdown failed: {exc!r}")
    reap_leftovers(procs)


if __name__ == "__main__":
    sys.exit(main())
