"""Request arrival times.

Inter-arrival gaps follow `vllm bench serve`: a gamma distribution with shape `burstiness` and
scale `1 / (rate * burstiness)`, so the mean gap is always `1 / rate`. `burstiness = 1` is a
Poisson process (exponential gaps); below 1 arrivals come in bursts, above 1 they are more even.
An infinite rate releases every request at once (a closed loop when a concurrency cap is set).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

ARRIVAL_KINDS = ("poisson", "gamma")


def validate_arrival(rate: float, arrival: str, burstiness: float) -> None:
    if arrival not in ARRIVAL_KINDS:
        raise ValueError(f"arrival must be one of {ARRIVAL_KINDS}, got {arrival!r}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")


def gamma_shape(arrival: str, burstiness: float) -> float:
    """Poisson is the gamma distribution with shape 1, whatever `burstiness` says."""
    return 1.0 if arrival == "poisson" else burstiness


def inter_arrival_times(
    num_requests: int, rate: float, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0
) -> np.ndarray:
    """`num_requests` gaps in seconds (all zero for an infinite rate)."""
    validate_arrival(rate, arrival, burstiness)
    if math.isinf(rate):
        return np.zeros(num_requests)
    shape = gamma_shape(arrival, burstiness)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=shape, scale=1.0 / (rate * shape), size=num_requests)


def arrival_offsets(
    rate: float, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0
) -> Iterator[float]:
    """Endless arrival times in seconds from the start of a run; the first is at 0.

    The first request goes out at once so that a run never starts with an idle gap.
    """
    validate_arrival(rate, arrival, burstiness)
    rng = np.random.default_rng(seed)
    shape = gamma_shape(arrival, burstiness)
    offset = 0.0
    while True:
        yield offset
        if not math.isinf(rate):
            offset += float(rng.gamma(shape=shape, scale=1.0 / (rate * shape)))
