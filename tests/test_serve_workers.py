"""`tokenbus serve --workers N`: N relay processes on one port (SO_REUSEPORT).

A real broker, the real `tokenbus serve` supervisor and its processes, real HTTP
clients; the stream is published by the real `EventStream` publisher (no model
needed to show where the relay's connections go)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import httpx
import psutil

from schemas import GenerationRequest, StreamEvent, decode_event
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings, kafka_env

from .conftest import assert_complete, eventually
from .test_fanout import publish_stream

PROCESSES = 2
CONNECTIONS = 16  # on fresh source ports: all on one process by chance is 2 in 2**16
NOW = datetime.now(UTC)


def _listening(supervisor: psutil.Process, port: int) -> list[psutil.Process]:
    """The supervisor's children that listen on ``port``."""
    found = []
    for child in supervisor.children():
        try:
            conns = child.net_connections("tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            found.append(child)
    return found


def _streaming(child: psutil.Process, port: int) -> int:
    conns = child.net_connections("tcp")
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in conns)


def _gone(process: psutil.Process) -> bool:
    return not process.is_running()


async def _read_stream(url: str, opened: asyncio.Event) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    # A client of its own: a connection of its own, from a port of its own.
    async with httpx.AsyncClient(timeout=60) as http, http.stream("GET", url) as response:
        assert response.status_code == 200, await response.aread()
        opened.set()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(decode_event(line.removeprefix("data: ").encode()))
    return events


async def test_processes_share_the_port_and_each_others_stream_tokens(
    kafka: KafkaSettings,
) -> None:
    port = free_port()
    env = os.environ | kafka_env(kafka) | {"TOKENBUS_PORT": str(port)}
    command = [sys.executable, "-m", "tokenbus", "serve", "--workers", str(PROCESSES)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 90)
        assert f"with {PROCESSES} relay processes" in line, line
        supervisor = psutil.Process(proc.pid)
        assert len(_listening(supervisor, port)) == PROCESSES
        base = f"http://127.0.0.1:{port}"

        async with httpx.AsyncClient(base_url=base) as http:
            submitted = await http.post("/v1/requests", json={"prompt": "p"})
        assert submitted.status_code == 202, submitted.text
        body = submitted.json()
        # The token was minted by one process; every connection may reach the other.
        url = f"{base}{body['events_url']}?token={body['stream_token']}"
        opened = [asyncio.Event() for _ in range(CONNECTIONS)]
        readers = [asyncio.create_task(_read_stream(url, event)) for event in opened]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened)), 60)
        counts = [_streaming(child, port) for child in _listening(supervisor, port)]
        assert sum(counts) == CONNECTIONS and all(counts), counts  # both took some
        rid = uuid.UUID(body["request_id"])
        await publish_stream(kafka, GenerationRequest(request_id=rid, prompt="p", submitted_at=NOW))
        streams = await asyncio.wait_for(asyncio.gather(*readers), 120)
        for events in streams:
            assert_complete(events)
            assert len(events) == len(streams[0])

        # A process that dies is replaced; the port keeps answering meanwhile.
        victim = _listening(supervisor, port)[0]
        victim.kill()
        await eventually(
            lambda: (
                victim.pid not in {c.pid for c in _listening(supervisor, port)}
                and len(_listening(supervisor, port)) == PROCESSES
            ),
            within=90,
        )
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).status_code == 200

        # Ctrl-C (to the supervisor): every process stops.
        children = supervisor.children()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 60) == 0
        for child in children:
            await eventually(functools.partial(_gone, child), within=10)
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children():
                child.kill()
            proc.kill()
        proc.wait()
        proc.stdout.close()
