"""Per-request records and the results JSON files written by `run` and `sweep`.

A results file is one JSON object:

- `kind: "run"`: `label`, `command`, `config`, `started_at`, `request_rate`, `duration_s`,
  `summary`, `records`.
- `kind: "sweep"`: `label`, `command`, `config`, `started_at`, `goodput`, and `runs`, a list of
  objects shaped like a "run" file without the top-level `label`/`command`/`config`.

Times inside records are seconds (`*_s`); summaries use milliseconds (`*_ms`). An unlimited
request rate is stored as `null`.

A name ending in `.gz` is written and read gzipped. The side-by-side keeps its raw records so
(`RECORDS_SUFFIX`), and so do the committed results: every tracked file travels to a lent GPU
machine with each call, within 64 MiB (`serve_app/gpu_campaign.py`), and the records compress
about 4x. Where a `.json` name is asked for and only its `.json.gz` exists, that is read.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RequestRecord:
    """What one request did, as seen by the client.

    `scheduled_s` is when the arrival process released the request and `start_s` when it was
    sent (later than `scheduled_s` only while waiting for a concurrency slot); both are relative
    to the start of the run. `ttft_s` and `e2e_s` count from `start_s`. `itl_s` holds the gap
    between each pair of successive content chunks. `error` is `None` on success. `class_name`
    is the request's class in a mixed workload (`None` otherwise).
    """

    request_id: str
    scheduled_s: float = 0.0
    start_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    expected_output_tokens: int | None = None
    error: str | None = None
    class_name: str | None = None

    @property
    def is_success(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output_tokens - 1); undefined for failures and single-token outputs."""
        if not self.is_success or self.output_tokens <= 1:
            return None
        if self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class RunResult:
    """One load run of one system, as loaded back from a results file."""

    label: str
    request_rate: float | None
    duration_s: float
    summary: dict[str, Any]
    records: list[RequestRecord]

    @property
    def x_rate(self) -> float:
        """Rate for plotting: the offered rate, or the achieved one for unlimited-rate runs."""
        if self.request_rate is not None:
            return self.request_rate
        return float(self.summary.get("request_throughput_rps") or 0.0)


def rate_to_json(rate: float) -> float | None:
    return None if math.isinf(rate) else rate


def run_payload(
    request_rate: float, duration_s: float, summary: dict[str, Any], records: list[RequestRecord]
) -> dict[str, Any]:
    """The part of a results file that describes one run."""
    return {
        "request_rate": rate_to_json(request_rate),
        "duration_s": duration_s,
        "summary": summary,
        "records": [record.to_dict() for record in records],
    }


RECORDS_SUFFIX = ".json.gz"
"""What the side-by-side names its files of per-request records with."""


def save_json(path: str | Path, payload: dict[str, Any]) -> None:
    """`payload` as JSON at `path`, gzipped where the name ends in `.gz`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1, allow_nan=False) + "\n"
    if target.name.endswith(".gz"):
        target.write_bytes(gzip.compress(text.encode(), mtime=0))  # the same bytes every time
    else:
        target.write_text(text)


def resolve(path: str | Path) -> Path:
    """`path`, or its gzipped twin (`NAME.gz`) where only that one exists."""
    target = Path(path)
    twin = target.with_name(target.name + ".gz")
    return twin if not target.exists() and twin.exists() else target


def read_json(path: str | Path) -> Any:
    """A JSON file, plain or gzipped (by its name); a `.json` name may stand for its `.json.gz`."""
    source = resolve(path)
    data = source.read_bytes()
    return json.loads(gzip.decompress(data) if source.name.endswith(".gz") else data)


def results_name(path: str | Path) -> str:
    """A results file's name without `.json` or `.json.gz`: `pd-mixed.json.gz` -> `pd-mixed`."""
    return re.sub(r"(\.json)?(\.gz)?$", "", Path(path).name)


def load_runs(path: str | Path) -> list[RunResult]:
    """Every run in a results file ("run" or "sweep"), labelled with the file's label."""
    data = read_json(path)
    label = str(data.get("label") or results_name(path))
    raw_runs = data["runs"] if data.get("kind") == "sweep" else [data]
    return [_run_from_dict(label, raw) for raw in raw_runs]


def load_goodput(path: str | Path) -> float | None:
    """The goodput stored in a sweep file, or `None` for run files and sweeps with none."""
    data = read_json(path)
    goodput = data.get("goodput") or {}
    return goodput.get("goodput_rps")


def _run_from_dict(label: str, raw: dict[str, Any]) -> RunResult:
    return RunResult(
        label=label,
        request_rate=raw.get("request_rate"),
        duration_s=float(raw.get("duration_s") or 0.0),
        summary=raw.get("summary") or {},
        records=[RequestRecord.from_dict(item) for item in raw.get("records", [])],
    )
