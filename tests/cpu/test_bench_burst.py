"""The burst measurement's summary (`serve_app.bench.burst`), from hand-made outcomes."""

from __future__ import annotations

from serve_app.bench.burst import summarize


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
