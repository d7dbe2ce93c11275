"""Replay from the log: from a relay started after the stream ended, at the recorded
pace, and with an explicit error, never a silent gap, when the log lacks the start."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.errors import KafkaError
from httpx_sse import aconnect_sse

from producers import StreamTruncated, TokenbusClient
from schemas import (
    FinishReason,
    GenerationRequest,
    Timings,
    Usage,
    decode_event,
    encode,
    message_key,
    uuid7,
)
from tokenbus.bus.kafka import new_producer, partition_for
from tokenbus.bus.settings import KafkaSettings
from workers import LoadedModel
from workers.publisher import EventStream

from .conftest import ON_TANSU, Stack, assert_complete, collect, serving, text_of, working

pytestmark = pytest.mark.broker_behaviour

CHAT = [{"role": "user", "content": "Describe the sea in two sentences."}]


async def test_relay_restarted_between_live_and_replay_serves_the_same_stream(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    async with serving(kafka) as (url, _), working(kafka, smollm), TokenbusClient(url) as client:
        submission = await client.submit(messages=CHAT, max_tokens=16, temperature=0)
        live = await collect(client, submission.request_id)
    assert_complete(live)

    # That relay is gone; a new one has nothing in memory and reads the log.
    async with serving(kafka) as (url, _):
        async with TokenbusClient(url) as client:
            assert await collect(client, submission.request_id) == live
        replay = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tokenbus", "replay", str(submission.request_id), "--json",
             f"--url={url}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    assert [decode_event(line.encode()) for line in replay.stdout.splitlines()] == live


async def test_pace_original_reproduces_the_recorded_gaps(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, max_tokens=24, temperature=0)
    live = await collect(stack.client, submission.request_id)
    recorded = [(e.ts - live[0].ts).total_seconds() for e in live]

    arrivals = []
    async for _ in stack.client.stream(submission.request_id, pace="original"):
        arrivals.append(time.monotonic())
    replayed = [t - arrivals[0] for t in arrivals]

    assert len(replayed) == len(recorded)
    for want, got in zip(recorded, replayed, strict=True):
        assert got == pytest.approx(want, abs=0.15 + 0.1 * want)

    start = time.monotonic()
    await collect(stack.client, submission.request_id)  # default: as fast as it can be read
    assert time.monotonic() - start < recorded[-1] / 2


async def _stream_missing_its_start(kafka: KafkaSettings) -> GenerationRequest:
    """A whole stream (seq 0..8) whose first five events were then deleted from the
    log for real (DeleteRecords, what retention does to an old segment)."""
    request = GenerationRequest(request_id=uuid7(), messages=CHAT, submitted_at=datetime.now(UTC))
    producer = new_producer(kafka)
    await producer.start()
    try:
        key = message_key(request.request_id)
        await producer.send_and_wait(kafka.topics.requests, encode(request), key=key)
        stream = EventStream(producer, kafka.topics.tokens, request.request_id, "w")
        await stream.started(model="m", model_revision="r", prompt_tokens=1, queue_wait_ms=0.0)
        for word in ("a", " b", " c", " d", "the", " tail", " only"):
            await stream.token(word, [1], None)
        await stream.finished(FinishReason.LENGTH, Usage(prompt_tokens=1, completion_tokens=7),
                              Timings(ttft_ms=1.0, total_ms=2.0))  # fmt: skip
    finally:
        await producer.stop()
    # The topic is this test's own: the stream is all its partition holds, seq n at offset n.
    tp = TopicPartition(kafka.topics.tokens, partition_for(request.request_id, kafka.partitions))
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(before_offset=5)})
    except KafkaError as exc:
        if ON_TANSU:
            pytest.skip(f"Tansu refuses DeleteRecords ({exc!r}); Apache Kafka runs this test")
        raise
    finally:
        await admin.close()
    return request


async def test_resuming_before_what_the_log_holds_is_an_explicit_error(
    kafka: KafkaSettings,
) -> None:
    request = await _stream_missing_its_start(kafka)
    url = f"/v1/requests/{request.request_id}/events"
    async with serving(kafka) as (base, http):
        async with aconnect_sse(http, "GET", url, headers={"Last-Event-ID": "2"}) as source:
            frames = [m async for m in source.aiter_sse() if m.data]
        assert [f.event for f in frames] == ["error"]
        error = json.loads(frames[0].data)
        assert error["code"] == "stream_truncated" and "seq 3" in error["message"]

        async with TokenbusClient(base) as client:
            with pytest.raises(StreamTruncated):
                await collect(client, request.request_id)
            tail = await collect(client, request.request_id, after=5)  # what is held still works
        assert [e.seq for e in tail] == [6, 7, 8]
        assert text_of(tail) == " tail only"


async def test_relay_memory_is_bounded_and_evicted_streams_come_from_the_log(
    kafka: KafkaSettings,
) -> None:
    from .test_fanout import metric, publish_stream, submit_only

    async with serving(kafka, relay_max_streams=2) as (url, http), TokenbusClient(url) as client:
        requests = [await submit_only(kafka) for _ in range(4)]
        for request in requests:
            await publish_stream(kafka, request)
        for request in requests:  # each one read to the end: all four passed through the hub
            assert_complete(await collect(client, request.request_id))
        assert await metric(http, "tokenbus_relay_streams_held") <= 2
        oldest = await collect(client, requests[0].request_id)  # evicted: from the log
    assert_complete(oldest)
    assert oldest[-1].seq == 301
