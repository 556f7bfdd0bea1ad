"""The load loop: release requests on an arrival schedule, optionally under a concurrency cap.

1. Prompts are built before the clock starts when the request count is known, so tokenizing
   never delays an arrival.
2. Arrival times are absolute offsets from the run start, so a late wake-up does not shift every
   later arrival.
3. With a concurrency cap, a released request waits for a free slot before it is sent; its record
   keeps both times (`scheduled_s`, `start_s`) and latencies count from the send. An infinite
   rate with a cap is a closed loop.
4. The run stops releasing requests after `num_requests` or `duration_s`, whichever comes first,
   then waits for the requests in flight. Its duration runs from the start to the last completion.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass

import aiohttp
from tqdm import tqdm

from serve_app.bench.arrivals import arrival_offsets, validate_arrival
from serve_app.bench.client import ClientConfig, make_session, send_request
from serve_app.bench.records import RequestRecord, rate_to_json
from serve_app.bench.workload import Prompt, PromptSource

DEFAULT_NUM_REQUESTS = 100


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf
    arrival: str = "poisson"
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_requests: int | None = DEFAULT_NUM_REQUESTS
    duration_s: float | None = None
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        validate_arrival(self.request_rate, self.arrival, self.burstiness)
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("set num_requests, duration_s or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        is_unbounded = self.num_requests is None and self.max_concurrency is None
        if math.isinf(self.request_rate) and is_unbounded:
            raise ValueError("an unlimited rate with only duration_s needs max_concurrency")

    def to_json(self) -> dict[str, object]:
        return {
            "request_rate": rate_to_json(self.request_rate),
            "arrival": self.arrival,
            "burstiness": self.burstiness,
            "max_concurrency": self.max_concurrency,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "seed": self.seed,
        }


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    duration_s: float


async def run_load(client: ClientConfig, load: LoadConfig, prompts: PromptSource) -> RunOutcome:
    async with make_session(client) as session:
        return await _drive(session, client, load, prompts)


async def _drive(
    session: aiohttp.ClientSession, client: ClientConfig, load: LoadConfig, source: PromptSource
) -> RunOutcome:
    prompts = _prebuild(source, load.num_requests)
    limiter = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    progress = tqdm(total=load.num_requests, disable=not load.show_progress, unit="req")
    run_tag = uuid.uuid4().hex[:8]
    tasks: list[asyncio.Task[RequestRecord]] = []
    run_start = time.perf_counter()
    try:
        offsets = arrival_offsets(load.request_rate, load.arrival, load.burstiness, load.seed)
        for index, offset in enumerate(offsets):
            if not _may_release(load, index, offset):
                break
            await _sleep_until(run_start + offset)
            if not await _acquire_slot(limiter, load, run_start):
                break
            prompt = prompts[index] if prompts else source.get(index)
            request = send_request(
                session, client, prompt, f"bench-{run_tag}-{index}", run_start, offset
            )
            tasks.append(asyncio.create_task(_tracked(request, limiter, progress)))
        records = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        progress.close()
    return RunOutcome(records=records, duration_s=time.perf_counter() - run_start)


def _prebuild(source: PromptSource, num_requests: int | None) -> list[Prompt]:
    return [source.get(index) for index in range(num_requests)] if num_requests else []


def _may_release(load: LoadConfig, index: int, offset: float) -> bool:
    if load.num_requests is not None and index >= load.num_requests:
        return False
    return load.duration_s is None or offset < load.duration_s


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def _acquire_slot(
    limiter: asyncio.Semaphore | None, load: LoadConfig, run_start: float
) -> bool:
    """Wait for a concurrency slot; False when the run's duration ran out meanwhile."""
    if limiter is None:
        return True
    await limiter.acquire()
    if load.duration_s is not None and time.perf_counter() - run_start >= load.duration_s:
        limiter.release()
        return False
    return True


async def _tracked(
    request: Awaitable[RequestRecord],
    limiter: asyncio.Semaphore | None,
    progress: tqdm,
) -> RequestRecord:
    try:
        return await request
    finally:
        if limiter is not None:
            limiter.release()
        progress.update(1)
