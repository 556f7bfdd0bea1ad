"""The tracing-overhead benchmark's figures: each run's on/off ratios, and runs pooled as rounds
(`python -m serve_app.bench.tracing_overhead --pool`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.bench.tracing_overhead import main, pool, summarize


def _write_run(folder: Path, on_ms: list[float], off_ms: list[float]) -> None:
    folder.mkdir(parents=True)
    rows = [{"block": 0, "arm": "on", "status": 200, "ttft_s": ms / 1000, "e2e_s": 4 * ms / 1000}
            for ms in on_ms]
    rows += [{"block": 1, "arm": "off", "status": 200, "ttft_s": ms / 1000,
              "e2e_s": 4 * ms / 1000} for ms in off_ms]
    rows.append({"block": 1, "arm": "off", "status": 500, "ttft_s": None, "e2e_s": 9.0})
    (folder / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_one_run_ratios_leave_failed_requests_out(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", on_ms=[40, 42, 44], off_ms=[40, 40, 40])
    rows = [json.loads(line) for line in (tmp_path / "a/requests.jsonl").read_text().splitlines()]
    summary = summarize(rows)
    assert summary["off"]["num_requests"] == 3  # the 500 is not timed
    assert summary["ttft_p50_ms_on_over_off"] == pytest.approx(42 / 40)
    assert summary["e2e_mean_ms_on_over_off"] == pytest.approx(42 / 40)


def test_runs_pool_as_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "a", on_ms=[40, 42, 44], off_ms=[40, 40, 40])  # on slower
    _write_run(tmp_path / "b", on_ms=[38, 38, 38], off_ms=[39, 40, 41])  # on faster
    pooled = pool([tmp_path / "a", tmp_path / "b"])
    # on: 38 38 38 40 42 44 -> P50 39; off: 39 40 40 40 40 41 -> P50 40
    assert pooled["on"]["num_requests"] == pooled["off"]["num_requests"] == 6
    assert pooled["ttft_p50_ms_on_over_off"] == pytest.approx(39 / 40)
    assert pooled["runs"][str(tmp_path / "a")]["ttft_p50_ms_on_over_off"] == pytest.approx(1.05)
    assert pooled["runs"][str(tmp_path / "b")]["ttft_p50_ms_on_over_off"] == pytest.approx(38 / 40)
    assert main(["--pool", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--out", str(tmp_path / "pooled")]) == 0
    written = json.loads((tmp_path / "pooled/summary.json").read_text())
    assert written["e2e_p50_ms_on_over_off"] == pytest.approx(39 / 40)
    assert "pooled 2 runs, 6 requests per arm: TTFT P50 x0.975" in capsys.readouterr().out
