"""The Python clients, sync and async: a dropped connection is resumed with
Last-Event-ID, and what `stream` yields stays contiguous and duplicate-free; typed
parameters, `stop` as one string, `cancel`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from producers import AsyncTokenbus, Submission, Tokenbus, TokenbusClient, TokenbusError
from schemas import FinishedEvent, FinishReason, StreamEvent, uuid7
from tokenbus.bus.ports import free_port

from .conftest import Stack, assert_complete, collect, text_of

CHAT = [{"role": "user", "content": "Count from one to twenty in words."}]
LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


class CuttingProxy:
    """A TCP proxy to the relay that cuts a connection once it has carried
    ``cut_after`` bytes towards the client, ``cuts`` times in all."""

    def __init__(self, upstream_port: int, *, cut_after: int, cuts: int) -> None:
        self.port = free_port()
        self._upstream = upstream_port
        self._cut_after = cut_after
        self.cuts_left = cuts

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    limit: int | None) -> None:  # fmt: skip
        carried = 0
        try:
            while data := await reader.read(256):
                writer.write(data)
                await writer.drain()
                carried += len(data)
                if limit is not None and carried >= limit and self.cuts_left > 0:
                    self.cuts_left -= 1
                    return
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self._upstream)
        down = asyncio.create_task(self._pipe(up_r, client_w, self._cut_after))
        up = asyncio.create_task(self._pipe(client_r, up_w, None))
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        for task in (down, up):
            task.cancel()
        client_w.close()
        up_w.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        async with server:
            yield f"http://127.0.0.1:{self.port}"


async def test_stream_resumes_after_the_connection_drops(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, max_tokens=48, temperature=0)
    relay_port = int(stack.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(relay_port, cut_after=2500, cuts=2)
    async with proxy.running() as url, TokenbusClient(url) as client:
        through_cuts = await collect(client, submission.request_id)
    assert proxy.cuts_left == 0  # the connection really was cut, twice
    assert_complete(through_cuts)
    assert through_cuts == await collect(stack.client, submission.request_id)


async def test_unknown_request_raises_with_the_servers_reason(stack: Stack) -> None:
    with pytest.raises(TokenbusError) as caught:
        await collect(stack.client, uuid7())
    assert caught.value.status == 404 and caught.value.code == "unknown_request"


async def test_the_sync_client_resumes_after_the_connection_drops(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, max_tokens=48, temperature=0)
    relay_port = int(stack.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(relay_port, cut_after=2500, cuts=2)

    def read(url: str) -> list[StreamEvent]:  # blocking: on a thread, off the server's loop
        with Tokenbus(url) as client:
            return list(client.stream(submission.request_id))

    async with proxy.running() as url:
        through_cuts = await asyncio.to_thread(read, url)
    assert proxy.cuts_left == 0
    assert_complete(through_cuts)
    assert through_cuts == await collect(stack.client, submission.request_id)


async def test_stop_as_one_string_stops_there_as_a_list_does(stack: Stack) -> None:
    """The native API takes a list; the clients take one string too, as the OpenAI
    endpoint does."""
    plain = await stack.client.submit(messages=CHAT, max_tokens=24, temperature=0)
    text = text_of(await collect(stack.client, plain.request_id))
    word = text.split()[3]
    answers = []
    for stop in (word, [word]):
        stopped = await stack.client.submit(messages=CHAT, max_tokens=24, temperature=0, stop=stop)
        answers.append(await collect(stack.client, stopped.request_id))
    for events in answers:
        finished = events[-1]
        assert isinstance(finished, FinishedEvent) and finished.finish_reason == FinishReason.STOP
        assert text.startswith(text_of(events)) and word not in text_of(events)
    assert text_of(answers[0]) == text_of(answers[1])


async def test_every_typed_parameter_is_sent_as_the_api_reads_it(stack: Stack) -> None:
    deadline = datetime.now(UTC) + timedelta(minutes=5)

    def submit() -> Submission:
        with Tokenbus(stack.url) as client:
            return client.submit(
                "Once upon a time", model="default", max_tokens=4, temperature=0.7, top_p=0.9,
                top_k=40, seed=7, stop="\n", deadline=deadline, metadata={"team": "docs"},
            )  # fmt: skip

    submission = await asyncio.to_thread(submit)
    assert_complete(await collect(stack.client, submission.request_id))
    with pytest.raises(ValueError, match="timezone-aware"):
        await stack.client.submit("Hi", deadline=datetime.now())  # noqa: DTZ005


async def test_cancel_from_either_client(stack: Stack) -> None:
    submission = await stack.client.submit(messages=LONG, max_tokens=400, temperature=0)
    events = []
    async for event in stack.client.stream(submission.request_id):
        events.append(event)
        if event.seq == 3:
            await stack.client.cancel(submission.request_id)
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason == FinishReason.CANCELLED

    def cancel_unknown() -> None:
        with Tokenbus(stack.url) as client:
            client.cancel(uuid7())

    with pytest.raises(TokenbusError) as caught:
        await asyncio.to_thread(cancel_unknown)
    assert caught.value.status == 404 and caught.value.code == "unknown_request"


async def test_a_server_that_is_not_there_is_said_at_once_not_retried() -> None:
    """Reconnecting is for a stream that was open; a first connection that fails is a
    wrong URL or a stopped server, raised on the first try."""
    attempts = 0

    async def count(request: httpx.Request) -> None:
        nonlocal attempts
        attempts += 1

    url = f"http://127.0.0.1:{free_port()}"
    async with httpx.AsyncClient(base_url=url, event_hooks={"request": [count]}) as http:
        client = AsyncTokenbus(http=http)
        with pytest.raises(httpx.ConnectError):
            await collect(client, uuid7())
    assert attempts == 1
