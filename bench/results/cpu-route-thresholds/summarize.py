"""Tables of the route-threshold screen: run.sh's records, pooled over rounds (README.md here).

usage: python bench/results/cpu-route-thresholds/summarize.py OUTDIR [RATE]
       python bench/results/cpu-route-thresholds/summarize.py --mix OUTDIR   (the check, ab2.sh)
"""

import sys
from pathlib import Path

from serve_app.bench.records import RequestRecord, load_runs
from serve_app.bench.stats import percentile

PROMPTS = (128, 256, 512, 1024, 1700)
OUTPUTS = (2, 8, 16, 32, 64)


def pooled(out: Path, pattern: str) -> list[RequestRecord]:
    """Every request of the runs whose files match `pattern`: the rounds pooled."""
    return [r for path in sorted(out.glob(pattern)) for run in load_runs(path) for r in run.records]


def records(out: Path, system: str, name: str, rate: int) -> list[RequestRecord]:
    tag = "" if rate == 6 else f"r{rate}-"
    return pooled(out, f"{system}-{name}-{tag}[0-9].json.gz")


def ms(values: list[float], q: float, digits: int = 1) -> str:
    return f"{percentile(values, q) * 1000:.{digits}f}" if values else "-"


def row(rs: list[RequestRecord]) -> str:
    ok = [r for r in rs if r.error is None]
    probe = [r for r in ok if r.class_name == "probe"]
    chat = [r for r in ok if r.class_name == "chat"]
    ttft = [r.ttft_s for r in probe]
    e2e = [r.e2e_s for r in probe]
    chat_tpot = [r.tpot_s for r in chat]
    chat_gap = [max(r.itl_s) for r in chat if r.itl_s]
    return (
        f"{len(probe)} | {ms(ttft, 50)} / {ms(ttft, 99)} | {ms(e2e, 50)} / {ms(e2e, 99)} | "
        f"{ms(chat_tpot, 50, 2)} / {ms(chat_tpot, 99, 2)} | "
        f"{ms(chat_gap, 50)} / {ms(chat_gap, 99)} | {len(rs) - len(ok)}"
    )


def main(out: Path, rate: int) -> None:
    head = (
        "| probe: route | probes | probe TTFT P50 / P99 | probe end to end P50 / P99 | "
        "chat TPOT P50 / P99 | chat longest gap P50 / P99 | failed |\n" + "|---" * 7 + "|"
    )
    print(f"{rate} req/s. Prompt sweep (probe: L prompt tokens, 64 output tokens), ms\n")
    print(head)
    for length in PROMPTS:
        for system in ("local", "disagg", "whole"):
            rs = records(out, system, f"p{length}", rate)
            if rs:
                print(f"| {length}: {system} | {row(rs)} |")
    print(f"\n{rate} req/s. Output sweep (probe: 1,700 prompt tokens, N output tokens), ms\n")
    print(head)
    for count in OUTPUTS:
        name = f"o{count}" if count != 64 else "p1700"
        for system in ("disagg", "whole"):
            rs = records(out, system, name, rate)
            if rs:
                print(f"| {count}: {system} | {row(rs)} |")


def mix(out: Path) -> None:
    """The issue-14 mix (ab2.sh's SYSTEM-RATE-ROUND.json.gz), pooled over rounds."""
    print(
        "| system, rate | TTFT P50 / P99 | TPOT P50 / P99 | end to end P50 / P99 | "
        "chat TPOT P99 | doc TTFT P50 / P99 | failed |\n" + "|---" * 7 + "|"
    )
    for rate in (6, 40):
        for system in ("unified", "pd", "pdnew"):
            rs = pooled(out, f"{system}-{rate}-[0-9].json.gz")
            ok = [r for r in rs if r.error is None]
            tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
            chat = [r.tpot_s for r in ok if r.class_name == "chat"]
            doc = [r.ttft_s for r in ok if r.class_name == "doc"]
            ttft, e2e = [r.ttft_s for r in ok], [r.e2e_s for r in ok]
            print(
                f"| {system}, {rate} | {ms(ttft, 50)} / {ms(ttft, 99)} | "
                f"{ms(tpot, 50, 2)} / {ms(tpot, 99, 2)} | {ms(e2e, 50)} / {ms(e2e, 99)} | "
                f"{ms(chat, 99, 2)} | {ms(doc, 50)} / {ms(doc, 99)} | {len(rs) - len(ok)} |"
            )


if __name__ == "__main__":
    if sys.argv[1] == "--mix":
        mix(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6)
