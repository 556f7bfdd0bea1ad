"""How many pairs to run: one decision for both server deployments, made by Serve's autoscaler.

With `pairs: {min, max, ...}` (`config.PairsAutoscaling`) both server deployments get
`autoscaling_config.policy = PairAutoscalingPolicy` (`app.py`). Serve's controller calls each
deployment's instance once per control-loop tick (every 0.1 s), the two one after the other in
the same tick (`ApplicationAutoscalingState.get_decision_num_replicas`), each with its own
deployment's `AutoscalingContext`. The instances share one `_PairLedger` per app in the
controller process: the first call of an iteration records its phase's load and decides (with
the other phase's load of the iteration before: 0.1 s older, and both are averages over the
look-back window anyway), the second, milliseconds later, records its load and gets the same
number. So prefill and decode get the same target in the same iteration, and Serve's own
per-deployment delays and factors are set to pass it through unchanged
(`serve_autoscaling_config`): the delays live here, once for the pair. (Were the controller
stalled more than `SAME_ITERATION_S` between the two calls, the second would decide again, and
the two targets could differ for one iteration.)

Ray 2.60 also has an application-level policy (one call with both contexts), but only a serve
config file can set it (the YAML's `autoscaling_policy:`, beside `args:`); `serve.run` cannot,
and the app would need the range in two places. This per-deployment policy works with both.

The decision (`decide_pairs`, pure): pairs = ceil(requests / `target_ongoing_per_pair`), where
requests is Serve's count of running and queued requests at the busier phase, averaged over the
look-back window; one pair more while a phase's engines are on average past `kv_usage_target`
full, and never one fewer while the others would be pushed past it. More pairs start after they
have been wanted for `upscale_delay_s`; fewer after `downscale_delay_s` of continuously wanting
fewer (any tick that wants the current count or more starts the wait again).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import PairsAutoscaling

logger = logging.getLogger("ray.serve")
POLICY = "serve_app.policy.autoscale:PairAutoscalingPolicy"
PUSHES_PER_LOOK_BACK = 4
"""How many pushes of the replicas' and handles' counts a look-back window holds."""
KV_USAGE_METRIC = "kv_cache_usage"
"""The custom metric each server replica reports (`record_autoscaling_stats`): 0..1."""


@dataclass(frozen=True)
class PhaseLoad:
    """One phase's deployment, as Serve's autoscaler sees it this tick."""

    num_requests: float
    """Running and queued requests at the phase's replicas (Serve's count, look-back mean)."""
    kv_usage: float = 0.0
    """Mean KV cache usage of the phase's engines (0..1)."""


@dataclass(frozen=True)
class Wish:
    """A count the policy wants but has not set yet, and since when it has wanted that way."""

    num_pairs: int
    since: float


def desired_pairs(loads: list[PhaseLoad], num_pairs: int, settings: PairsAutoscaling) -> int:
    """The pair count the loads call for now, within `min`..`max`."""
    num_requests = max((load.num_requests for load in loads), default=0.0)
    kv_usage = max((load.kv_usage for load in loads), default=0.0)
    wanted = math.ceil(num_requests / settings.target_ongoing_per_pair)
    if kv_usage >= settings.kv_usage_target:
        wanted = max(wanted, num_pairs + 1)
    elif num_pairs > 1 and kv_usage * num_pairs / (num_pairs - 1) >= settings.kv_usage_target:
        wanted = max(wanted, num_pairs)  # one pair fewer would fill the others' caches
    return min(max(wanted, settings.min), settings.max)


def decide_pairs(
    loads: list[PhaseLoad],
    num_pairs: int,
    wish: Wish | None,
    settings: PairsAutoscaling,
    now: float,
) -> tuple[int, Wish | None]:
    """The pair count to set now, and the wish still waiting out its delay (if any)."""
    wanted = desired_pairs(loads, num_pairs, settings)
    if wanted == num_pairs:
        return num_pairs, None
    is_up = wanted > num_pairs
    if wish is None or (wish.num_pairs > num_pairs) != is_up:
        wish = Wish(wanted, now)  # a new wish, or one that turned around
    else:
        wish = Wish(wanted, wish.since)
    delay_s = settings.upscale_delay_s if is_up else settings.downscale_delay_s
    if now - wish.since >= delay_s:
        return wanted, None
    return num_pairs, wish


SAME_ITERATION_S = 0.05
"""Calls this close to the last decision get it: they are the other server deployment's call
in the same control-loop iteration (iterations are 0.1 s apart plus their own work)."""
LOAD_TTL_S = 5.0
"""A deployment's load not reported for this long is left out (its deployment is gone)."""
IDLE_RESET_S = 30.0
"""A ledger not asked for this long starts over (its app was deleted and made again)."""


@dataclass
class _PairLedger:
    """One app's pair decision in the controller, shared by its server deployments' policies."""

    loads: dict[str, tuple[float, PhaseLoad]] = field(default_factory=dict)
    """Deployment -> (when, its load then)."""
    num_pairs: int | None = None
    """The count last decided (what Serve has set as both deployments' target)."""
    wish: Wish | None = None
    decided_at: float = -math.inf

    def decide(self, deployment: str, load: PhaseLoad, target: int, now: float,
               settings: PairsAutoscaling) -> int:
        """`deployment`'s target this iteration: the first call of an iteration decides (from
        its own load now and the others' last), the other deployment's call just after gets
        the same number."""
        self.loads[deployment] = (now, load)
        if self.num_pairs is None or abs(now - self.decided_at) > SAME_ITERATION_S:
            if target != self.num_pairs or now - self.decided_at > IDLE_RESET_S:
                # Serve set the target itself (a new deploy, a controller restart): start there.
                self.num_pairs, self.wish = target, None
            loads = [load for at, load in self.loads.values() if now - at <= LOAD_TTL_S]
            self.num_pairs, self.wish = decide_pairs(
                loads, self.num_pairs, self.wish, settings, now
            )
            self.decided_at = now
        return self.num_pairs


_ledgers: dict[str, _PairLedger] = {}
"""App name -> its ledger, in the controller process."""


def ledger(app_name: str) -> _PairLedger:
    return _ledgers.setdefault(app_name, _PairLedger())


def phase_load(ctx: Any) -> PhaseLoad:
    """A deployment's `AutoscalingContext` as the decision reads it."""
    usage = (ctx.aggregated_metrics or {}).get(KV_USAGE_METRIC) or {}
    kv_usage = sum(usage.values()) / len(usage) if usage else 0.0
    return PhaseLoad(float(ctx.total_num_requests), float(kv_usage))


class PairAutoscalingPolicy:
    """Serve's autoscaling policy of both server deployments (a class policy: Serve makes one
    instance per deployment with `policy_kwargs`, the `PairsAutoscaling` fields, and calls it
    with that deployment's `AutoscalingContext` every control-loop tick)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = PairsAutoscaling.model_validate(settings)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        # Serve ships this class by value (cloudpickle), with a copy of this module's globals:
        # the ledgers both deployments share are reached through the imported module.
        from serve_app.policy import autoscale

        app = autoscale.ledger(ctx.app_name)
        now = time.time() if ctx.current_time is None else ctx.current_time
        load = autoscale.phase_load(ctx)
        num_pairs = app.decide(
            ctx.deployment_name, load, ctx.target_num_replicas, now, self.settings
        )
        if num_pairs != ctx.target_num_replicas:
            logger.info(
                "pairs: %s of %s goes from %d to %d pairs (%.2f requests, KV %.2f, %d running)",
                ctx.deployment_name, ctx.app_name, ctx.target_num_replicas, num_pairs,
                load.num_requests, load.kv_usage, ctx.current_num_replicas,
            )
        return num_pairs, {}


def metrics_push_interval_s(settings: PairsAutoscaling) -> float:
    """How often the replicas and the Router's handles push their counts: `PUSHES_PER_LOOK_BACK`
    times per look-back window, at most Serve's 10 s. Ray 2.60 pushes every
    `metrics_interval_s` of the deployment's config, 10 s unless set (the environment variables
    its docs name instead, `RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S`, are read by
    nothing), so a window of `look_back_period_s` <= 10 s would average counts up to 10 s old,
    one push or none, and Ray warns that a later release refuses it."""
    from ray.serve.config import DEFAULT_METRICS_INTERVAL_S

    return min(DEFAULT_METRICS_INTERVAL_S, settings.look_back_period_s / PUSHES_PER_LOOK_BACK)


def serve_autoscaling_config(settings: PairsAutoscaling) -> dict[str, Any]:
    """A server deployment's `autoscaling_config`: this module's policy, with Serve's own delays
    and factors neutral, so that the count it returns is the target Serve sets, and counts
    pushed often enough for the look-back window to average (`metrics_push_interval_s`)."""
    return {
        "metrics_interval_s": metrics_push_interval_s(settings),
        "min_replicas": settings.min,
        "max_replicas": settings.max,
        "initial_replicas": settings.min,
        "target_ongoing_requests": settings.target_ongoing_per_pair,
        "look_back_period_s": settings.look_back_period_s,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "upscaling_factor": 1.0,
        "downscaling_factor": 1.0,
        "policy": {"policy_function": POLICY, "policy_kwargs": settings.model_dump(mode="json")},
    }
