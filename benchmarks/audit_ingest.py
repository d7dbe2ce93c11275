"""Audit ingest throughput, on SQLite and on PostgreSQL.

    .venv/bin/python benchmarks/audit_ingest.py            # 100,000 events (a few minutes)
    .venv/bin/python benchmarks/audit_ingest.py --quick    # 10,000 events, a smoke run
    ... [--broker tansu|kafka|both]    # end to end on which broker; both by default

Synthetic streams (``started``, tokens, ``finished``; 50 events a request) built
with the schemas classes. Two measurements per backend:

1. store: the ingest pipeline without Kafka (decode, fencing rule, chain hash,
   one transaction per batch of ``max_batch`` records, as the consumer writes) into
   a fresh store, then a checkpoint over it.
2. end to end, on each broker (the embedded Tansu, in memory; Apache Kafka, one
   KRaft node; 4 partitions): the topics pre-filled with the same events and their
   requests; a real `AuditConsumer` into a fresh store, timed from its start until
   its positions reach the end of the log (its store holds every record).

PostgreSQL is the server at ``--postgres`` (default: the tests' one), a schema of
its own, dropped afterwards; it runs on the same machine. Writes
benchmarks/results/audit_ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import brokers
import psycopg
from brokers import DESCRIPTION, add_broker_option, chosen, load
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import (
    AuditConsumer,
    AuditStats,
    Checkpointer,
    Ingest,
    StreamStates,
    VerdictChains,
    open_store,
    verify,
)
from schemas import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    StartedEvent,
    Timings,
    TokenEvent,
    Topics,
    Usage,
    encode,
    message_key,
    uuid7,
)
from tokenbus.bus.kafka import ensure_topics, new_producer, partition_for
from tokenbus.bus.settings import AuditSettings, KafkaSettings

RESULTS = Path(__file__).parent / "results" / "audit_ingest.json"
EVENTS_PER_REQUEST = 50
PARTITIONS = 4
GOAL_EVENTS_PER_S = 20_000
CATCH_UP_WITHIN_S = 600.0


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes


def synthetic_log(events: int, topics: Topics) -> list[Message]:
    """Requests and their streams, as the log would hold them (offsets per partition)."""
    now = datetime.now(UTC)
    offsets: dict[tuple[str, int], int] = {}
    log: list[Message] = []

    def append(topic: str, request_id: uuid.UUID, value: bytes) -> None:
        partition = partition_for(request_id, PARTITIONS)
        offset = offsets.get((topic, partition), 0)
        offsets[(topic, partition)] = offset + 1
        log.append(Message(topic, partition, offset, value, message_key(request_id)))

    for _ in range(events // EVENTS_PER_REQUEST):
        rid = uuid7()
        common: dict[str, Any] = {"request_id": rid, "ts": now, "worker": "bench-w1", "attempt": 1}
        request = GenerationRequest(request_id=rid, prompt="Write a line.", submitted_at=now)
        append(topics.requests, rid, encode(request))
        append(topics.tokens, rid, encode(StartedEvent(
            **common, seq=0, model="SmolLM2-135M-Instruct", model_revision="bench",
            prompt_tokens=12, queue_wait_ms=1.5)))  # fmt: skip
        tokens = EVENTS_PER_REQUEST - 2
        for i in range(tokens):
            append(topics.tokens, rid, encode(TokenEvent(
                **common, seq=i + 1, text=" tok", token_ids=[1000 + i], logprob=-0.5)))  # fmt: skip
        append(topics.tokens, rid, encode(FinishedEvent(
            **common, seq=tokens + 1, finish_reason=FinishReason.LENGTH,
            usage=Usage(prompt_tokens=12, completion_tokens=tokens),
            timings=Timings(ttft_ms=20.0, total_ms=900.0))))  # fmt: skip
    return log


def machine() -> dict[str, Any]:
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        found = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpu = found.stdout.strip() or gpu
    return {
        "platform": platform.platform(),
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "sqlite": __import__("sqlite3").sqlite_version,
    }


@contextlib.contextmanager
def store_url(backend: str, postgres: str, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        path = directory / f"audit-{uuid.uuid4().hex[:8]}.db"
        yield str(path)
        return
    schema = f"audit_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield f"{postgres}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def bench_store(url: str, log: Sequence[Message], topics: Topics, batch: int) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    with open_store(url) as store:
        ingest = Ingest(
            topics=topics,
            states=StreamStates(load=store.streams),
            stats=AuditStats(),
            verdicts=VerdictChains.of(store),
        )
        started = time.perf_counter()
        cpu = time.process_time()
        for start in range(0, len(log), batch):
            built = ingest.build(log[start : start + batch])
            store.write(built)
            ingest.committed(built)
        elapsed = time.perf_counter() - started
        cpu_s = time.process_time() - cpu
        checkpoint_started = time.perf_counter()
        Checkpointer(store=store, key=key).checkpoint()
        checkpoint_s = time.perf_counter() - checkpoint_started
        verify_started = time.perf_counter()
        report = verify(store, key.public_key())
        verify_s = time.perf_counter() - verify_started
    events = ingest.stats.events
    assert report.clean and report.records == events, report.findings
    return {
        "events": events,
        "requests": ingest.stats.requests,
        "seconds": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        "bench_process_cpu_pct": round(100 * cpu_s / elapsed),
        "checkpoint_s": round(checkpoint_s, 3),
        "verify_s": round(verify_s, 3),
        "verify_events_per_s": round(events / verify_s),
    }


async def prefill(kafka: KafkaSettings, log: Sequence[Message]) -> float:
    producer = new_producer(kafka, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for message in log:
            pending.append(
                await producer.send(
                    message.topic, message.value, key=message.key, partition=message.partition
                )
            )
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


@contextlib.asynccontextmanager
async def running(consumer: AuditConsumer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def bench_consumer(
    kafka: KafkaSettings, url: str, ends: dict[tuple[str, int], int], batch: int
) -> dict[str, Any]:
    group = f"{kafka.topic_prefix}audit-{uuid.uuid4().hex[:6]}"
    settings = AuditSettings(store=url, group_id=group, max_batch=batch)
    consumer = AuditConsumer(
        kafka=kafka, settings=settings, store=open_store(url), key=Ed25519PrivateKey.generate()
    )
    started = time.perf_counter()
    cpu = time.process_time()
    async with running(consumer) as task:
        await asyncio.wait({asyncio.create_task(consumer.ready.wait()), task},
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        ready_s = time.perf_counter() - started
        async with asyncio.timeout(CATCH_UP_WITHIN_S):
            while not all(consumer.positions.get(p, 0) >= end for p, end in ends.items()):
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)  # polling the consumer's position; bounded above
        elapsed = time.perf_counter() - started
        cpu_s = time.process_time() - cpu
    events = consumer.stats.events
    return {
        "events": events,
        "requests": consumer.stats.requests,
        "seconds_from_start": round(elapsed, 3),
        "start_to_ready_s": round(ready_s, 3),
        "events_per_s_from_start": round(events / elapsed),
        "events_per_s_after_ready": round(events / (elapsed - ready_s)),
        "consumer_process_cpu_pct": round(100 * cpu_s / elapsed),
    }


def bench_end_to_end(
    broker_name: str,
    log: Sequence[Message],
    backends: Sequence[str],
    postgres: str,
    directory: Path,
    batch: int,
) -> tuple[dict[str, Any], float]:
    # Started outside the event loop: KafkaCluster waits for its node with asyncio.run.
    with brokers.running(broker_name) as broker:
        return asyncio.run(on_broker(broker.bootstrap, log, backends, postgres, directory, batch))


async def on_broker(
    bootstrap: str,
    log: Sequence[Message],
    backends: Sequence[str],
    postgres: str,
    directory: Path,
    batch: int,
) -> tuple[dict[str, Any], float]:
    results: dict[str, Any] = {}
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix="bench.",
                          partitions=PARTITIONS)  # fmt: skip
    await ensure_topics(kafka)
    prefill_s = await prefill(kafka, log)
    ends: dict[tuple[str, int], int] = {}
    for m in log:
        ends[(m.topic, m.partition)] = max(ends.get((m.topic, m.partition), 0), m.offset + 1)
    for backend in backends:
        with store_url(backend, postgres, directory) as url:
            results[backend] = await bench_consumer(kafka, url, ends, batch)
            print(f"end to end, {backend}: {results[backend]}", flush=True)
    return results, prefill_s


def postgres_available(url: str) -> str | None:
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            return str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    except psycopg.Error as exc:
        print(f"PostgreSQL at {url} is not reachable ({exc}); SQLite only", file=sys.stderr)
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 events")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=AuditSettings().max_batch)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--output", type=Path, default=RESULTS)
    add_broker_option(parser)
    args = parser.parse_args()
    events = 10_000 if args.quick else args.events
    load_at_start = round(os.getloadavg()[0], 2)
    pg_version = postgres_available(args.postgres)
    backends = ["sqlite", "postgresql"] if pg_version else ["sqlite"]

    topics = KafkaSettings(topic_prefix="bench.").topics
    log = synthetic_log(events, topics)
    store_results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for backend in backends:
            with store_url(backend, args.postgres, directory) as url:
                store_results[backend] = bench_store(url, log, topics, args.batch)
                print(f"store, {backend}: {store_results[backend]}", flush=True)
        e2e: dict[str, Any] = {}
        prefill_s: dict[str, float] = {}
        for name in chosen(args.broker):
            print(f"== end to end on {name}", flush=True)
            load_start = load()
            e2e[name], prefill_s[name] = bench_end_to_end(
                name, log, backends, args.postgres, directory, args.batch
            )
            e2e[name] |= {"broker": DESCRIPTION[name], "load_start": load_start, "load_end": load()}

    event_count = sum(1 for m in log if m.topic == topics.tokens)
    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine() | {"postgresql": pg_version or "not available"},
        # The machine is shared: other work on its cores lowers these figures.
        "load_average_1m": {"at_start": load_at_start, "at_end": round(os.getloadavg()[0], 2)},
        "quick": args.quick,
        "sizes": {
            "events": event_count,
            "requests": len(log) - event_count,
            "events_per_request": EVENTS_PER_REQUEST,
            "partitions": PARTITIONS,
            "max_batch": args.batch,
        },
        "method": [
            "synthetic streams built with the schemas classes (started, 48 tokens, finished)",
            "store: consumers.audit Ingest (decode, fencing, chain hash) + one store transaction "
            "per batch, in this process, into a fresh store; then one checkpoint and a verify",
            "end to end, on each broker in turn (the embedded Tansu, in memory; Apache Kafka, "
            "one KRaft node): topics pre-filled (seconds: "
            + ", ".join(f"{name} {s:.1f}" for name, s in prefill_s.items())
            + "); a real AuditConsumer in this process into a fresh store, "
            "timed from run() until its positions reach the log end",
            "PostgreSQL on the same machine (shares its cores with this process and the broker)",
        ],
        "goal": {"events_per_s_sqlite": GOAL_EVENTS_PER_S},
        "store": store_results,
        "end_to_end": e2e,
        "goal_met": {
            "store_sqlite": store_results["sqlite"]["events_per_s"] >= GOAL_EVENTS_PER_S,
        }
        | {
            f"end_to_end_sqlite_{name}": run["sqlite"]["events_per_s_from_start"]
            >= GOAL_EVENTS_PER_S
            for name, run in e2e.items()
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
