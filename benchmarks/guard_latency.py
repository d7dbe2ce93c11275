"""How far the guard's watermark trails the tokens, on the embedded broker with the
real model: the delay a strict relay would add to each token event.

    PYTHONPATH=. .venv/bin/python benchmarks/guard_latency.py [--requests 8] [--tokens 64]

A worker (SmolLM2-135M, CPU unless CUDA), a guard (every PII recognizer, no
semantic check) and two readers: one of ``tokenbus.tokens`` (what a relay sees:
when each event arrives) and a `VerdictTail` (when the watermark passes it). For
each token event, the added delay is (watermark passes it) - (it arrives), 0 if
the verdict came first. Also: the guard's own pipeline (the newest event's ``ts``
to the verdict's), and the gap between tokens, which the held-back last word of
the text waits for (docs/guard.md, "The watermark"). Requests run one after
another, ``monitor`` mode, prompts with no PII. Writes benchmarks/results/guard_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from consumers.guard import Guard, Policies
from producers.submitter import Submitter
from schemas import (
    GenerationRequest,
    ModerationMode,
    TokenEvent,
    Verdict,
    decode_event,
    is_terminal,
    uuid7,
)
from tokenbus.bus.broker import EmbeddedBroker
from tokenbus.bus.kafka import ensure_topics, new_consumer, partitions_of
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import GuardSettings, KafkaSettings, WorkerSettings
from tokenbus.bus.verdicts import VerdictTail
from workers import Worker, load_model

SUBJECTS = ["rivers", "bread", "trains", "owls", "tea", "maps", "snow", "bees"]


async def measure(
    kafka: KafkaSettings, requests: int, tokens: int
) -> tuple[list[float], list[float], list[float]]:
    arrived: dict[tuple[uuid.UUID, int], float] = {}
    judged: dict[tuple[uuid.UUID, int], float] = {}
    ended: dict[uuid.UUID, asyncio.Event] = {}
    watermarks: dict[uuid.UUID, int] = {}
    texts: dict[tuple[uuid.UUID, int], str] = {}
    at_end = float("inf")
    final: dict[uuid.UUID, asyncio.Event] = {}
    pipeline: list[float] = []  # verdict ts - ts of the newest event it judged

    def on_verdict(verdict: Verdict, accepted: bool) -> None:
        now = time.perf_counter()
        rid = verdict.request_id
        for seq in range(watermarks.get(rid, -1) + 1, verdict.judged_through + 1):
            judged[(rid, seq)] = now
        watermarks[rid] = max(watermarks.get(rid, -1), verdict.judged_through)
        if verdict.event_ts is not None:
            pipeline.append((verdict.ts - verdict.event_ts).total_seconds() * 1000)
        if verdict.final:
            final.setdefault(rid, asyncio.Event()).set()

    async def read_tokens() -> None:
        consumer = new_consumer(kafka, fetch_max_wait_ms=5)
        await consumer.start()
        try:
            consumer.assign(await partitions_of(consumer, kafka.topics.tokens))
            while True:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    now = time.perf_counter()
                    for record in records:
                        event = decode_event(record.value)
                        if isinstance(event, TokenEvent):
                            arrived[(event.request_id, event.seq)] = now
                            texts[(event.request_id, event.seq)] = event.text
                        if is_terminal(event):
                            ended.setdefault(event.request_id, asyncio.Event()).set()
        finally:
            await consumer.stop()

    model = load_model(cache_dir=Path.home() / ".cache" / "tokenbus")
    worker = Worker(kafka=kafka, settings=WorkerSettings(group_id="bench-workers"), model=model)
    guard = Guard(kafka=kafka, settings=GuardSettings(), policies=Policies.builtin())
    tail = VerdictTail(kafka, on_verdict=on_verdict)
    submitter = Submitter(kafka)
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(c) for c in (worker.run(), guard.run(), tail.run(),
                                                 read_tokens())]  # fmt: skip
        await asyncio.wait_for(worker.ready.wait(), 120)
        await asyncio.wait_for(guard.ready.wait(), 120)
        for i in range(requests):
            rid = uuid7()
            ended[rid] = asyncio.Event()
            await submitter.submit(GenerationRequest(
                request_id=rid, submitted_at=datetime.now(UTC), moderation=ModerationMode.MONITOR,
                messages=[{"role": "user", "content": f"Write about {SUBJECTS[i % 8]}."}],
                sampling={"max_tokens": tokens, "temperature": 0},
            ))  # fmt: skip
            await asyncio.wait_for(ended[rid].wait(), 300)
            await asyncio.wait_for(final.setdefault(rid, asyncio.Event()).wait(), 30)
        await submitter.close()
        for task in tasks:
            task.cancel()
    worst = sorted(arrived, key=lambda k: judged.get(k, at_end) - arrived[k], reverse=True)[:8]
    for rid, seq in worst:
        after = arrived.get((rid, seq + 1), float("nan"))
        print(f"seq {seq}: judged +{(judged[(rid, seq)] - arrived[(rid, seq)]) * 1000:.0f} ms, "
              f"next token +{(after - arrived[(rid, seq)]) * 1000:.0f} ms, "
              f"text {texts[(rid, seq)]!r}")  # fmt: skip
    delays = [max(judged[key] - at, 0.0) * 1000 for key, at in arrived.items() if key in judged]
    gaps = [
        (arrived[(rid, seq + 1)] - at) * 1000
        for (rid, seq), at in arrived.items()
        if (rid, seq + 1) in arrived
    ]
    return delays, pipeline, gaps


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 1),
        "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 1),
        "max": round(ordered[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    broker = EmbeddedBroker(port=free_port())
    broker.start()
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix="bench.")
        asyncio.run(ensure_topics(kafka))
        with contextlib.suppress(asyncio.CancelledError):
            delays, pipeline, gaps = asyncio.run(measure(kafka, args.requests, args.tokens))
    finally:
        broker.stop()
    result = {
        "token_events": len(delays),
        "added_delay_ms": _percentiles(delays),
        "guard_pipeline_ms": _percentiles(pipeline),  # newest event's ts -> verdict ts
        "inter_token_gap_ms": _percentiles(gaps),  # what the held-back last word waits for
        "broker": "tansu (embedded)", "python": platform.python_version(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "guard_latency.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
