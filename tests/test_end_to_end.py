"""The whole path with the real SmolLM2: submit -> Kafka -> worker -> Kafka -> SSE."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from httpx_sse import aconnect_sse

from producers import TokenbusClient
from schemas import FinishedEvent, StartedEvent, TokenEvent, decode_event
from tokenbus.bus.settings import KafkaSettings
from workers import LoadedModel

from .conftest import (
    Stack,
    assert_complete,
    collect,
    eventually,
    generate_alone,
    serving,
    text_of,
    working,
)

pytestmark = pytest.mark.broker_behaviour

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def direct_greedy(model: LoadedModel, messages: list[dict[str, str]], max_tokens: int) -> str:
    """What the same model generates on its own, with transformers' generate."""
    tokenizer = model.tokenizer
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )
    generated = generate_alone(model, inputs["input_ids"][0].tolist(), max_tokens)
    return str(tokenizer.decode(generated, skip_special_tokens=True))


async def test_greedy_stream_equals_direct_generation(stack: Stack, smollm: LoadedModel) -> None:
    messages = [{"role": "user", "content": "Write one sentence about rivers."}]
    expected = direct_greedy(smollm, messages, max_tokens=40)

    submission = await stack.client.submit(messages=messages, max_tokens=40, temperature=0)
    events = await collect(stack.client, submission.request_id)

    assert_complete(events)
    started, finished = events[0], events[-1]
    assert isinstance(started, StartedEvent)
    assert started.model == smollm.name and started.model_revision == smollm.revision
    assert isinstance(finished, FinishedEvent)
    assert text_of(events) == expected
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert finished.usage.completion_tokens == sum(len(t.token_ids) for t in tokens)
    assert finished.usage.prompt_tokens == started.prompt_tokens


async def test_32_concurrent_requests_of_mixed_lengths_each_ordered_and_complete(
    stack: Stack, smollm: LoadedModel
) -> None:
    subjects = ["cats", "rain", "bread", "trains", "maps", "bees", "snow", "tea", "owls", "salt"]
    # Prompts of 1 to 4 sentences, answers of 1 to 40 tokens, interleaved.
    prompts = [f"Tell me about {subjects[i % len(subjects)]}. " * (1 + i % 4) for i in range(32)]
    messages = [[{"role": "user", "content": prompt}] for prompt in prompts]
    lengths = [1 + (7 * i) % 40 for i in range(32)]
    greedy = [i % 2 == 0 for i in range(32)]
    submissions = await asyncio.gather(
        *(
            stack.client.submit(
                messages=m, max_tokens=n, temperature=0 if g else 0.8, seed=None if g else i
            )
            for i, (m, n, g) in enumerate(zip(messages, lengths, greedy, strict=True))
        )
    )
    streams = await asyncio.gather(*(collect(stack.client, s.request_id) for s in submissions))

    for submission, events, n in zip(submissions, streams, lengths, strict=True):
        assert_complete(events)
        assert events[0].request_id == submission.request_id
        assert isinstance(events[-1], FinishedEvent)
        assert 1 <= events[-1].usage.completion_tokens <= n
    # They were generated together, not one after another.
    spans = [(s[1].ts, s[-1].ts) for s in streams if isinstance(s[1], TokenEvent)]
    overlapping = max(sum(a <= t <= b for a, b in spans) for t, _ in spans)
    assert overlapping >= 8
    # Greedy ones read the same as the model alone, batched or not (a few, for time).
    for i in (0, 4, 10):
        assert text_of(streams[i]) == direct_greedy(smollm, messages[i], lengths[i])


async def test_three_subscribers_receive_identical_sequences(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, max_tokens=30, temperature=0)
    streams = await asyncio.gather(
        *(collect(stack.client, submission.request_id) for _ in range(3))
    )
    assert_complete(streams[0])
    assert streams[0] == streams[1] == streams[2]


async def test_resume_with_last_event_id_mid_stream(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, max_tokens=40, temperature=0)
    url = f"/v1/requests/{submission.request_id}/events"

    first = []
    async with aconnect_sse(stack.http, "GET", url) as source:
        async for message in source.aiter_sse():
            if not message.data:
                continue
            first.append(decode_event(message.data.encode()))
            if first[-1].seq == 3:
                break  # the client drops the connection mid-stream

    resumed = []
    headers = {"Last-Event-ID": "3"}
    async with aconnect_sse(stack.http, "GET", url, headers=headers) as source:
        async for message in source.aiter_sse():
            if not message.data:
                continue
            resumed.append(decode_event(message.data.encode()))

    assert resumed[0].seq == 4
    assert_complete(first + resumed)
    assert first + resumed == await collect(stack.client, submission.request_id)


async def test_after_query_parameter_resumes(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, max_tokens=10, temperature=0)
    whole = await collect(stack.client, submission.request_id)
    tail = await collect(stack.client, submission.request_id, after=2)
    assert tail == whole[3:]


async def test_late_subscriber_gets_the_whole_stream_from_any_relay(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, max_tokens=20, temperature=0)
    live = await collect(stack.client, submission.request_id)
    assert_complete(live)

    late = await collect(stack.client, submission.request_id)  # same relay, after the finish
    assert late == live

    # A relay started after the stream finished has nothing in memory: the log serves it.
    async with serving(stack.kafka) as (url, _), TokenbusClient(url) as fresh:
        assert await collect(fresh, submission.request_id) == live
        assert await collect(fresh, submission.request_id, after=5) == live[6:]


async def test_subscriber_before_pickup_waits_for_the_worker(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    async with serving(kafka) as (url, http), TokenbusClient(url) as client:
        submission = await client.submit(messages=CHAT, max_tokens=8, temperature=0)
        subscriber = asyncio.create_task(collect(client, submission.request_id))

        async def subscribed() -> bool:
            return "tokenbus_relay_subscribers 1.0" in (await http.get("/metrics")).text

        await eventually(subscribed)  # connected, and waiting: no worker runs yet
        assert not subscriber.done()
        async with working(kafka, smollm):
            events = await asyncio.wait_for(subscriber, timeout=120)
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)


async def test_events_response_is_a_proper_event_stream(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, max_tokens=3, temperature=0)
    async with stack.http.stream("GET", f"/v1/requests/{submission.request_id}/events") as resp:
        body = (await resp.aread()).decode()
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    frames = [f for f in body.replace("\r\n", "\n").split("\n\n") if f.strip()]
    first = dict(line.split(": ", 1) for line in frames[0].splitlines())
    assert first["id"] == "0" and first["event"] == "started"
    assert decode_event(first["data"].encode()).seq == 0
    last = dict(line.split(": ", 1) for line in frames[-1].splitlines())
    assert last["event"] == "finished"


async def test_submit_answers_202_with_the_events_url(stack: Stack) -> None:
    resp = await stack.http.post(
        "/v1/requests", json={"prompt": "Once upon a time", "max_tokens": 2}
    )
    assert resp.status_code == 202
    body = resp.json()
    assert body["events_url"] == f"/v1/requests/{body['request_id']}/events"
    assert resp.headers["location"] == body["events_url"]
    events = await collect(stack.client, body["request_id"])
    assert_complete(events)


async def test_readyz_metrics_and_page(stack: Stack) -> None:
    assert (await stack.http.get("/healthz")).status_code == 200
    assert (await stack.http.get("/readyz")).status_code == 200
    metrics = (await stack.http.get("/metrics")).text
    assert "tokenbus_relay_events_read_total" in metrics
    page = await stack.http.get("/")
    assert page.status_code == 200 and "<title>tokenbus console</title>" in page.text


async def test_http_client_is_not_needed_for_curl_users(stack: Stack) -> None:
    """The README's curl flow, with a plain HTTP client: submit, then read the stream."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as plain:
        submitted = (
            await plain.post("/v1/requests", json={"messages": CHAT, "max_tokens": 5})
        ).json()
        async with plain.stream("GET", submitted["events_url"]) as resp:
            text = (await resp.aread()).decode()
    assert "event: finished" in text
