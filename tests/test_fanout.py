"""Fan-out: many subscribers of one stream are served from one Kafka read, and one
stalled subscriber slows nobody else; it falls back to the log and still ends
complete and in order.

The stream here is published by the real `EventStream` publisher onto the real
broker (no worker), so its length and size are under the test's control.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from httpx_sse import EventSource

from producers import TokenbusClient
from schemas import (
    FinishReason,
    GenerationRequest,
    StreamEvent,
    Timings,
    Usage,
    decode_event,
    encode,
    message_key,
    uuid7,
)
from tokenbus.bus.kafka import new_producer
from tokenbus.bus.settings import KafkaSettings
from workers.publisher import EventStream

from .conftest import assert_complete, collect, eventually, serving

pytestmark = pytest.mark.broker_behaviour

SUBSCRIBERS = 200
TOKENS = 300
TEXT = "x" * 96  # ~300 KB of SSE per subscriber in all: more than socket buffers hold


async def publish_stream(kafka: KafkaSettings, request: GenerationRequest) -> None:
    producer = new_producer(kafka)
    await producer.start()
    try:
        stream = EventStream(producer, kafka.topics.tokens, request.request_id, "bench")
        await stream.started(model="m", model_revision="r", prompt_tokens=1, queue_wait_ms=0.0)
        for i in range(TOKENS):
            await stream.token(f"{i:04d}{TEXT}", [i], None)
        await stream.finished(FinishReason.LENGTH, Usage(prompt_tokens=1, completion_tokens=TOKENS),
                              Timings(ttft_ms=1.0, total_ms=2.0))  # fmt: skip
    finally:
        await producer.stop()


async def submit_only(kafka: KafkaSettings) -> GenerationRequest:
    request = GenerationRequest(request_id=uuid7(), prompt="p", submitted_at=datetime.now(UTC))
    producer = new_producer(kafka)
    await producer.start()
    try:
        key = message_key(request.request_id)
        await producer.send_and_wait(kafka.topics.requests, encode(request), key=key)
    finally:
        await producer.stop()
    return request


async def metric(http: httpx.AsyncClient, name: str) -> float:
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def test_one_stalled_subscriber_among_200_slows_nobody(kafka: KafkaSettings) -> None:
    request = await submit_only(kafka)
    url_path = f"/v1/requests/{request.request_id}/events"
    # A small queue per subscriber, a long send timeout so the stall is not cut short,
    # and limits that let 200 streams come from one address.
    limits: dict[str, Any] = {"tenant_max_streams": 1000, "max_connections_per_client": 1000}
    async with serving(kafka, subscriber_buffer=8, send_timeout_s=300, **limits) as (url, http):
        # The stalled reader: a 4 KB receive buffer, and it reads nothing until told.
        tiny = httpx.AsyncHTTPTransport(
            socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
        )
        async with (
            httpx.AsyncClient(base_url=url, transport=tiny, timeout=None) as stalled_http,
            stalled_http.stream("GET", url_path) as stalled,
            TokenbusClient(
                url,
                http=httpx.AsyncClient(
                    base_url=url, timeout=None, limits=httpx.Limits(max_connections=None)
                ),
            ) as client,
        ):
            assert stalled.status_code == 200
            readers = [
                asyncio.create_task(collect(client, request.request_id))
                for _ in range(SUBSCRIBERS - 1)
            ]

            async def all_subscribed() -> bool:
                return await metric(http, "tokenbus_relay_subscribers") == SUBSCRIBERS

            await eventually(all_subscribed, within=60)
            await publish_stream(kafka, request)

            streams = await asyncio.wait_for(asyncio.gather(*readers), timeout=120)
            # Everyone else is done while the stalled one has still not read a byte.
            for events in streams:
                assert_complete(events)
                assert len(events) == TOKENS + 2
            assert streams.count(streams[0]) == len(streams)
            assert await metric(http, "tokenbus_relay_subscriber_overflows_total") >= 1

            late: list[StreamEvent] = []
            async for message in EventSource(stalled).aiter_sse():
                if message.data:
                    late.append(decode_event(message.data.encode()))
        assert late == streams[0]
