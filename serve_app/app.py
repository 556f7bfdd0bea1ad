"""The serve YAML entry point: `import_path: serve_app.app:build_app` with the config as `args:`.

    Router (ingress) --> PrefillServer   (prompt, max_tokens=1, keeps the KV blocks)
                     \\-> DecodeServer    (reads the blocks over NIXL, generates, streams)

Both servers share one GPU: fractional `num_gpus`, an MPS SM cap each, a memory share each.
`pairs` such pairs run one per GPU, one per Ray node (`pairs.py`), a fixed count or as many as
Serve's autoscaler sets, the same for both servers (`policy/autoscale.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serve_app.config import AppConfig
from serve_app.pairs import REQUEST_ROUTER, check_cluster_holds, warn_unless_packed
from serve_app.partition import phase_actor_options
from serve_app.policy.autoscale import serve_autoscaling_config
from serve_app.router import Router
from serve_app.servers import DecodeServer, PrefillServer

# The servers' calls come from the Router (requests, and its health probes twice a second): the
# Router's access log is the one that tells what clients did.
SERVER_LOGGING = {"enable_access_log": False}
PAIR_ROUTER = RequestRouterConfig(request_router_class=REQUEST_ROUTER)


def _server_options(cfg: AppConfig, role: str) -> dict[str, Any]:
    """One replica per pair, at most one per node, routed by pair (`pairs.py`). An autoscaling
    `pairs` gives both server deployments the same policy, which sets them the same count
    (`policy/autoscale.py`); a removed replica finishes its requests first."""
    options: dict[str, Any] = {
        "ray_actor_options": phase_actor_options(cfg, role),
        "max_ongoing_requests": cfg.phase(role).max_ongoing_requests,
        "max_replicas_per_node": 1,
        "request_router_config": PAIR_ROUTER,
        "logging_config": SERVER_LOGGING,
    }
    scaling = cfg.pairs_autoscaling
    if scaling is None:
        options["num_replicas"] = cfg.pairs
    else:
        options["autoscaling_config"] = serve_autoscaling_config(scaling)
        options["graceful_shutdown_timeout_s"] = scaling.drain_timeout_s
    return options


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Validate `args` (raises pydantic's ValidationError naming the field) and bind the graph."""
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    cfg = _with_absolute_model_path(cfg)
    cfg_dict = cfg.model_dump(mode="json")
    gpus_per_pair = cfg.decode.num_gpus + (0.0 if cfg.is_unified else cfg.prefill.num_gpus)
    field = "pairs" if cfg.pairs_autoscaling is None else "pairs.min"
    check_cluster_holds(cfg.min_pairs, gpus_per_pair, field)
    if cfg.pairs_autoscaling is not None:
        warn_unless_packed()
    if cfg.is_unified:
        engine = DecodeServer.options(
            name="EngineServer", **_server_options(cfg, "decode")
        ).bind(cfg_dict)
        return _router(cfg, cfg_dict, None, engine)
    prefill = PrefillServer.options(**_server_options(cfg, "prefill")).bind(cfg_dict)
    decode = DecodeServer.options(**_server_options(cfg, "decode")).bind(cfg_dict, prefill)
    return _router(cfg, cfg_dict, prefill, decode)


def _router(cfg: AppConfig, cfg_dict: dict[str, Any], prefill: Any, decode: Any) -> Application:
    return Router.options(
        num_replicas=cfg.router.num_replicas,
        max_ongoing_requests=cfg.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.router.num_cpus},
    ).bind(cfg_dict, prefill, decode)


def _with_absolute_model_path(cfg: AppConfig) -> AppConfig:
    """A relative local model path means relative to where the app is built, not to wherever
    Ray starts the replicas' worker processes."""
    source = Path(cfg.model.source)
    if source.is_absolute() or not source.exists():
        return cfg
    model = cfg.model.model_copy(update={"source": str(source.resolve())})
    if cfg.model.served_model_name is None:
        model = model.model_copy(update={"served_model_name": cfg.model.source})
    return cfg.model_copy(update={"model": model})


# `serve build` needs an Application object, not a builder: the default (tiny model, CPU) one.
app = build_app()
