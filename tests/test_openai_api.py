"""The official `openai` SDK, unchanged, against tokenbus (real broker, real SmolLM2)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from httpx_sse import aconnect_sse
from openai.types.chat import ChatCompletionMessageParam

from schemas import FinishedEvent, FinishReason
from tokenbus.bus.settings import KafkaSettings

from .conftest import Stack, assert_complete, collect, serving, text_of

CHAT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
]


@pytest.fixture
async def sdk(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused-without-keys")
    yield client
    await client.close()


async def test_chat_streaming_and_not_give_the_same_text(sdk: openai.AsyncOpenAI) -> None:
    whole = await sdk.chat.completions.create(
        model="default",
        messages=CHAT,
        max_tokens=24,
        temperature=0,
    )
    stream = await sdk.chat.completions.create(
        model="default", messages=CHAT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]

    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed
    assert "Paris" in streamed
    assert whole.choices[0].finish_reason in {"stop", "length"}
    assert whole.model == "SmolLM2-135M-Instruct"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert whole.usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_completions_streaming_and_not_give_the_same_text(sdk: openai.AsyncOpenAI) -> None:
    prompt = "The three primary colours are"
    whole = await sdk.completions.create(
        model="default", prompt=prompt, max_tokens=12, temperature=0
    )
    stream = await sdk.completions.create(
        model="default", prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join([chunk.choices[0].text async for chunk in stream])
    assert whole.choices[0].text == streamed
    assert whole.object == "text_completion"
    assert whole.usage is not None and whole.usage.completion_tokens == 12


async def test_openai_requests_travel_the_bus_and_can_be_replayed(
    sdk: openai.AsyncOpenAI, stack: Stack
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="default",
        messages=CHAT,
        max_tokens=16,
        temperature=0,
    )
    request_id = raw.headers["x-request-id"]
    completion = raw.parse()
    assert completion.id == f"chatcmpl-{request_id.replace('-', '')}"
    events = await collect(stack.client, request_id)
    assert_complete(events)
    assert text_of(events) == completion.choices[0].message.content


async def test_models_lists_what_the_workers_serve(sdk: openai.AsyncOpenAI) -> None:
    await sdk.chat.completions.create(model="default", messages=CHAT, max_tokens=1)
    names = [m.id async for m in sdk.models.list()]
    assert "default" in names and "SmolLM2-135M-Instruct" in names


async def test_errors_arrive_as_the_sdk_expects(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        await sdk.chat.completions.create(model="gpt-17", messages=CHAT)
    assert "gpt-17" in unknown.value.message

    with pytest.raises(openai.BadRequestError) as tools:
        await sdk.chat.completions.create(
            model="default", messages=CHAT,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )  # fmt: skip
    assert "tools" in tools.value.message

    with pytest.raises(openai.BadRequestError) as hot:
        await sdk.chat.completions.create(model="default", messages=CHAT, temperature=7)
    assert "temperature" in hot.value.message

    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(model="default", messages=CHAT, n=2)


async def test_streamed_failure_raises_in_the_sdk(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(model="gpt-17", messages=CHAT, stream=True)
    with pytest.raises(openai.APIError) as failed:
        async for _ in stream:
            pass
    assert "gpt-17" in str(failed.value)


# -- a streaming OpenAI request is served as the native stream is (issue 13) ---------

LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


async def _two_chunks_then_hang_up(http: httpx.AsyncClient, body: dict[str, object]) -> str:
    seen = 0
    async with aconnect_sse(http, "POST", "/v1/chat/completions", json=body) as source:
        assert source.response.status_code == 200
        request_id = source.response.headers["x-request-id"]
        async for message in source.aiter_sse():
            chunk = json.loads(message.data)
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                seen += 1
                if seen == 2:
                    break  # leaving the block closes the connection
    return request_id


async def test_closing_an_openai_stream_cancels_it_unless_asked_not_to(stack: Stack) -> None:
    body = {"messages": LONG, "temperature": 0, "stream": True}
    cancelled = await _two_chunks_then_hang_up(stack.http, body | {"max_tokens": 400})
    events = await collect(stack.client, cancelled)
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason == FinishReason.CANCELLED
    assert events[-1].usage.completion_tokens < 400

    body |= {"max_tokens": 12, "cancel_on_disconnect": False}
    kept = await _two_chunks_then_hang_up(stack.http, body)
    events = await collect(stack.client, kept)
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason == FinishReason.LENGTH


async def test_openai_streams_count_against_the_stream_limits(kafka: KafkaSettings) -> None:
    body = {"messages": CHAT, "stream": True}
    # No worker: the streams wait.
    async with serving(kafka, tenant_max_streams=1) as (_, http):
        first = http.stream("POST", "/v1/chat/completions", json=body)
        async with first as held, http.stream("POST", "/v1/chat/completions", json=body) as second:
            assert held.status_code == 200
            assert second.status_code == 429 and second.headers["retry-after"]
            await second.aread()
            assert second.json()["error"]["code"] == "too_many_streams"
            native = (await http.post("/v1/requests", json={"messages": CHAT})).json()
            resp = await http.get(native["events_url"])
            assert resp.status_code == 429  # one limit for both kinds of stream
