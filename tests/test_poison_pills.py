"""Poison pills: a request whose generation crashes is tried again under new
attempts, at most `max_attempts` in all, then finished as `failed` and copied to the
dead-letter topic; other requests keep flowing. Undecodable messages go there too.

The crash is injected into the real engine for prompts containing "POISON" (no
valid input crashes SmolLM2 on demand); every other request uses the real model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import TopicPartition

from producers import TokenbusClient
from schemas import ErrorCode, FailedEvent, FinishedEvent, decode_request, message_key, uuid7
from tokenbus.bus.kafka import at_end, new_consumer, new_producer
from tokenbus.bus.settings import KafkaSettings
from workers import LoadedModel
from workers.engine import GenerationEngine, Step

from .conftest import assert_complete, collect, serving, working

pytestmark = pytest.mark.broker_behaviour

CHAT = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def poisoned_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    real = GenerationEngine.generate

    async def generate(
        self: GenerationEngine, request: Any, *args: Any, **kwargs: Any
    ) -> AsyncIterator[Step]:
        steps = real(self, request, *args, **kwargs)
        async for step in steps:
            yield step
            if request.prompt and "POISON" in request.prompt:
                raise RuntimeError("injected crash")

    monkeypatch.setattr(GenerationEngine, "generate", generate)


async def dead_letters(
    kafka: KafkaSettings,
) -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    consumer = new_consumer(kafka, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        tp = TopicPartition(kafka.topics.dead_letter, 0)
        partitions = [TopicPartition(tp.topic, p) for p in range(kafka.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = []
        while not (found and await at_end(consumer, *partitions)):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found += [(r.key, r.value, dict(r.headers)) for r in records]
        return found
    finally:
        await consumer.stop()


async def test_a_crashing_request_is_tried_three_times_then_dead_lettered(
    kafka: KafkaSettings, smollm: LoadedModel, poisoned_engine: None
) -> None:
    async with serving(kafka) as (url, _), working(kafka, smollm), TokenbusClient(url) as client:
        poison = await client.submit(prompt="POISON pill", max_tokens=20)
        healthy = await client.submit(messages=CHAT, max_tokens=4)
        poisoned = await collect(client, poison.request_id)
        fine = await collect(client, healthy.request_id)

    assert_complete(poisoned)
    assert isinstance(poisoned[-1], FailedEvent) and poisoned[-1].code == ErrorCode.INTERNAL_ERROR
    assert "3 attempts" in poisoned[-1].message
    assert len({e.attempt for e in poisoned[:-1]}) == 3
    assert_complete(fine)
    assert isinstance(fine[-1], FinishedEvent)

    ((key, value, headers),) = await dead_letters(kafka)
    assert key == message_key(poison.request_id)
    assert decode_request(value).request_id == poison.request_id
    assert b"3 attempts" in headers["tokenbus-reason"]


async def test_an_undecodable_request_is_dead_lettered(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    producer = new_producer(kafka)
    await producer.start()
    try:
        key = message_key(uuid7())
        await producer.send_and_wait(kafka.topics.requests, b"\xff not json", key=key)
    finally:
        await producer.stop()
    async with working(kafka, smollm):
        letters = await dead_letters(kafka)
    assert [(k, v) for k, v, _ in letters] == [(key, b"\xff not json")]
    assert b"not a valid GenerationRequest" in letters[0][2]["tokenbus-reason"]
