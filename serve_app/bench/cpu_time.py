"""Where a system's CPU time goes during one workload: CPU seconds by kind of process.

On a machine where the engines, the request path and the benchmark client share a few cores, a
latency figure alone cannot say what limits a system. The side-by-side reads every process's CPU
time from `/proc` before and after each measured workload (only one system runs at a time) and
adds the benchmark client's own (its child process, from `getrusage`). Per request, that is the
CPU each system pays for the same work:

- `engine`: vLLM's engine processes (`VLLM::EngineCore`, `VLLM::Worker`): the model and its
  scheduling, and the waits between them;
- `request path`: Ray Serve's replicas (the Router, the servers with vLLM's frontends) and its
  HTTP proxy; for the `direct` system, the plain vLLM OpenAI servers and the bare proxy;
- `ray`: Ray's own processes (GCS, raylet, Serve's controller, dashboard, ...);
- `client`: the benchmark client;
- `other`: everything else on the machine in that window.

Linux only (`/proc`); elsewhere the snapshot is empty and the table says so.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serve_app.bench.records import load_runs, read_json

GROUPS = ("engine", "request path", "ray", "client", "other")
_RAY_NAMES = ("gcs_server", "raylet", "ray-dashboard", "ray::")
# Processes that serve HTTP without Ray Serve: vLLM's own OpenAI server, the `direct` proxy.
_FRONT_MODULES = ("vllm.entrypoints.openai.api_server", "serve_app.bench.direct_pd")
_PROC = Path("/proc")


def group_of(name: str, cmdline: str) -> str:
    """The group of one process, from its name (`comm`) and command line."""
    if name.startswith("VLLM::") or cmdline.startswith("VLLM::"):
        return "engine"
    if cmdline.startswith(("ray::ServeReplica", "ray::SERVE_REPLICA", "ray::ProxyActor")):
        return "request path"
    if any(module in cmdline for module in _FRONT_MODULES):
        return "request path"
    if cmdline.startswith(_RAY_NAMES) or name.startswith(_RAY_NAMES) or "/ray/" in cmdline:
        return "ray"
    return "other"


def read_processes(proc: Path = _PROC) -> dict[int, tuple[str, float]]:
    """{pid: (group, CPU seconds so far)} of every process readable now."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    found: dict[int, tuple[str, float]] = {}
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        found[int(entry.name)] = (group_of(name, cmdline), cpu_s)
    return found


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children (the benchmark client)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Snapshot:
    processes: dict[int, tuple[str, float]]
    client_s: float


def snapshot() -> Snapshot:
    return Snapshot(read_processes(), children_cpu_s())


def cpu_by_group(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each group used between the two snapshots. A process that started meanwhile
    counts from zero; one that ended meanwhile is lost (the client is counted apart)."""
    totals = dict.fromkeys(GROUPS, 0.0)
    for pid, (group, cpu_s) in after.processes.items():
        earlier = before.processes.get(pid)
        used = cpu_s - (earlier[1] if earlier and earlier[0] == group else 0.0)
        if used > 0:
            totals[group] += used
    totals["client"] += max(0.0, after.client_s - before.client_s)
    return {group: round(seconds, 3) for group, seconds in totals.items()}


def per_request_ms(usage: Mapping[str, float], num_requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each group and in total."""
    if num_requests < 1:
        return {}
    shares = {group: 1000.0 * usage.get(group, 0.0) / num_requests for group in GROUPS}
    shares["total"] = sum(shares.values())
    return {group: round(ms, 2) for group, ms in shares.items()}


def table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Rows of `pooled(...)` (a label each) as a text table: ms per request, and cores busy."""
    if not rows:
        return "(no CPU figures: /proc was not readable)"
    head = ["system", *GROUPS, "total", "cores busy"]
    lines = [head]
    for label, row in rows.items():
        lines.append([label, *(f"{row.get(g, 0.0):.1f}" for g in (*GROUPS, "total")),
                      f"{row.get('cores', 0.0):.2f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
                     for line in lines)


def pooled(samples: list[Mapping[str, object]]) -> dict[str, float]:
    """Several windows of one system (rounds) as one: ms per request over all their requests,
    and the mean number of cores busy (CPU seconds over wall seconds)."""
    usage = dict.fromkeys(GROUPS, 0.0)
    num_requests = 0
    wall_s = 0.0
    for sample in samples:
        for group, seconds in dict(sample["cpu_s"]).items():  # type: ignore[call-overload]
            usage[group] = usage.get(group, 0.0) + float(seconds)
        num_requests += int(sample["requests"])  # type: ignore[call-overload]
        wall_s += float(sample["wall_s"])  # type: ignore[arg-type]
    row = per_request_ms(usage, num_requests)
    if row and wall_s > 0:
        row["cores"] = round(sum(usage.values()) / wall_s, 2)
    return row


# ---- the side-by-side's files: rounds/LABEL-cpu.rN.json, one window per measured workload


def cpu_path(out: Path, label: str, round_no: int) -> Path:
    return out / "rounds" / f"{label}-cpu.r{round_no}.json"


def count_requests(path: Path) -> int:
    """Requests in a saved run or sweep (every rate's)."""
    return sum(len(run.records) for run in load_runs(path))


def tables(labels: list[str], out: Path, num_rounds: int, kinds: tuple[str, ...]) -> str:
    """CPU ms per request by process group, each measured workload, every round pooled."""
    windows = {
        label: [read_json(path) for round_no in range(1, num_rounds + 1)
                if (path := cpu_path(out, label, round_no)).exists()]
        for label in labels
    }
    sections = []
    for kind in kinds:
        rows = {}
        for label, rounds in windows.items():
            samples = [by_kind[kind] for by_kind in rounds if by_kind.get(kind)]
            if samples:
                rows[label] = pooled(samples)
        sections.append(f"{kind} (ms of CPU per request; cores busy = CPU s / wall s)\n"
                        + table(rows))
    return "\n\n".join(sections)
