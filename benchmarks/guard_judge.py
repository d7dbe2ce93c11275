"""The guard's judging rate, without Kafka: events per second through `StreamJudge`.

    .venv/bin/python benchmarks/guard_judge.py            # 2,000 streams of 200 tokens
    .venv/bin/python benchmarks/guard_judge.py --quick    # 200 streams

Synthetic streams (``started``, 200 tokens of English-like text with an e-mail
address in one stream in ten, ``finished``), judged one event at a time, as the
guard does when each fetch brings one event of a stream (its slowest case: a fetch
of many events is judged once). The default policy (every PII recognizer) and a
deny list of 20 words; no semantic check (``--topics`` adds it: the real
all-MiniLM-L6-v2). Writes benchmarks/results/guard_judge.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

from consumers.guard import StreamJudge, TenantPolicy, recognizers_for
from schemas import (
    FinishedEvent,
    FinishReason,
    ModerationMode,
    StartedEvent,
    StreamEvent,
    Timings,
    TokenEvent,
    Usage,
    uuid7,
)

WORDS = [
    "the", "river", "runs", "past", "old", "mills", "and", "quiet", "towns", "where",
    "people", "walk", "at", "dusk", "talking", "of", "weather", "bread", "trains", "and",
]  # fmt: skip


def stream(i: int, tokens: int) -> list[StreamEvent]:
    rid, now = uuid7(), datetime.now(UTC)
    common = {"request_id": rid, "ts": now, "worker": "w", "attempt": 1}
    events: list[StreamEvent] = [
        StartedEvent(**common, seq=0, model="m", model_revision="r", prompt_tokens=1,
                     queue_wait_ms=0, tenant="t", moderation=ModerationMode.MONITOR)
    ]  # fmt: skip
    for n in range(tokens):
        text = " " + WORDS[(i + n) % len(WORDS)]
        if i % 10 == 0 and n == tokens // 2:
            text = " jdoe@example.com"
        events.append(TokenEvent(**common, seq=n + 1, text=text, token_ids=[n]))
    events.append(
        FinishedEvent(**common, seq=tokens + 1, finish_reason=FinishReason.LENGTH,
                      usage=Usage(prompt_tokens=1, completion_tokens=tokens),
                      timings=Timings(ttft_ms=1, total_ms=2))
    )  # fmt: skip
    return events


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--topics", action="store_true", help="add the semantic check")
    args = parser.parse_args()
    streams, tokens = (200, 200) if args.quick else (2000, 200)
    policy = TenantPolicy(deny=tuple(f"forbidden{i}" for i in range(20)),
                          topics=("building explosives",) if args.topics else ())  # fmt: skip
    similarity = None
    if args.topics:
        from consumers.guard.semantic import TopicModel

        similarity = TopicModel().similarity
    recognizers = recognizers_for(policy)
    built = [stream(i, tokens) for i in range(streams)]
    flagged = events = 0
    began = time.perf_counter()
    for events_of in built:
        judge = StreamJudge(events_of[0].request_id, tenant="t", mode=ModerationMode.MONITOR,
                            policy=policy, recognizers=recognizers,
                            similarity=similarity)  # fmt: skip
        for event in events_of:
            judge.add(event)
            judge.judge()
            events += 1
        flagged += judge.flagged
    took = time.perf_counter() - began
    result = {
        "events": events, "streams": streams, "flagged_streams": flagged,
        "seconds": round(took, 3), "events_per_s": round(events / took),
        "semantic_check": args.topics, "python": platform.python_version(),
        "machine": platform.machine(), "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "guard_judge.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
