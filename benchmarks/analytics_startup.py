"""How long the analytics consumer takes from process start to its first message
read, with Faust's default group timeouts and with tokenbus' tuned ones.

    .venv/bin/python benchmarks/analytics_startup.py [--runs 3] [--broker tansu|kafka|both]

On each broker in turn (the embedded Tansu, Apache Kafka with one KRaft node; both
by default), puts one request on a fresh `tokenbus.requests`,
then starts `tokenbus analytics` (a fresh consumer group each run) and times it to
`/readyz` 200 and to the request read. Writes benchmarks/results/analytics_startup.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from brokers import DESCRIPTION, add_broker_option, chosen, load, running

from schemas import GenerationRequest, encode, message_key, uuid7
from tokenbus.bus.kafka import ensure_topics, new_producer
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings

RESULTS = Path(__file__).parent / "results" / "analytics_startup.json"
FAUST_DEFAULTS = {
    "SESSION_TIMEOUT_S": "60",
    "HEARTBEAT_INTERVAL_S": "3",
    "REBALANCE_TIMEOUT_S": "60",
}


async def put_one_request(kafka: KafkaSettings) -> None:
    await ensure_topics(kafka)
    request = GenerationRequest(request_id=uuid7(), prompt="hi", submitted_at=datetime.now(UTC))
    producer = new_producer(kafka)
    await producer.start()
    try:
        await producer.send_and_wait(
            kafka.topics.requests, encode(request), key=message_key(request.request_id)
        )
    finally:
        await producer.stop()


async def one_run(kafka: KafkaSettings, overrides: dict[str, str]) -> dict[str, float]:
    port = free_port()
    env = (
        os.environ
        | {
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            "TOKENBUS_TOPIC_PREFIX": kafka.topic_prefix,
            "TOKENBUS_ANALYTICS_PORT": str(port),
            "TOKENBUS_ANALYTICS_GROUP_ID": f"bench-{uuid.uuid4().hex[:8]}",
            "TOKENBUS_LOG_LEVEL": "WARNING",
        }
        | {f"TOKENBUS_ANALYTICS_{name}": value for name, value in overrides.items()}
    )
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenbus", "analytics",
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    figures: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            while "first_message_s" not in figures:
                assert process.returncode is None, "tokenbus analytics exited"
                try:
                    if "ready_s" not in figures and (await http.get("/readyz")).is_success:
                        figures["ready_s"] = time.perf_counter() - started
                    if (await http.get("/summary")).json()["open_requests"] == 1:
                        figures["first_message_s"] = time.perf_counter() - started
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)  # polling a child process; bounded by its start
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), timeout=30)
    return figures


async def measure(bootstrap: str, runs: int) -> dict[str, object]:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix="bench.")
    await put_one_request(kafka)
    results: dict[str, object] = {}
    for name, overrides in (("faust_defaults", FAUST_DEFAULTS), ("tuned", {})):
        samples = [await one_run(kafka, overrides) for _ in range(runs)]
        results[name] = {
            "overrides": overrides or "AnalyticsSettings defaults",
            "ready_s": [round(s["ready_s"], 2) for s in samples],
            "first_message_s": [round(s["first_message_s"], 2) for s in samples],
            "first_message_s_median": round(
                statistics.median(s["first_message_s"] for s in samples), 2
            ),
        }
        print(name, json.dumps(results[name]))
    return results


def main(runs: int, brokers: list[str]) -> None:
    report: dict[str, object] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "runs": runs,
        "load_start": load(),
    }
    measured = []
    for name in brokers:
        load_start = load()
        # Started outside the event loop: KafkaCluster waits for its node with asyncio.run.
        with running(name) as broker:
            print(f"== {name}")
            results = asyncio.run(measure(broker.bootstrap, runs))
        measured.append(
            {"broker": name, "description": DESCRIPTION[name], "load_start": load_start}
            | results
            | {"load_end": load()}
        )
    report |= {"load_end": load(), "brokers": measured}
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    add_broker_option(parser)
    args = parser.parse_args()
    main(args.runs, chosen(args.broker))
