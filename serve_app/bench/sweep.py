"""Runs at several request rates, then goodput over them (DistServe's definition, see `stats`).

1. Run the same workload at each rate in `rates`, lowest first (same seed, so the same prompts).
2. Optionally bisect between the highest passing rate and the first failing one above it for
   `bisect_steps` more runs, which narrows the goodput estimate without a dense grid.
3. Goodput is `stats.find_goodput` over every run made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.bench.client import ClientConfig
from serve_app.bench.records import run_payload
from serve_app.bench.runner import LoadConfig, RunOutcome, run_load
from serve_app.bench.stats import SLO, GoodputResult, find_goodput, slo_attainment, summarize
from serve_app.bench.workload import PromptSource


@dataclass
class SweepRun:
    request_rate: float
    outcome: RunOutcome
    summary: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return run_payload(
            self.request_rate, self.outcome.duration_s, self.summary, self.outcome.records
        )


@dataclass
class SweepOutcome:
    runs: list[SweepRun]
    goodput: GoodputResult | None


async def bisect_rate(
    measure: Callable[[float], Awaitable[float]],
    passing_rate: float,
    failing_rate: float,
    target: float,
    num_steps: int,
) -> tuple[float, float]:
    """Narrow [passing_rate, failing_rate] with `num_steps` measurements of SLO attainment.

    `measure(rate)` returns the attainment at that rate. Returns the final (passing, failing)
    bracket; the goodput lies between them.
    """
    for _ in range(num_steps):
        middle = (passing_rate + failing_rate) / 2
        if await measure(middle) >= target:
            passing_rate = middle
        else:
            failing_rate = middle
    return passing_rate, failing_rate


async def run_sweep(
    client: ClientConfig,
    load: LoadConfig,
    prompts: PromptSource,
    rates: Sequence[float],
    slo: SLO,
    target: float = 0.9,
    cooldown_s: float = 0.0,
    num_bisect_steps: int = 0,
    on_run: Callable[[SweepRun], None] | None = None,
) -> SweepOutcome:
    runs: list[SweepRun] = []

    async def measure(rate: float) -> float:
        if runs and cooldown_s > 0:
            await asyncio.sleep(cooldown_s)
        outcome = await run_load(client, dataclasses.replace(load, request_rate=rate), prompts)
        run = SweepRun(rate, outcome, summarize(outcome.records, outcome.duration_s, slo))
        runs.append(run)
        if on_run is not None:
            on_run(run)
        return slo_attainment(outcome.records, slo) or 0.0

    for rate in sorted(rates):
        await measure(rate)
    if not slo.is_set:
        return SweepOutcome(runs=runs, goodput=None)
    bracket = _first_bracket(_goodput(runs, slo, target))
    if bracket is not None and num_bisect_steps > 0:
        await bisect_rate(measure, *bracket, target=target, num_steps=num_bisect_steps)
    runs.sort(key=lambda run: run.request_rate)
    return SweepOutcome(runs=runs, goodput=_goodput(runs, slo, target))


def _goodput(runs: Sequence[SweepRun], slo: SLO, target: float) -> GoodputResult:
    pairs = [(run.request_rate, run.outcome.records) for run in runs]
    return find_goodput(pairs, slo, target)


def _first_bracket(goodput: GoodputResult) -> tuple[float, float] | None:
    """(goodput, first tested rate above it), when goodput exists and a higher rate failed."""
    if goodput.goodput_rps is None:
        return None
    rates = [rate for rate, _ in goodput.attainment_by_rate]
    higher = [rate for rate in rates if goodput.goodput_rps < rate < math.inf]
    return (goodput.goodput_rps, min(higher)) if higher else None
