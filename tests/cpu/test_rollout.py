"""Safe rollouts: a `serve deploy` that changes one phase's engine restarts only that engine, in
place, and a change that breaks KV compatibility never hands KV between the two layouts.

The app is deployed declaratively, through the controller's `apply_config`, the call `serve
deploy` makes over the REST API. The rollout changes the KV block size of decode, then of both
phases (the second deploy finds decode already changed and restarts prefill only), while a
client keeps sending greedy requests, streamed and not. Every request must answer 200 with the
tokens an undisturbed pair gives; the routes must go through decode-only while the layouts
differ and come back to disaggregated when they match.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cpu.conftest import MODEL_NAME, app_args

APP = "rollout"
PROMPTS = [
    " ".join(f"step {i} of the rollout plan" for i in range(k, k + 40)) for k in range(0, 120, 40)
]


def deploy(http_port: int, user_configs: dict[str, dict[str, Any]]) -> None:
    """What `serve deploy` does with a config of this app and these `deployments:` entries."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    router = app_args()["router"]
    router.update(failover={"probe_period_s": 0.25, "probe_timeout_s": 2.0})
    config = {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{
            "name": APP,
            "route_prefix": "/",
            "import_path": "serve_app.app:build_app",
            "args": app_args(router=router),
            "deployments": [
                {"name": name, "user_config": user_config}
                for name, user_config in user_configs.items()
            ],
        }],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def wait_running(timeout_s: float = 600) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "RUNNING":
            return
        time.sleep(1)
    raise AssertionError(f"{APP} not running within {timeout_s} s")


@pytest.fixture(scope="module")
def app(tiny_model: Any, http_port: int) -> Iterator[dict[str, Any]]:
    from ray import serve

    deploy(http_port, {})
    wait_running()
    yield {
        "url": f"http://127.0.0.1:{http_port}/v1/completions",
        "prefill": serve.get_deployment_handle("PrefillServer", app_name=APP),
        "decode": serve.get_deployment_handle("DecodeServer", app_name=APP),
        "port": http_port,
    }
    serve.delete(APP)


def ask(client: httpx.Client, url: str, prompt: str, stream: bool) -> tuple[int, str, str]:
    """(status, route, text) of one greedy completion."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    with client.stream("POST", url, json=body) as response:
        raw = response.read().decode()
    route = response.headers.get("x-pd-route", "")
    if response.status_code != 200:
        return response.status_code, route, raw
    if not stream:
        return 200, route, json.loads(raw)["choices"][0]["text"]
    text = ""
    for line in raw.splitlines():
        data = line.removeprefix("data: ").strip()
        if data and data != "[DONE]":
            chunk = json.loads(data)
            if "error" in chunk:
                return 500, route, data
            text += "".join(choice["text"] for choice in chunk["choices"])
    return 200, route, text


class Load:
    """A client sending the prompts in turn, streamed and not, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[int, int, str, str, float]] = []
        """(prompt, status, route, text, seconds) per request."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            i = 0
            while not self._stop.is_set():
                index, started = i % len(PROMPTS), time.monotonic()
                answer = ask(client, self.url, PROMPTS[index], i % 2 == 1)
                self.results.append((index, *answer, time.monotonic() - started))
                i += 1

    def routes(self) -> list[str]:
        return [route for _, _, route, _, _ in self.results]

    def wait_for_route(self, route: str, timeout_s: float) -> None:
        seen = len(self.results)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if route in self.routes()[seen:]:
                return
            time.sleep(0.5)
        raise AssertionError(f"no {route!r} within {timeout_s} s: {set(self.routes()[seen:])}")


def engine_started(handle: Any) -> tuple[int, float]:
    stats = handle.stats.remote().result()
    return stats["pid"], stats["engine_ready_at"]


def wait_restarted(handle: Any, before: tuple[int, float], timeout_s: float = 600) -> None:
    """The engine restarted in the same replica process (no new actor)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid, ready_at = engine_started(handle)
        if ready_at != before[1]:
            assert pid == before[0], "the replica was replaced, not reconfigured"
            return
        time.sleep(1)
    raise AssertionError(f"the engine did not restart within {timeout_s} s")


def test_rollout_of_an_incompatible_kv_layout_fails_no_request(app: dict[str, Any]) -> None:
    with httpx.Client(timeout=120) as client:
        expected = [ask(client, app["url"], prompt, False) for prompt in PROMPTS]
    assert {route for _, route, _ in expected} == {"disaggregated; reason=always"}
    prefill_before, decode_before = engine_started(app["prefill"]), engine_started(app["decode"])
    block_64 = {"engine_kwargs": {"block_size": 64}}  # CPU attention: multiples of 32

    with Load(app["url"]) as load:
        load.wait_for_route("disaggregated; reason=always", 60)
        deploy(app["port"], {"DecodeServer": block_64})
        wait_restarted(app["decode"], decode_before)
        load.wait_for_route("decode_only; reason=incompatible", 60)
        assert engine_started(app["prefill"]) == prefill_before  # prefill kept serving

        deploy(app["port"], {"DecodeServer": block_64, "PrefillServer": block_64})
        wait_restarted(app["prefill"], prefill_before)
        load.wait_for_route("disaggregated; reason=always", 60)
        decode_after = engine_started(app["decode"])
        time.sleep(5)
    wait_running()
    assert engine_started(app["decode"]) == decode_after  # the second deploy left decode alone

    routes = load.routes()
    print(f"rollout: {len(routes)} requests, routes {sorted(set(routes))}")
    failed = [(status, text) for _, status, _, text, _ in load.results if status != 200]
    assert not failed, failed[:3]
    wrong = [(i, text) for i, _, _, text, _ in load.results if text != expected[i][2]]
    assert not wrong, wrong[:3]
    assert "decode_only; reason=incompatible" in routes
    # Decode restarting: prefill ran whole requests; prefill restarting: decode did.
    assert {"prefill_only; reason=decode_down", "prefill_only; reason=fallback"} & set(routes)
    assert {"decode_only; reason=prefill_down", "decode_only; reason=fallback"} & set(routes)
    # Printed, not asserted (timings are benchmarks here, not tests): 2.4 s in one run, 47.9 s
    # in another, where one request waited ~44 s around decode's restart (cause not found yet).
    slowest = max(elapsed for *_, elapsed in load.results)
    print(f"rollout: slowest request {slowest:.1f} s")


def test_a_bad_user_config_names_the_field() -> None:
    from pydantic import ValidationError

    from serve_app.config import AppConfig, EngineUpdate

    with pytest.raises(ValidationError, match="engine_kwargs may not set"):
        EngineUpdate.model_validate({"engine_kwargs": {"model": "other"}})
    with pytest.raises(ValidationError, match="drain_timeout_s"):
        EngineUpdate.model_validate({"drain_timeout_s": -1})
    with pytest.raises(ValidationError, match="Extra inputs"):
        EngineUpdate.model_validate({"block_size": 16})
    cfg = AppConfig.model_validate(app_args())
    updated = EngineUpdate(engine_kwargs={"block_size": 64}).apply(cfg, "decode")
    assert updated.decode.engine_kwargs["block_size"] == 64
    assert updated.decode.engine_kwargs["stream_interval"] == 8  # the phase's own stay
    assert updated.prefill == cfg.prefill
