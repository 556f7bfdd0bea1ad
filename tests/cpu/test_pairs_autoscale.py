"""Autoscaling pairs (`pairs: {min, max, ...}`, `serve_app/policy/autoscale.py`).

Unit tests: the policy as Serve's controller runs it (Serve's own wrapper around the class it
unpickles, one instance per server deployment, called one after the other each tick):

1. Both deployments get the same count every tick, whatever each phase's own load.
2. The count stays within min..max.
3. More pairs start only after `upscale_delay_s`; fewer only after `downscale_delay_s` of load
   gone, and load coming back starts that wait again.
4. KV pressure adds a pair, and keeps one that the others could not absorb.

End to end, on two one-GPU Ray nodes on 127.0.0.1 (the session's head and a second node):

5. `pairs: {min: 1, max: 2}` starts one pair; clients that keep more requests in flight than
   one pair's target make Serve start a second pair (both deployments' targets move together),
   which then serves requests; when they stop, a trickle of requests goes on while the second
   pair drains and stops. Every request is answered 200, and the remaining pair holds nothing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.cpu.conftest import MODEL_NAME, TEST_PORT_BASE, app_args

PHASES = ("PrefillServer", "DecodeServer")


# ---- the policy, as Serve's controller calls it -------------------------------------------------


class ControllerTicks:
    """Serve's controller for one app's two server deployments: each tick, each deployment's
    policy (Serve's wrapper around the unpickled class) gets its own `AutoscalingContext`, and
    the bounded decision becomes its target."""

    def __init__(self, app_name: str, **settings: Any) -> None:
        from ray.serve._private.autoscaling_state import _resolve_policy_callable
        from ray.serve.autoscaling_policy import _apply_autoscaling_config
        from ray.serve.config import AutoscalingConfig

        from serve_app.config import PairsAutoscaling
        from serve_app.policy.autoscale import serve_autoscaling_config

        self.app_name = app_name
        self.settings = PairsAutoscaling(**settings)
        self.config = AutoscalingConfig(**serve_autoscaling_config(self.settings))
        self.policies: dict[str, Callable] = {
            name: _apply_autoscaling_config(_resolve_policy_callable(self.config.policy))
            for name in PHASES
        }
        self.targets = dict.fromkeys(PHASES, self.config.initial_replicas)
        self.states: dict[str, dict] = {name: {} for name in PHASES}

    def tick(self, now: float, requests: dict[str, float], kv: dict[str, float] | None = None
             ) -> dict[str, int]:
        """Two control-loop iterations, 0.1 s apart and ending at `now`, with these loads (the
        first call of an iteration decides from the other deployment's load of the iteration
        before); both deployments must get the same count in each."""
        for at in (now - 0.1, now):
            for name, policy in self.policies.items():
                decision, self.states[name] = policy(self._context(name, at, requests, kv or {}))
                self.targets[name] = max(self.settings.min, min(self.settings.max, decision))
            assert self.targets["PrefillServer"] == self.targets["DecodeServer"], self.targets
        return dict(self.targets)

    def _context(self, name: str, now: float, requests: dict[str, float],
                 kv: dict[str, float]) -> Any:
        from ray.serve._private.common import DeploymentID
        from ray.serve.config import AutoscalingContext

        target = self.targets[name]
        usage = {f"{name}#{i}": kv.get(name, 0.0) for i in range(target)}
        return AutoscalingContext(
            deployment_id=DeploymentID(name=name, app_name=self.app_name),
            deployment_name=name, app_name=self.app_name, current_num_replicas=target,
            target_num_replicas=target, running_replicas=[], total_num_requests=requests[name],
            total_queued_requests=0.0, aggregated_metrics={"kv_cache_usage": usage},
            raw_metrics={}, capacity_adjusted_min_replicas=self.settings.min,
            capacity_adjusted_max_replicas=self.settings.max, policy_state=self.states[name],
            last_scale_up_time=None, last_scale_down_time=None, current_time=now,
            config=self.config,
        )


def test_both_deployments_get_the_same_count_every_tick() -> None:
    """Prefill sees few requests (its calls are short), decode many: one count for both."""
    ticks = ControllerTicks("same-count", min=1, max=4, target_ongoing_per_pair=4,
                            upscale_delay_s=0, downscale_delay_s=0)
    loads = [(1, 3), (2, 9), (0, 14), (5, 30), (1, 6), (0, 0), (3, 1)]
    seen = []
    for now, (prefill, decode) in enumerate(loads):
        targets = ticks.tick(float(now), {"PrefillServer": prefill, "DecodeServer": decode})
        seen.append(targets["DecodeServer"])
        assert targets["PrefillServer"] == targets["DecodeServer"]
    assert seen == [1, 3, 4, 4, 2, 1, 1]  # ceil(busier phase / 4), within 1..4


def test_the_count_stays_within_min_and_max() -> None:
    from serve_app.config import PairsAutoscaling
    from serve_app.policy.autoscale import PhaseLoad, desired_pairs

    settings = PairsAutoscaling(min=2, max=3, target_ongoing_per_pair=8)
    assert desired_pairs([PhaseLoad(0.0)], 2, settings) == 2
    assert desired_pairs([PhaseLoad(17.0), PhaseLoad(3.0)], 2, settings) == 3
    assert desired_pairs([PhaseLoad(1000.0)], 3, settings) == 3


def test_pairs_are_added_after_the_upscale_delay_and_removed_only_once_load_is_gone() -> None:
    ticks = ControllerTicks("delays", min=1, max=2, target_ongoing_per_pair=4,
                            upscale_delay_s=2, downscale_delay_s=10)
    busy = {"PrefillServer": 2.0, "DecodeServer": 12.0}
    idle = {"PrefillServer": 0.0, "DecodeServer": 1.0}
    assert ticks.tick(0.0, busy)["DecodeServer"] == 1  # wanted from now on
    assert ticks.tick(1.9, busy)["DecodeServer"] == 1
    assert ticks.tick(2.0, busy) == dict.fromkeys(PHASES, 2)
    assert ticks.tick(3.0, idle) == dict.fromkeys(PHASES, 2)  # the wait for fewer begins
    assert ticks.tick(9.0, idle) == dict.fromkeys(PHASES, 2)
    assert ticks.tick(10.0, busy) == dict.fromkeys(PHASES, 2)  # load is back: wait again
    assert ticks.tick(11.0, idle) == dict.fromkeys(PHASES, 2)
    assert ticks.tick(20.9, idle) == dict.fromkeys(PHASES, 2)
    assert ticks.tick(21.0, idle) == dict.fromkeys(PHASES, 1)


def test_kv_pressure_adds_a_pair_and_keeps_one_the_others_cannot_absorb() -> None:
    from serve_app.config import PairsAutoscaling
    from serve_app.policy.autoscale import PhaseLoad, desired_pairs

    settings = PairsAutoscaling(min=1, max=4, target_ongoing_per_pair=100, kv_usage_target=0.8)
    assert desired_pairs([PhaseLoad(3.0, kv_usage=0.85)], 1, settings) == 2
    assert desired_pairs([PhaseLoad(3.0, kv_usage=0.5)], 2, settings) == 2  # 1.0 on one pair
    assert desired_pairs([PhaseLoad(3.0, kv_usage=0.3)], 2, settings) == 1
    ticks = ControllerTicks("kv", min=1, max=4, target_ongoing_per_pair=100,
                            upscale_delay_s=0, downscale_delay_s=0)
    few = {"PrefillServer": 1.0, "DecodeServer": 3.0}
    targets = ticks.tick(0.0, few, kv={"DecodeServer": 0.9})
    assert targets == dict.fromkeys(PHASES, 2)


def test_a_target_serve_set_itself_is_where_the_policy_starts_again() -> None:
    """A new deploy under the same app name starts at `min`: the policy does not carry the
    old count over."""
    ticks = ControllerTicks("redeploy", min=1, max=3, target_ongoing_per_pair=4,
                            upscale_delay_s=0, downscale_delay_s=5)
    busy = {"PrefillServer": 1.0, "DecodeServer": 12.0}
    idle = {"PrefillServer": 0.0, "DecodeServer": 0.0}
    assert ticks.tick(0.0, busy) == dict.fromkeys(PHASES, 3)
    assert ticks.tick(1.0, idle) == dict.fromkeys(PHASES, 3)  # fewer wanted, not for 5 s yet
    ticks.targets = dict.fromkeys(PHASES, 1)  # Serve redeployed the app: it starts at min
    assert ticks.tick(2.0, idle) == dict.fromkeys(PHASES, 1)


def test_counts_are_pushed_several_times_per_look_back_window() -> None:
    """Ray 2.60 pushes a replica's and a handle's counts every `metrics_interval_s` (10 s unless
    set): a 3 s window would average counts up to 10 s old, and Serve warns that a later Ray
    refuses a window no longer than the push."""
    import warnings

    from ray.serve.config import AutoscalingConfig

    from serve_app.config import PairsAutoscaling
    from serve_app.policy.autoscale import serve_autoscaling_config

    for look_back_s, push_s in ((1, 0.25), (3, 0.75), (30, 7.5), (3600, 10.0)):
        settings = PairsAutoscaling(max=2, look_back_period_s=look_back_s)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            config = AutoscalingConfig(**serve_autoscaling_config(settings))
        assert (config.look_back_period_s, config.metrics_interval_s) == (look_back_s, push_s)


def test_the_range_is_validated_naming_its_fields() -> None:
    from pydantic import ValidationError

    from serve_app.config import AppConfig

    assert AppConfig.model_validate({"pairs": 3}).max_pairs == 3
    scaled = AppConfig.model_validate({"pairs": {"min": 1, "max": 4}})
    assert (scaled.min_pairs, scaled.max_pairs) == (1, 4)
    with pytest.raises(ValidationError, match=r"pairs.min \(3\) must be <= pairs.max \(2\)"):
        AppConfig.model_validate({"pairs": {"min": 3, "max": 2}})
    with pytest.raises(ValidationError, match=r"pairs: 0 is not a pair count: .* 1\.\.256"):
        AppConfig.model_validate({"pairs": 0})
    with pytest.raises(ValidationError, match=r"pairs.autoscaling.kv_usage_target"):
        AppConfig.model_validate({"pairs": {"max": 2, "kv_usage_target": 1.5}})
    with pytest.raises(ValidationError, match=r"pairs.max: 20 pairs .* at least 20 apart"):
        AppConfig.model_validate({"pairs": {"max": 20}})


# ---- end to end -----------------------------------------------------------------------------


AUTOSCALING = {
    "min": 1, "max": 2, "target_ongoing_per_pair": 2, "upscale_delay_s": 1,
    "downscale_delay_s": 15, "look_back_period_s": 3, "drain_timeout_s": 120,
}
NUM_CLIENTS = 8
"""Clients with a request in flight each: Serve counts 3-5 of them at the busier phase (the rest
are between the hops), past one pair's target of 2; the trickle after them keeps at most one."""
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def autoscaled_app(tiny_model: Any, http_port: int, second_node: str) -> Iterator[dict[str, Any]]:
    from ray import serve

    from serve_app.app import build_app

    args = app_args(pairs=AUTOSCALING)
    args["prefill"]["nixl_side_channel_port"] = TEST_PORT_BASE + 60
    args["decode"]["nixl_side_channel_port"] = TEST_PORT_BASE + 70
    args["router"]["failover"] = {"probe_period_s": 0.25, "probe_timeout_s": 2.0}
    started = time.monotonic()
    serve.run(build_app(args), name="autoscale", route_prefix="/autoscale")
    print(f"one pair started in {time.monotonic() - started:.0f} s")
    yield {"url": f"http://127.0.0.1:{http_port}/autoscale/v1/completions"}
    serve.delete("autoscale")


class Clients:
    """`num` threads, each sending one completion after another until `stop()`; every answer
    is kept."""

    def __init__(self, url: str, num: int, pause_s: float = 0.0) -> None:
        self.url, self.pause_s = url, pause_s
        self.answers: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(num)]
        for thread in self._threads:
            thread.start()

    def _run(self, i: int) -> None:
        body = {"model": MODEL_NAME, "prompt": f"Client {i} asks why prefill and decode",
                "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
        with httpx.Client(timeout=300) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self.url, json=body)
                    self.answers.append((response.status_code, response.headers.get("x-pd-pair", "")))
                except httpx.HTTPError as exc:
                    self.answers.append((0, type(exc).__name__))
                time.sleep(self.pause_s)

    def pairs(self) -> Counter:
        return Counter(pair for status, pair in self.answers if status == 200)

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self.answers


def server_states() -> dict[str, tuple[int, dict[str, int]]]:
    """Each server deployment's target replica count and its replicas by state, read from the
    controller in one call (so the two targets are one moment's)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployments = details["applications"]["autoscale"]["deployments"]
    return {
        name: (
            deployments[name]["target_num_replicas"],
            dict(Counter(r["state"] for r in deployments[name]["replicas"])),
        )
        for name in PHASES
    }


def wait_for(what: str, check: Callable[[dict], bool], seen: list, timeout_s: float) -> float:
    """Poll the deployments' states until `check` holds; every sample goes to `seen`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        states = server_states()
        seen.append(states)
        if check(states):
            took = time.monotonic() - started
            print(f"{what} after {took:.0f} s: {states}")
            return took
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout_s:g} s; last {seen[-1]}")


def test_a_queue_adds_a_pair_and_a_drained_pair_is_removed(
    autoscaled_app: dict[str, Any]
) -> None:
    from ray import serve

    url, seen = autoscaled_app["url"], []
    assert server_states() == {name: (1, {"RUNNING": 1}) for name in PHASES}

    def running(num: int) -> Callable[[dict], bool]:
        return lambda states: all(
            states[name] == (num, {"RUNNING": num}) for name in PHASES
        )

    # 1. A queue: more requests in flight than one pair's target -> the second pair starts.
    busy = Clients(url, NUM_CLIENTS)
    wait_for("both targets at 2", lambda s: all(s[n][0] == 2 for n in PHASES), seen, 120)
    wait_for("second pair running", running(2), seen, 600)
    started = time.monotonic()
    while len(busy.pairs()) < 2 and time.monotonic() - started < 120:
        time.sleep(0.5)
    print(f"answers per pair under load: {dict(busy.pairs())}")
    assert len(busy.pairs()) == 2, "the second pair served no request"

    # 2. The load goes: a trickle (one request at a time) runs on through the scale-down.
    trickle = Clients(url, 1, pause_s=0.05)
    num_busy = len(busy.stop())
    wait_for("a pair removed", running(1), seen, 300)
    time.sleep(2)  # a few more of the trickle's requests on the pair that is left
    answers = busy.answers + trickle.stop()
    print(f"{len(answers)} answers ({num_busy} under load), by (status, pair): "
          f"{dict(Counter(answers))}")
    assert [status for status, _ in answers] == [200] * len(answers)

    # Both deployments' targets moved together in every sample of the controller's state.
    # (Serve applies each deployment's target in the same controller iteration; a sample
    # between two iterations' halves would show them apart, so count those.)
    targets = {name: [states[name][0] for states in seen] for name in PHASES}
    moves = {name: [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
             for name, ts in targets.items()}
    apart = sum(p != d for p, d in zip(*targets.values(), strict=True))
    print(f"targets over {len(seen)} samples: {moves}; samples with them apart: {apart}")
    assert moves["PrefillServer"] == moves["DecodeServer"] == [1, 2, 1]

    # 3. The pair that is left holds no request and no KV block (blocks decode never read,
    # if any, are freed when their lease ends).
    deadline = time.monotonic() + 150
    for phase in PHASES:
        handle = serve.get_deployment_handle(phase, app_name="autoscale")
        while True:
            report = handle.leak_report.remote().result(timeout_s=60)
            if report == {"num_unfinished_requests": 0, "all_blocks_free": True}:
                break
            assert time.monotonic() < deadline, f"{phase}: {report}"
            time.sleep(1)
