"""CPU time by process group around a side-by-side workload (`serve_app/bench/cpu_time.py`), and
the sweep held for a time per rate instead of a count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from serve_app.bench import cpu_time
from serve_app.bench.cli import build_parser as bench_parser
from serve_app.bench.cli import check_args
from serve_app.bench.cpu_time import cpu_path
from serve_app.bench.side_by_side import parse_plan
from serve_app.bench.side_by_side_workloads import describe_workload, workload_steps

MIX = "chat:0.8:64:128,doc:0.2:1700:8"


@pytest.mark.parametrize(
    ("name", "cmdline", "group"),
    [
        ("VLLM::EngineCor", "VLLM::EngineCore", "engine"),
        ("VLLM::Worker", "VLLM::Worker", "engine"),
        ("ray::ServeRepli", "ray::ServeReplica:pd:Router", "request path"),
        ("ray::ServeRepli", "ray::ServeReplica:pd:DecodeServer.initialize_and_get_metadata",
         "request path"),
        ("ray::SERVE_REPL", "ray::SERVE_REPLICA::pd#Router#x:ServeReplica:pd:Router.__init__",
         "request path"),
        ("ray::ProxyActor", "ray::ProxyActor", "request path"),
        ("ray::ServeContr", "ray::ServeController.listen_for_change", "ray"),
        ("gcs_server", "/x/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/t", "ray"),
        ("raylet", "/x/raylet --raylet_socket_name=/tmp/ray/s", "ray"),
        ("python", "/x/bin/python /x/site-packages/ray/dashboard/dashboard.py", "ray"),
        ("python", "/x/bin/python -m vllm.entrypoints.openai.api_server --port 8100",
         "request path"),
        ("python", "/x/bin/python -m serve_app.bench.direct_pd --port 8000", "request path"),
        ("kdamond.0", "", "other"),
        ("python", "/x/bin/python -m pytest", "other"),
    ],
)
def test_processes_fall_into_their_group(name: str, cmdline: str, group: str) -> None:
    assert cpu_time.group_of(name, cmdline) == group


def _fake_proc(root: Path, pid: int, name: str, cmdline: str, utime: int, stime: int) -> None:
    folder = root / str(pid)
    folder.mkdir(parents=True, exist_ok=True)
    # comm may hold spaces and parentheses: the fields are read after the last ')'
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "0", "0", "0", "0", "0",
              str(utime), str(stime), "0", "0", "20", "0", "1", "0"]
    (folder / "stat").write_text(f"{pid} ({name}) {' '.join(fields)}\n")
    (folder / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")


def test_proc_snapshots_diff_into_groups(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    _fake_proc(tmp_path, 10, "VLLM::Worker", "VLLM::Worker", 2 * ticks, ticks)
    _fake_proc(tmp_path, 11, "ray::ServeRepli", "ray::ServeReplica:pd:Router", ticks, 0)
    _fake_proc(tmp_path, 12, "odd) name (x", "some tool", 0, 0)
    (tmp_path / "self").mkdir()  # not a pid: skipped
    before = cpu_time.Snapshot(cpu_time.read_processes(tmp_path), client_s=1.0)
    assert before.processes == {10: ("engine", 3.0), 11: ("request path", 1.0),
                                12: ("other", 0.0)}
    _fake_proc(tmp_path, 10, "VLLM::Worker", "VLLM::Worker", 4 * ticks, 2 * ticks)
    _fake_proc(tmp_path, 11, "ray::ServeRepli", "ray::ServeReplica:pd:Router", 2 * ticks, 0)
    _fake_proc(tmp_path, 13, "VLLM::EngineCor", "VLLM::EngineCore", ticks, 0)  # new: from 0
    after = cpu_time.Snapshot(cpu_time.read_processes(tmp_path), client_s=3.5)
    assert cpu_time.cpu_by_group(before, after) == {
        "engine": 4.0, "request path": 1.0, "ray": 0.0, "client": 2.5, "other": 0.0}


def test_per_request_and_pooled_figures() -> None:
    usage = {"engine": 4.0, "request path": 1.0, "ray": 0.0, "client": 2.5, "other": 0.5}
    assert cpu_time.per_request_ms(usage, 100) == {
        "engine": 40.0, "request path": 10.0, "ray": 0.0, "client": 25.0, "other": 5.0,
        "total": 80.0}
    assert cpu_time.per_request_ms(usage, 0) == {}
    rounds = [
        {"wall_s": 10.0, "requests": 100, "cpu_s": usage},
        {"wall_s": 6.0, "requests": 60, "cpu_s": {"engine": 2.4, "client": 0.6}},
    ]
    # (4.0 + 2.4) s over 160 requests = 40 ms; 11.0 CPU-s over 16 wall-s = 0.69 cores
    assert cpu_time.pooled(rounds) == {
        "engine": 40.0, "request path": 6.25, "ray": 0.0, "client": 19.38, "other": 3.12,
        "total": 68.75, "cores": 0.69}


def test_the_summary_tables_pool_the_rounds(tmp_path: Path) -> None:
    (tmp_path / "rounds").mkdir()
    for label, engine_s in (("unified", 2.0), ("pd", 3.0)):
        for round_no in (1, 2):
            cpu_path(tmp_path, label, round_no).write_text(json.dumps({
                "mixed": {"wall_s": 10.0, "requests": 100,
                          "cpu_s": {"engine": engine_s, "request path": 1.0, "client": 0.5}},
            }))
    text = cpu_time.tables(["unified", "pd"], tmp_path, 2, ("mixed", "mixed-sweep"))
    mixed, sweep = text.split("\n\n")
    rows = {line.split()[0]: line.split()[1:] for line in mixed.splitlines()[2:]}
    # engine, request path, ray, client, other, total (ms per request), cores busy
    assert rows == {"unified": ["20.0", "10.0", "0.0", "5.0", "0.0", "35.0", "0.35"],
                    "pd": ["30.0", "10.0", "0.0", "5.0", "0.0", "45.0", "0.45"]}
    assert sweep.endswith("(no CPU figures: /proc was not readable)")


def test_sweep_for_a_time_per_rate(tmp_path: Path) -> None:
    plan = parse_plan(["--preset", "cpu", "--out", str(tmp_path), "--mix", MIX,
                       "--rates", "16,32", "--seconds-per-rate", "12"])
    steps = workload_steps("pd", plan.opts, "http://127.0.0.1:8001", plan.setup.model_name,
                           plan.setup.model_source, 1)
    sweep = steps[-1].args
    assert sweep[0] == "sweep" and "--num-requests" not in sweep
    assert sweep[sweep.index("--duration-s") + 1] == "12"
    check_args(bench_parser().parse_args(sweep))
    assert "a rate sweep 16,32 with 12 s of requests per rate" in describe_workload(plan.opts)
    # the measured run at one rate keeps its count
    assert steps[1].args[steps[1].args.index("--num-requests") + 1] == "200"


def test_a_time_per_rate_must_be_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_plan(["--preset", "cpu", "--out", str(tmp_path), "--seconds-per-rate", "0"])
    assert "--seconds-per-rate must be > 0, got 0.0" in capsys.readouterr().err


def test_requests_are_counted_in_runs_and_sweeps(tmp_path: Path) -> None:
    run, sweep = tmp_path / "run.json", tmp_path / "sweep.json"
    record = {"request_id": "r"}
    run.write_text(json.dumps({"kind": "run", "records": [record] * 3}))
    sweep.write_text(json.dumps({"kind": "sweep", "runs": [{"records": [record] * 4},
                                                           {"records": [record] * 5}]}))
    assert (cpu_time.count_requests(run), cpu_time.count_requests(sweep)) == (3, 9)
