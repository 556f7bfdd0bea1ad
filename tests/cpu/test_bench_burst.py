"""The burst measurement (`serve_app.bench.burst`): its summary from hand-made outcomes, its
arguments, and its floor arm against a real bare server."""

from __future__ import annotations

import argparse

import pytest

from serve_app.bench.burst import arm_medians, floor_burst, main, summarize


def test_summary_counts_each_ending_and_times_each_kind() -> None:
    results = [(200, 0.5), (200, 1.5), (200, 2.5), (429, 0.1), (429, 0.3), (-1, 30.0)]
    summary = summarize("http://127.0.0.1:8001", results, unloaded=0.0512345)
    assert summary == {
        "url": "http://127.0.0.1:8001",
        "statuses": {"200": 3, "429": 2, "-1": 1},
        "ok_p50_max_s": [1.5, 2.5],
        "shed_p50_max_s": [0.2, 0.3],
        "unavailable_p50_max_s": None,
        "unloaded_s": 0.0512,
    }


def test_arm_medians_take_each_arms_median_p50() -> None:
    def burst(arm: str, shed: float, ok: float | None) -> dict:
        return {"arm": arm, "shed_p50_max_s": [shed, 9.0],
                "ok_p50_max_s": None if ok is None else [ok, 9.0]}

    summaries = [burst("door", 0.9, 1.4), burst("no-door", 1.3, 2.1), burst("no-door", 1.0, 1.8),
                 burst("door", 0.7, None), burst("door", 0.8, 1.2), burst("no-door", 1.1, 2.0)]
    assert arm_medians(summaries) == {"door": {"shed": 0.8},
                                      "no-door": {"shed": 1.1, "ok": 2.0}}
    for summary, alone in zip(summaries, (0.3, 0.5, 0.4, 0.2, 0.1, 0.6), strict=True):
        summary["alone_p50_max_s"] = [alone, 9.0]
    assert arm_medians(summaries)["no-door"] == {"shed": 1.1, "ok": 2.0, "alone": 0.5}


def test_door_ab_and_urls_exclude_each_other() -> None:
    for argv in ([], ["--door-ab", "--url", "http://127.0.0.1:8001"]):
        with pytest.raises(SystemExit):
            main(argv)


def test_floor_arm_bursts_at_a_bare_server_answering_429(tmp_path) -> None:
    args = argparse.Namespace(num_requests=50, timeout_s=30.0)
    results = floor_burst(args, {"model": "m", "prompt": "a burst"}, tmp_path / "floor.log")
    assert [status for status, _ in results] == [429] * 50
