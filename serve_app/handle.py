"""Reach a running app from another Python process on the same machine, through a handle.

    from serve_app.handle import app_handle
    router = app_handle("pd")

The local cluster (`make run`) listens on 127.0.0.1 only. A process whose Ray is imported without
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in its environment rewrites 127.0.0.1 to the machine's other
address and dials the GCS there, where nothing listens: `serve.get_app_handle` then hangs.
`app_handle` sets the variable while Ray is not imported yet and connects on loopback; where Ray
was imported first without it, it fails at once and says what to set.

`router_urls` (or `python -m serve_app.handle --router-urls`) lists the HTTP addresses where the
app's Router replicas answer themselves, when Ray Serve's direct ingress is on (`make run`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
ROUTER_LOOP_ENV = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"


class LoopbackClusterError(RuntimeError):
    """Ray was imported in a way that cannot reach a loopback-only cluster."""


def app_handle(name: str = "pd", address: str = "auto") -> Any:
    """The Router handle of the app `name` on the local cluster (`address`: `auto`, or the
    GCS `host:port`). Connects this process to Ray if it is not connected yet."""
    _connect(address)
    from ray import serve

    return serve.get_app_handle(name)


def router_urls(name: str = "pd", address: str = "auto") -> list[str]:
    """Where the Router replicas of app `name` serve HTTP themselves (Ray Serve's direct
    ingress: no hop through Serve's proxy), as `http://host:port`; empty when it is off."""
    _connect(address)
    import ray
    from ray.serve.context import _get_global_client

    # The controller's target groups are what a load balancer in front of direct ingress reads
    # (ray.serve.schema.TargetGroup, public alpha); with direct ingress off they name the proxies.
    controller = _get_global_client()._controller
    groups = ray.get(controller.get_target_groups.remote(name))
    return [
        f"http://{target.ip}:{target.port}"
        for group in groups
        if group.ingress_deployment_name and group.protocol == "HTTP"
        for target in group.targets
    ]


def _connect(address: str) -> None:
    if "ray" not in sys.modules:
        os.environ.setdefault(ENV, "0")
    if "ray.serve" not in sys.modules:
        # A shell that exported RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (as `make run` sets for its own
        # processes) would also turn off the handle's own router loop, and a plain script's
        # `.result()` then fails for want of a running event loop.
        os.environ.setdefault(ROUTER_LOOP_ENV, "1")
    import ray

    if not ray.is_initialized():
        check_loopback_reachable(address)
        ray.init(address=address, log_to_driver=False)


def check_loopback_reachable(address: str) -> None:
    """Raise `LoopbackClusterError` naming the fix if this process's Ray would dial the
    machine's other address for a cluster on 127.0.0.1 (`address`, or the one Ray last
    started on this machine for `auto`)."""
    from ray._private import ray_constants
    from ray._private.utils import read_ray_address

    target = (read_ray_address() or "") if address == "auto" else address
    is_loopback = target.startswith(("127.", "localhost"))
    if is_loopback and ray_constants.ENABLE_RAY_CLUSTER:
        raise LoopbackClusterError(
            f"this process imported Ray without {ENV}=0, so it would dial this machine's "
            "other address for the local (127.0.0.1-only) cluster and hang: run it with "
            f"{ENV}=0 in its environment, or call serve_app.handle.app_handle before "
            "importing ray"
        )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="The local app's Router addresses.")
    parser.add_argument("--router-urls", action="store_true", required=True,
                        help="print each HTTP address where a Router replica answers itself")
    parser.add_argument("--app", default="pd")
    parser.add_argument("--address", default="auto", help="the GCS host:port, or auto")
    args = parser.parse_args(argv)
    for url in router_urls(args.app, args.address):
        print(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
