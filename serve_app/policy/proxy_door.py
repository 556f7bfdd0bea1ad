"""The door in Serve's proxy: count the completions open per app, refuse past what it can hold.

Serve's HTTP proxy (port 8000: what the ALB targets on AWS) runs in a process of its own, with no
Router to ask whether admission is full. Without a door there, every request of a burst crosses
the proxy, the handle and Serve's request wrapper before the Router refuses it (429s took
4.6-5.0 s at P50 in a 2,000-request burst on 2 cores).

So each Router replica posts a notice on a board in Ray's GCS key-value store: its app's route
prefix and what its admission holds at most, `max_in_flight` plus `max_waiting`
(`RouterBoard.post_forever`).
Each proxy reads the board every second (`CountingDoor.refresh_forever`), sums the notices of an
app's replicas, and counts the completions it has open for that app. A completion that finds as
many open as the app can hold gets the same 429 OpenAI error and `Retry-After` at once; the rest
go on, and Router admission decides as before. With one proxy in front of the Routers this is
admission's own limit; with several, each proxy counts only its share and sheds later, never
what the Routers would admit. What the count cannot see (decode's KV cache nearly full, requests
through the Routers' own ports) the Router still refuses itself.

A completion's app is the path before `/v1/completions` or `/v1/chat/completions`, which is the
app's route prefix exactly; a path of another app (another prefix) is never counted against
this one. A notice not renewed for `NOTICE_TTL_S` (a dead replica's) is dropped.

Each proxy posts its sheds so far on the same board (`ShedReport`); a Router adds the new ones
of its app to its own metrics at each scrape (`RouterBoard.new_sheds`), so `GET /metrics` counts
every 429, wherever it was given.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Self, TypeVar

from serve_app.policy.errors import Rejection, capacity_rejection

BOARD_NAMESPACE = "pd-serve"
NOTICE_PREFIX = "door/"
SHEDS_PREFIX = "sheds/"
POST_PERIOD_S = 5.0
NOTICE_TTL_S = 3 * POST_PERIOD_S
REFRESH_PERIOD_S = 1.0


class _Posted:
    """A dataclass that goes on the board as JSON."""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        return cls(**json.loads(raw))


P = TypeVar("P", bound=_Posted)


@dataclass(frozen=True)
class Notice(_Posted):
    """What one Router replica can hold, posted for the proxies."""

    route_prefix: str
    capacity: int
    retry_after_s: int
    posted_at: float


@dataclass(frozen=True)
class ShedReport(_Posted):
    """One proxy's sheds since it started: app key -> endpoint -> count."""

    proxy_id: str
    counts: dict[str, dict[str, int]]


@dataclass(frozen=True)
class Limit:
    """What all of an app's Router replicas hold at most, and the `Retry-After` they give."""

    capacity: int
    retry_after_s: int


def app_key(route: str) -> str:
    """One spelling for a route prefix and for a path's part before the endpoint: `/` and `` are
    the same app, `/chat/` and `/chat` too."""
    return route.rstrip("/")


def limits_of(notices: list[Notice], now: float) -> dict[str, Limit]:
    """Per app (`app_key` of its route prefix): the live replicas' capacities summed."""
    capacity: dict[str, int] = defaultdict(int)
    retry_after: dict[str, int] = defaultdict(int)
    for notice in notices:
        if now - notice.posted_at > NOTICE_TTL_S:
            continue
        key = app_key(notice.route_prefix)
        capacity[key] += notice.capacity
        retry_after[key] = max(retry_after[key], notice.retry_after_s)
    return {key: Limit(capacity[key], retry_after[key]) for key in capacity}


class CountingDoor:
    """The proxy's door: completions open per app against the apps' posted limits."""

    def __init__(self) -> None:
        self.proxy_id = uuid.uuid4().hex
        self.limits: dict[str, Limit] = {}
        self.num_open: dict[str, int] = defaultdict(int)
        self.num_shed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._refresher: asyncio.Task | None = None

    def refusal(self, key: str, endpoint: str) -> Rejection | None:
        """The 429 for a completion of app `key` now, or None to let it in (then `enter` it)."""
        limit = self.limits.get(key)
        if limit is None or self.num_open[key] < limit.capacity:
            return None
        self.num_shed[key][endpoint] += 1
        return capacity_rejection(limit.retry_after_s, "the server is at capacity")

    def enter(self, key: str) -> None:
        self.num_open[key] += 1

    def leave(self, key: str) -> None:
        self.num_open[key] -= 1

    def ensure_refreshing(self) -> None:
        """Read the board from now on (from the process's first request: on AWS the ALB's
        health checks, before any completion)."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self.refresh_forever())

    async def refresh_forever(self) -> None:
        """Every `REFRESH_PERIOD_S`: post this proxy's sheds when there are new ones, read the
        notices. A GCS call that fails keeps the last limits (the Routers still refuse what they
        must) and is tried again next period."""
        posted: dict[str, dict[str, int]] = {}
        while True:
            try:
                counts = {key: dict(by_endpoint) for key, by_endpoint in self.num_shed.items()}
                if counts != posted:
                    await asyncio.to_thread(_put, SHEDS_PREFIX + self.proxy_id,
                                            ShedReport(self.proxy_id, counts).encode())
                    posted = counts
                notices = await asyncio.to_thread(read_board, Notice, NOTICE_PREFIX)
                self.limits = limits_of(notices, time.time())
            except Exception:
                pass
            await asyncio.sleep(REFRESH_PERIOD_S)


class RouterBoard:
    """A Router replica's side of the board: its notice, and the proxies' sheds of its app."""

    def __init__(self, app_name: str, replica_id: str, capacity: int, retry_after_s: int) -> None:
        self.app_name = app_name
        self.notice_key = f"{NOTICE_PREFIX}{app_name}/{replica_id}"
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.route_prefix: str | None = None
        self._seen: dict[str, dict[str, int]] = {}  # proxy id -> endpoint -> sheds counted
        self.is_counting = False

    async def post_forever(self) -> None:
        """The notice, renewed every `POST_PERIOD_S` (run as a task; a replica that dies stops
        renewing and its notice lapses). First the proxies' sheds so far are taken as seen."""
        while True:
            try:
                if self.route_prefix is None:
                    self.route_prefix = await asyncio.to_thread(_route_prefix, self.app_name)
                if self.route_prefix is not None and not self.is_counting:
                    await self.start_counting()
                if self.is_counting:
                    notice = Notice(self.route_prefix, self.capacity, self.retry_after_s,
                                    time.time())
                    await asyncio.to_thread(_put, self.notice_key, notice.encode())
            except Exception:  # the controller or GCS briefly away: try again next period
                pass
            await asyncio.sleep(POST_PERIOD_S)

    async def start_counting(self) -> None:
        """Take the proxies' sheds so far as seen: those of an app deployed before at the same
        route prefix, or of this app before this replica, are not this replica's to count."""
        self.count_new(await asyncio.to_thread(read_board, ShedReport, SHEDS_PREFIX))
        self.is_counting = True

    async def new_sheds(self) -> dict[str, int]:
        """Per endpoint, the proxies' sheds of this app since the last call (none while GCS
        does not answer: they are counted at the next scrape that reads them)."""
        if not self.is_counting:
            return {}
        try:
            reports = await asyncio.to_thread(read_board, ShedReport, SHEDS_PREFIX)
        except Exception:
            return {}
        return self.count_new(reports)

    def count_new(self, reports: list[ShedReport]) -> dict[str, int]:
        assert self.route_prefix is not None
        new: dict[str, int] = defaultdict(int)
        for report in reports:
            seen = self._seen.setdefault(report.proxy_id, {})
            for endpoint, count in report.counts.get(app_key(self.route_prefix), {}).items():
                new[endpoint] += count - seen.get(endpoint, 0)
                seen[endpoint] = count
        return {endpoint: count for endpoint, count in new.items() if count}


# ---- the board: Ray's GCS key-value store (blocking calls: run them off the event loop) --------

def read_board(record: type[P], prefix: str) -> list[P]:
    """Every record posted under `prefix`."""
    from ray.experimental import internal_kv

    records = []
    for key in internal_kv._internal_kv_list(prefix, namespace=BOARD_NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=BOARD_NAMESPACE)
        if raw:
            records.append(record.decode(raw))
    return records


def _put(key: str, value: bytes) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=BOARD_NAMESPACE)


def _route_prefix(app_name: str) -> str | None:
    """The app's route prefix, from Serve's controller (the details `serve status` shows: the
    controller's target groups name only the proxies when Serve's direct ingress is off); None
    when it has none (yet)."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    details = ray.get(controller.get_serve_instance_details.remote())
    app = details.get("applications", {}).get(app_name) or {}
    route_prefix = app.get("route_prefix")
    return None if route_prefix is None else str(route_prefix)
