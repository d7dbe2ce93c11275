"""DELETE /v1/requests/{id}: a Cancel on tokenbus.control stops generation; a request
cancelled before pickup is never generated; cancel_on_disconnect is opt-in."""

from __future__ import annotations

import pytest
from httpx_sse import aconnect_sse

from producers import TokenbusClient
from schemas import FinishedEvent, FinishReason, StartedEvent, TokenEvent, decode_event
from tokenbus.bus.settings import KafkaSettings
from workers import LoadedModel

from .conftest import Stack, assert_complete, collect, serving, working

pytestmark = pytest.mark.broker_behaviour

LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


async def test_cancel_mid_stream_finishes_as_cancelled(stack: Stack) -> None:
    submission = await stack.client.submit(messages=LONG, max_tokens=400, temperature=0)
    events = []
    async for event in stack.client.stream(submission.request_id):
        events.append(event)
        if event.seq == 3:
            resp = await stack.http.delete(f"/v1/requests/{submission.request_id}")
            assert resp.status_code == 202 and resp.json()["status"] == "cancelling"
    assert_complete(events)
    finished = events[-1]
    assert isinstance(finished, FinishedEvent)
    assert finished.finish_reason == FinishReason.CANCELLED
    assert finished.usage.completion_tokens < 400


async def test_cancelled_before_pickup_is_never_generated(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    async with serving(kafka) as (url, http), TokenbusClient(url) as client:
        submission = await client.submit(messages=LONG, max_tokens=50)
        assert (await http.delete(f"/v1/requests/{submission.request_id}")).status_code == 202
        async with working(kafka, smollm):
            events = await collect(client, submission.request_id)
    assert_complete(events)
    assert len(events) == 1  # no `started`, no tokens
    assert isinstance(events[0], FinishedEvent)
    assert events[0].finish_reason == FinishReason.CANCELLED
    assert events[0].usage.completion_tokens == 0


async def test_cancel_of_unknown_or_malformed_id(stack: Stack) -> None:
    from schemas import uuid7

    assert (await stack.http.delete(f"/v1/requests/{uuid7()}")).status_code == 404
    assert (await stack.http.delete("/v1/requests/nope")).status_code == 400


async def _read_two_tokens_then_hang_up(stack: Stack, request_id: object) -> None:
    url = f"/v1/requests/{request_id}/events"
    seen = 0
    async with aconnect_sse(stack.http, "GET", url) as source:
        async for message in source.aiter_sse():
            if message.data and isinstance(decode_event(message.data.encode()), TokenEvent):
                seen += 1
                if seen == 2:
                    return  # leaving the block closes the connection


async def test_cancel_on_disconnect_cancels_when_the_subscriber_leaves(stack: Stack) -> None:
    submission = await stack.client.submit(
        messages=LONG, max_tokens=400, temperature=0, cancel_on_disconnect=True
    )
    await _read_two_tokens_then_hang_up(stack, submission.request_id)
    events = await collect(stack.client, submission.request_id)
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason == FinishReason.CANCELLED


async def test_by_default_a_job_survives_its_client_leaving(stack: Stack) -> None:
    submission = await stack.client.submit(messages=LONG, max_tokens=12, temperature=0)
    await _read_two_tokens_then_hang_up(stack, submission.request_id)
    events = await collect(stack.client, submission.request_id)
    assert_complete(events)
    assert isinstance(events[0], StartedEvent)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason == FinishReason.LENGTH
