"""A request the worker cannot serve ends in a `failed` event; a malformed message
on a topic is skipped and reported; the parts keep going."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas import ErrorCode, FailedEvent, FinishedEvent, FinishReason, message_key, uuid7
from tokenbus.bus.kafka import new_producer
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings, WorkerSettings
from workers import LoadedModel, Worker

from .conftest import Stack, assert_complete, collect, eventually, text_of

pytestmark = pytest.mark.broker_behaviour

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


async def raw_producer(stack: Stack) -> AIOKafkaProducer:
    producer = new_producer(stack.kafka)
    await producer.start()
    return producer


async def test_unknown_model_is_a_failed_event(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, model="gpt-17")
    events = await collect(stack.client, submission.request_id)
    assert_complete(events)
    assert len(events) == 1
    assert isinstance(events[0], FailedEvent) and events[0].code == ErrorCode.UNKNOWN_MODEL
    assert "gpt-17" in events[0].message


async def test_prompt_longer_than_the_context_is_a_failed_event(stack: Stack) -> None:
    submission = await stack.client.submit(prompt="word " * 6000, max_tokens=4096)
    events = await collect(stack.client, submission.request_id)
    assert_complete(events)
    assert isinstance(events[-1], FailedEvent)
    assert events[-1].code == ErrorCode.PROMPT_TOO_LONG


async def test_past_deadline_finishes_as_expired_without_generating(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, deadline="2020-01-01T00:00:00Z")
    events = await collect(stack.client, submission.request_id)
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason == FinishReason.EXPIRED
    assert events[-1].usage.completion_tokens == 0


async def test_stop_string_ends_the_stream_before_it(stack: Stack) -> None:
    whole = await collect(
        stack.client,
        (await stack.client.submit(messages=CHAT, temperature=0, max_tokens=30)).request_id,
    )
    assert " Paris" in text_of(whole)  # the greedy answer names it
    stopped = await collect(
        stack.client,
        (
            await stack.client.submit(messages=CHAT, temperature=0, max_tokens=30, stop=[" Paris"])
        ).request_id,
    )
    assert_complete(stopped)
    assert text_of(stopped) == text_of(whole).split(" Paris")[0]
    assert isinstance(stopped[-1], FinishedEvent)
    assert stopped[-1].finish_reason == FinishReason.STOP


async def test_malformed_request_message_fails_its_stream_and_the_worker_goes_on(
    stack: Stack,
) -> None:
    bad_id = uuid7()
    producer = await raw_producer(stack)
    try:
        topic = stack.kafka.topics.requests
        await producer.send_and_wait(topic, b"\xff not json", key=b"not-a-request-id")
        await producer.send_and_wait(topic, b'{"prompt": "no id"}', key=message_key(bad_id))
    finally:
        await producer.stop()

    failed = await collect(stack.client, bad_id)
    assert_complete(failed)
    assert isinstance(failed[0], FailedEvent) and failed[0].code == ErrorCode.INVALID_REQUEST

    after = await stack.client.submit(messages=CHAT, max_tokens=4)
    events = await collect(stack.client, after.request_id)
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)


async def test_malformed_event_on_tokens_topic_is_skipped_and_counted(stack: Stack) -> None:
    producer = await raw_producer(stack)
    try:
        await producer.send_and_wait(stack.kafka.topics.tokens, b"garbage", key=b"whatever")
        await producer.send_and_wait(stack.kafka.topics.tokens, None, key=message_key(uuid7()))
    finally:
        await producer.stop()

    async def counted() -> bool:
        metrics = (await stack.http.get("/metrics")).text
        return "tokenbus_relay_malformed_events_total 2.0" in metrics

    await eventually(counted, within=30)
    submission = await stack.client.submit(messages=CHAT, max_tokens=4)
    assert_complete(await collect(stack.client, submission.request_id))


async def test_a_worker_whose_producer_cannot_start_stops_its_consumer(smollm: LoadedModel) -> None:
    """The worker makes its group consumer, then starts its producer. A producer that
    could not start (no broker answers here) left that consumer unstopped, and
    aiokafka's "Unclosed AIOKafkaConsumer", raised whenever the garbage collector
    next ran, failed some later test. The worker's error is what the caller sees."""
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", topic_prefix="nobody.")
    settings = WorkerSettings(group_id="nobody.workers", worker_id="worker-1")
    worker = Worker(kafka=kafka, settings=settings, model=smollm)
    with pytest.raises(KafkaError):
        await worker.run()
    assert worker._consumer is not None
    assert worker._consumer._closed, "the worker's consumer was left unstopped"
