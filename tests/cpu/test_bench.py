"""Benchmark arithmetic without any server: percentiles, summary, SLOs, goodput, arrivals, prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from serve_app.bench.__main__ import main as bench_main
from serve_app.bench.arrivals import arrival_offsets, inter_arrival_times
from serve_app.bench.cli import build_configs, build_parser
from serve_app.bench.records import RequestRecord
from serve_app.bench.stats import SLO, find_goodput, percentile, slo_attainment, summarize
from serve_app.bench.sweep import bisect_rate
from serve_app.bench.workload import (
    DatasetPrompts,
    MixedPrompts,
    SyntheticPrompts,
    WordText,
    WorkloadConfig,
    load_dataset,
    make_prompt_source,
    parse_len_range,
    parse_mix,
)

TINY_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"


def fixed_records() -> list[RequestRecord]:
    """Four successes and one failure with round numbers (seconds)."""
    return [
        RequestRecord("r1", ttft_s=0.1, e2e_s=0.5, output_tokens=5, itl_s=[0.1] * 4),
        RequestRecord("r2", ttft_s=0.2, e2e_s=0.8, output_tokens=4, itl_s=[0.2] * 3),
        RequestRecord("r3", ttft_s=0.3, e2e_s=1.2, output_tokens=10, itl_s=[0.1] * 9),
        RequestRecord("r4", ttft_s=0.4, e2e_s=0.4, output_tokens=1),
        RequestRecord("r5", e2e_s=0.05, error="HTTP 400: bad"),
    ]


def test_refusals_to_retry_are_counted_apart_from_other_errors() -> None:
    records = [*fixed_records(),
               RequestRecord("r6", e2e_s=0.01, error='HTTP 429: {"error": {"code": 429}}'),
               RequestRecord("r7", e2e_s=0.01, error='HTTP 503: {"error": {"code": 503}}'),
               RequestRecord("r8", e2e_s=30.0, error="ReadTimeout: ")]
    summary = summarize(records, duration_s=2.0)
    assert (summary["num_errors"], summary["num_shed"]) == (4, 2)


# percentiles ----------------------------------------------------------------------------------


def test_percentile_linear_interpolation_by_hand() -> None:
    # h = (n - 1) * q / 100 over sorted values, then interpolate between x[floor h] and the next.
    assert percentile([10, 20, 30, 40], 50) == pytest.approx(25.0)
    assert percentile([40, 10, 30, 20], 90) == pytest.approx(37.0)
    assert percentile([10, 20, 30, 40], 99) == pytest.approx(39.7)
    assert percentile([10, 20, 30, 40], 0) == 10
    assert percentile([10, 20, 30, 40], 100) == 40
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_percentile_matches_numpy_default() -> None:
    values = list(np.random.default_rng(3).lognormal(size=101))
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summary_of_fixed_records() -> None:
    summary = summarize(fixed_records(), duration_s=2.0)
    assert summary["num_requests"] == 5
    assert summary["num_completed"] == 4
    assert summary["num_errors"] == 1
    assert summary["errors"] == {"HTTP 400: bad": 1}
    assert summary["num_shed"] == 0  # a 400 is the client's fault, not a refusal to retry
    # TTFT of the successes, ms: 100, 200, 300, 400.
    assert summary["ttft_ms"]["mean"] == pytest.approx(250.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert summary["ttft_ms"]["p90"] == pytest.approx(370.0)
    assert summary["ttft_ms"]["p99"] == pytest.approx(397.0)
    # TPOT = (E2E - TTFT) / (out - 1): r1 400/4 = 100, r2 600/3 = 200, r3 900/9 = 100; r4 has none.
    assert summary["tpot_ms"]["count"] == 3
    assert summary["tpot_ms"]["mean"] == pytest.approx(400 / 3)
    assert summary["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert summary["tpot_ms"]["p90"] == pytest.approx(180.0)
    assert summary["tpot_ms"]["p99"] == pytest.approx(198.0)
    # ITL pooled: thirteen gaps of 100 ms and three of 200 ms.
    assert summary["itl_ms"]["count"] == 16
    assert summary["itl_ms"]["mean"] == pytest.approx(118.75)
    assert summary["itl_ms"]["p50"] == pytest.approx(100.0)
    assert summary["itl_ms"]["p90"] == pytest.approx(200.0)
    # E2E of the successes, ms: 400, 500, 800, 1200.
    assert summary["e2e_ms"]["mean"] == pytest.approx(725.0)
    assert summary["e2e_ms"]["p50"] == pytest.approx(650.0)
    assert summary["e2e_ms"]["p90"] == pytest.approx(1080.0)
    assert summary["e2e_ms"]["p99"] == pytest.approx(1188.0)
    assert summary["request_throughput_rps"] == pytest.approx(2.0)
    assert summary["output_token_throughput_tps"] == pytest.approx(10.0)
    assert summary["slo_attainment"] is None


def test_summary_without_successes_has_empty_stats() -> None:
    summary = summarize([RequestRecord("x", e2e_s=0.1, error="boom")], duration_s=1.0)
    assert summary["ttft_ms"] == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    assert summary["request_throughput_rps"] == 0.0


# SLO attainment and goodput ----------------------------------------------------------------------


def test_slo_attainment_counts_failures_as_misses() -> None:
    records = fixed_records()
    # Both SLOs: only r1 (TTFT 100, TPOT 100) meets TTFT <= 250 and TPOT <= 150.
    assert slo_attainment(records, SLO(ttft_ms=250, tpot_ms=150)) == pytest.approx(0.2)
    # TTFT only: r1, r2, r3.
    assert slo_attainment(records, SLO(ttft_ms=350)) == pytest.approx(0.6)
    # TPOT only: r1, r3, and r4, whose single token has no TPOT to miss.
    assert slo_attainment(records, SLO(tpot_ms=150)) == pytest.approx(0.6)
    # The boundary counts as met.
    assert slo_attainment(records, SLO(ttft_ms=100, tpot_ms=100)) == pytest.approx(0.2)
    assert slo_attainment(records, SLO()) is None
    summary = summarize(records, duration_s=2.0, slo=SLO(ttft_ms=250, tpot_ms=150))
    assert summary["slo_attainment"] == pytest.approx(0.2)
    assert summary["slo_goodput_rps"] == pytest.approx(0.5)


def records_with_attainment(num_met: int, num_total: int) -> list[RequestRecord]:
    met = [RequestRecord(f"m{i}", ttft_s=0.1, e2e_s=0.2, output_tokens=2) for i in range(num_met)]
    missed = [
        RequestRecord(f"x{i}", ttft_s=2.0, e2e_s=2.1, output_tokens=2)
        for i in range(num_total - num_met)
    ]
    return met + missed


def test_goodput_is_highest_rate_before_first_miss() -> None:
    slo = SLO(ttft_ms=500, tpot_ms=500)
    runs = [
        (8.0, records_with_attainment(92, 100)),
        (1.0, records_with_attainment(100, 100)),
        (2.0, records_with_attainment(90, 100)),  # exactly the target: passes
        (4.0, records_with_attainment(85, 100)),
    ]
    result = find_goodput(runs, slo, target=0.9)
    assert result.goodput_rps == 2.0
    assert result.attainment_by_rate == [(1.0, 1.0), (2.0, 0.9), (4.0, 0.85), (8.0, 0.92)]
    assert find_goodput(runs, slo, target=0.9, require_all_lower=False).goodput_rps == 8.0
    assert find_goodput(runs, slo, target=0.99).goodput_rps == 1.0


def test_goodput_none_when_every_rate_misses() -> None:
    runs = [(1.0, records_with_attainment(5, 10)), (2.0, records_with_attainment(1, 10))]
    assert find_goodput(runs, SLO(ttft_ms=500)).goodput_rps is None
    with pytest.raises(ValueError):
        find_goodput(runs, SLO())


async def test_bisect_rate_narrows_to_threshold() -> None:
    measured: list[float] = []

    async def measure(rate: float) -> float:
        measured.append(rate)
        return 1.0 if rate <= 5.3 else 0.5

    passing, failing = await bisect_rate(measure, 4.0, 8.0, target=0.9, num_steps=6)
    assert measured[:2] == [6.0, 5.0]
    assert passing <= 5.3 < failing
    assert failing - passing == pytest.approx(4.0 / 2**6)


# arrivals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrival", "burstiness", "expected_cv"),
    [("poisson", 1.0, 1.0), ("poisson", 0.3, 1.0), ("gamma", 0.5, 2**0.5), ("gamma", 4.0, 0.5)],
)
def test_inter_arrival_statistics(arrival: str, burstiness: float, expected_cv: float) -> None:
    gaps = inter_arrival_times(40_000, rate=4.0, arrival=arrival, burstiness=burstiness, seed=7)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(expected_cv, rel=0.05)


def test_arrivals_are_seeded_and_start_at_zero() -> None:
    first = arrival_offsets(2.0, "gamma", 0.5, seed=11)
    again = arrival_offsets(2.0, "gamma", 0.5, seed=11)
    offsets = [next(first) for _ in range(50)]
    assert offsets == [next(again) for _ in range(50)]
    assert offsets[0] == 0.0
    assert all(later > earlier for earlier, later in zip(offsets, offsets[1:], strict=False))
    unlimited = arrival_offsets(float("inf"))
    assert [next(unlimited) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert not inter_arrival_times(3, float("inf")).any()


@pytest.mark.parametrize(
    ("rate", "arrival", "burstiness"), [(0, "poisson", 1), (1, "x", 1), (1, "gamma", 0)]
)
def test_arrivals_reject_bad_settings(rate: float, arrival: str, burstiness: float) -> None:
    with pytest.raises(ValueError):
        inter_arrival_times(1, rate, arrival, burstiness)


# prompts ------------------------------------------------------------------------------------------


def test_dataset_jsonl_parsing(tmp_path: Path) -> None:
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "what is prefill"},
                {"from": "gpt", "value": "it reads the prompt once"},
                {"from": "human", "value": "ignored later turn"},
            ]
        },
        {"prompt": "plain prompt", "output_len": 7},
        {
            "conversations": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "a b"},
            ]
        },
        {"conversations": [{"from": "human", "value": "no reply"}]},
        {"prompt": "", "output_len": 3},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    prompts = load_dataset(path, WordText())
    assert [(p.text, p.output_len) for p in prompts] == [
        ("what is prefill", 5),
        ("plain prompt", 7),
        ("hi", 2),
    ]
    forced = load_dataset(path, WordText(), forced_output_len=3)
    assert [p.output_len for p in forced] == [3, 3, 3, 3]
    array_path = tmp_path / "data.json"
    array_path.write_text(json.dumps(rows))
    assert load_dataset(array_path, WordText()) == prompts


def test_dataset_prompts_cycle_in_seeded_order(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "output_len": 1}) + "\n" for i in range(3))
    )
    source = DatasetPrompts(load_dataset(path, WordText()), seed=1)
    first_pass = [source.get(i).text for i in range(3)]
    assert sorted(first_pass) == ["p0", "p1", "p2"]
    assert [source.get(i).text for i in range(3, 6)] == first_pass


def test_synthetic_prompts_lengths_and_reproducibility() -> None:
    config = WorkloadConfig(input_len=12, output_len=5, seed=4)
    source = SyntheticPrompts(config, WordText())
    prompt = source.get(0)
    assert len(prompt.text.split()) == 12
    assert prompt.output_len == 5
    assert source.get(0) == prompt
    assert source.get(1).text != prompt.text
    ranged = SyntheticPrompts(
        WorkloadConfig(input_len_range=(3, 6), output_len_range=(2, 4), seed=4), WordText()
    )
    samples = [ranged.get(i) for i in range(200)]
    assert {len(p.text.split()) for p in samples} == {3, 4, 5, 6}
    assert {p.output_len for p in samples} == {2, 3, 4}
    assert parse_len_range("3:6") == (3, 6)
    for bad in ("6:3", "0:2", "5"):
        with pytest.raises(ValueError):
            parse_len_range(bad)


@pytest.mark.skipif(not TINY_MODEL.exists(), reason="run `python -m serve_app.tiny_model` first")
def test_tokenizer_prompts_have_exact_token_counts() -> None:
    from serve_app.bench.workload import TokenizerText

    maker = TokenizerText(str(TINY_MODEL))
    for length in (1, 7, 64, 300):
        for index in range(5):
            text = maker.make(length, np.random.default_rng([index, length]))
            assert len(maker.tokenizer.encode(text)) == length


# mixed workloads ------------------------------------------------------------------------------

ISSUE_MIX = "chat:0.8:64:128,doc:0.2:1700:8"


def test_mix_class_proportions_and_reproducibility() -> None:
    classes = parse_mix("chat:6:4:3, mid:3:8:2 ,doc:1:16:1")
    assert [(c.name, c.weight, c.input_len, c.output_len) for c in classes] == [
        ("chat", 6.0, 4, 3), ("mid", 3.0, 8, 2), ("doc", 1.0, 16, 1)]
    source = MixedPrompts(classes, seed=5, text_maker=WordText())
    drawn = [source.class_of(index).name for index in range(20_000)]
    for name, share in (("chat", 0.6), ("mid", 0.3), ("doc", 0.1)):
        assert drawn.count(name) / len(drawn) == pytest.approx(share, abs=0.01)
    for index in range(50):
        prompt = source.get(index)
        mix_class = next(c for c in classes if c.name == prompt.class_name)
        assert prompt.class_name == drawn[index]
        assert (len(prompt.text.split()), prompt.output_len) == (
            mix_class.input_len, mix_class.output_len)
        assert source.get(index) == prompt  # from (seed, index) alone
    other_seed = MixedPrompts(classes, seed=6, text_maker=WordText())
    assert [other_seed.class_of(i).name for i in range(200)] != drawn[:200]


@pytest.mark.skipif(not TINY_MODEL.exists(), reason="run `make setup` first")
def test_mix_prompts_have_each_class_exact_token_counts() -> None:
    from serve_app.bench.workload import TokenizerText

    maker = TokenizerText(str(TINY_MODEL))
    source = make_prompt_source(
        WorkloadConfig(mix=parse_mix(ISSUE_MIX), tokenizer=str(TINY_MODEL), seed=3))
    prompts = [source.get(index) for index in range(30)]
    assert {p.class_name for p in prompts} == {"chat", "doc"}
    lengths = {"chat": (64, 128), "doc": (1700, 8)}
    for prompt in prompts:
        assert (len(maker.tokenizer.encode(prompt.text)), prompt.output_len) == lengths[
            prompt.class_name]


def test_mix_from_a_json_file(tmp_path: Path) -> None:
    rows = [{"name": "chat", "weight": 0.8, "input_len": 64, "output_len": 128},
            {"name": "doc", "weight": 0.2, "input_len": 1700, "output_len": 8}]
    (tmp_path / "mix.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"classes": rows}))
    assert parse_mix(str(tmp_path / "mix.json")) == parse_mix(ISSUE_MIX)
    assert parse_mix(str(tmp_path / "wrapped.json")) == parse_mix(ISSUE_MIX)
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], {**rows[1], "weight": -1}]))
    with pytest.raises(ValueError, match=r"bad.json class 2: weight must be a number > 0"):
        parse_mix(str(tmp_path / "bad.json"))
    (tmp_path / "short.json").write_text(json.dumps([{"name": "x", "weight": 1}]))
    with pytest.raises(ValueError, match="short.json class 1: expected an object with keys"):
        parse_mix(str(tmp_path / "short.json"))
    with pytest.raises(ValueError, match="missing.json"):
        parse_mix(str(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("chat:0:64:128", "part 'chat:0:64:128': weight must be a number > 0, got '0'"),
        ("chat:1:64:128,doc:-2:1700:8", "part 'doc:-2:1700:8': weight must be a number > 0"),
        ("chat:1:64:128,doc:x:1700:8", "part 'doc:x:1700:8': weight must be a number > 0"),
        ("chat:1:0:128", "part 'chat:1:0:128': input_len must be an integer >= 1, got '0'"),
        ("chat:1:64:0", "part 'chat:1:64:0': output_len must be an integer >= 1, got '0'"),
        ("chat:1:6.5:2", "input_len must be an integer >= 1, got '6.5'"),
        ("chat:1:64", "part 'chat:1:64': expected name:weight:input_len:output_len"),
        ("a b:1:2:3", "class name 'a b' must be letters, digits"),
        ("x:1:2:3,x:2:3:4", "class names must be unique, repeated: x"),
        ("", "--mix is empty"),
    ],
)
def test_mix_errors_name_the_bad_part(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_mix(spec)


def test_mix_excludes_datasets_and_ranges() -> None:
    mix = parse_mix(ISSUE_MIX)
    with pytest.raises(ValueError, match="--mix and --dataset are exclusive"):
        WorkloadConfig(mix=mix, dataset="rows.jsonl")
    with pytest.raises(ValueError, match="drop --input/output-len-range"):
        WorkloadConfig(mix=mix, input_len_range=(1, 4))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mix", "chat:1:64:128,doc:0:1700:8"], "argument --mix: --mix part 'doc:0:1700:8': "
                                                  "weight must be a number > 0"),
        (["--mix", ISSUE_MIX, "--dataset", "x.jsonl"], "--mix and --dataset are exclusive"),
        (["--mix", ISSUE_MIX, "--class-slo", "img:100:-"],
         "--class-slo names img, not a class of --mix (chat, doc)"),
        (["--class-slo", "doc:100:-"], "--class-slo names doc, not a class of --mix (none"),
        (["--mix", ISSUE_MIX, "--class-slo", "doc:100"], "must look like NAME:TTFT_MS:TPOT_MS"),
        (["--mix", ISSUE_MIX, "--class-slo", "doc:0:-"], "TTFT_MS must be a number > 0 or '-'"),
        (["--mix", ISSUE_MIX, "--class-slo", "doc:1:-", "--class-slo", "doc:2:-"],
         "one entry per class, repeated: doc"),
    ],
)
def test_mix_flags_fail_with_a_clear_usage_error(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_main(["run", "--model", "m", "--no-progress", *extra])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_mix_flags_build_the_configs() -> None:
    args = build_parser().parse_args(
        ["sweep", "--model", "m", "--rates", "1,2", "--mix", ISSUE_MIX, "--slo-ttft-ms", "300",
         "--slo-tpot-ms", "40", "--class-slo", "doc:2000:-", "--class-slo", "chat::20"])
    _, workload, slo = build_configs(args)
    assert workload.mix == parse_mix(ISSUE_MIX)
    assert slo.for_class("doc") == SLO(ttft_ms=2000, tpot_ms=40)
    assert slo.for_class("chat") == SLO(ttft_ms=300, tpot_ms=20)
    assert slo.for_class(None) == SLO(ttft_ms=300, tpot_ms=40)
    assert SLO.from_json(slo.to_json()) == slo


def mixed_records() -> list[RequestRecord]:
    """Three chats and two docs (one failed), round numbers in seconds."""
    return [
        RequestRecord("c1", ttft_s=0.1, e2e_s=0.5, output_tokens=5, itl_s=[0.1] * 4,
                      class_name="chat"),
        RequestRecord("c2", ttft_s=0.2, e2e_s=1.0, output_tokens=5, itl_s=[0.2] * 4,
                      class_name="chat"),
        RequestRecord("c3", ttft_s=0.3, e2e_s=0.7, output_tokens=5, itl_s=[0.1] * 4,
                      class_name="chat"),
        RequestRecord("d1", ttft_s=0.9, e2e_s=1.2, output_tokens=4, itl_s=[0.1] * 3,
                      class_name="doc"),
        RequestRecord("d2", e2e_s=0.05, error="HTTP 500: boom", class_name="doc"),
    ]


def test_per_class_summaries_by_hand() -> None:
    slo = SLO(ttft_ms=250, tpot_ms=150, per_class={"doc": SLO(ttft_ms=1000)})
    summary = summarize(mixed_records(), duration_s=2.0, slo=slo)
    chat, doc = summary["classes"]["chat"], summary["classes"]["doc"]
    assert list(summary["classes"]) == ["chat", "doc"]
    # chat TTFT, ms: 100, 200, 300; h = 2q/100: P90 = 200 + 0.8 * 100, P99 = 200 + 0.98 * 100.
    assert (chat["ttft_ms"]["p50"], chat["ttft_ms"]["p90"], chat["ttft_ms"]["p99"]) == (
        pytest.approx(200.0), pytest.approx(280.0), pytest.approx(298.0))
    # chat TPOT = (E2E - TTFT) / 4: 100, 200, 100 ms.
    assert (chat["tpot_ms"]["p50"], chat["tpot_ms"]["p90"], chat["tpot_ms"]["p99"]) == (
        pytest.approx(100.0), pytest.approx(180.0), pytest.approx(198.0))
    # chat ITL pooled: eight gaps of 100 ms, four of 200 ms; h = 11q/100.
    assert chat["itl_ms"]["count"] == 12
    assert chat["itl_ms"]["p50"] == pytest.approx(100.0)
    assert chat["itl_ms"]["p90"] == pytest.approx(200.0)  # h = 9.9: x[9] = x[10] = 200
    assert chat["itl_ms"]["p99"] == pytest.approx(200.0)
    assert chat["e2e_ms"]["p50"] == pytest.approx(700.0)
    assert chat["request_throughput_rps"] == pytest.approx(1.5)  # 3 over the run's 2 s
    # doc: one success (TTFT 900, TPOT 100, three 100 ms gaps) and one failure.
    assert (doc["num_requests"], doc["num_completed"], doc["num_errors"]) == (2, 1, 1)
    assert doc["ttft_ms"]["p99"] == pytest.approx(900.0)
    assert doc["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert doc["itl_ms"]["count"] == 3
    # SLOs: chat judged by TTFT <= 250, TPOT <= 150 (c1 only: c2 TPOT 200, c3 TTFT 300), doc by
    # TTFT <= 1000 and TPOT <= 150 (d1 met, d2 failed).
    assert chat["slo"] == {"ttft_ms": 250, "tpot_ms": 150}
    assert doc["slo"] == {"ttft_ms": 1000, "tpot_ms": 150}
    assert chat["slo_attainment"] == pytest.approx(1 / 3)
    assert doc["slo_attainment"] == pytest.approx(1 / 2)
    assert summary["slo_attainment"] == pytest.approx(2 / 5)
    assert summary["slo"]["per_class"] == {"doc": {"ttft_ms": 1000, "tpot_ms": None}}
    # Overall: TTFT of the four successes 100, 200, 300, 900.
    assert summary["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert summary["ttft_ms"]["p99"] == pytest.approx(300 + 0.97 * 600)
    assert "classes" not in summarize(fixed_records(), duration_s=2.0)


def test_goodput_judges_each_request_by_its_class_slo() -> None:
    def at_rate(doc_ttft_s: float) -> list[RequestRecord]:
        chats = [RequestRecord(f"c{i}", ttft_s=0.1, e2e_s=0.2, output_tokens=2, class_name="chat")
                 for i in range(9)]
        return [*chats, RequestRecord("d", ttft_s=doc_ttft_s, e2e_s=doc_ttft_s + 0.1,
                                      output_tokens=2, class_name="doc")]

    runs = [(1.0, at_rate(0.8)), (2.0, at_rate(1.5)), (4.0, at_rate(3.0))]
    overall_only = SLO(ttft_ms=500)
    with_doc_slo = SLO(ttft_ms=500, per_class={"doc": SLO(ttft_ms=2000)})
    assert find_goodput(runs, overall_only, target=0.95).goodput_rps is None
    assert find_goodput(runs, with_doc_slo, target=0.95).goodput_rps == 2.0
    assert SLO(per_class={"doc": SLO(ttft_ms=1.0)}).is_set


def test_small_model_is_the_tiny_one_scaled_up(tmp_path: Path) -> None:
    """`--size small` (benchmarks where compute should dominate) keeps the tiny model's
    tokenizer and vocabulary and changes only the shape."""
    from safetensors import safe_open

    from serve_app.tiny_model import SIZES, build

    folder = build(tmp_path / "small", size="small")
    config = json.loads((folder / "config.json").read_text())
    assert {key: config[key] for key in SIZES["small"]} == SIZES["small"]
    assert config["vocab_size"] == 1024
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        names = weights.keys()  # a safetensors handle, not a dict
        params = sum(int(np.prod(weights.get_slice(name).get_shape())) for name in names)
    assert 20e6 < params < 30e6
    if TINY_MODEL.exists():
        tiny = json.loads((TINY_MODEL / "tokenizer.json").read_text())
        assert json.loads((folder / "tokenizer.json").read_text())["model"] == tiny["model"]
