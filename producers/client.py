"""The async Python client, `AsyncTokenbus` (also named `TokenbusClient`).

    async with AsyncTokenbus("http://127.0.0.1:8000") as client:
        submission = await client.submit("Write a haiku about Kafka", max_tokens=64)
        async for event in client.stream(submission.request_id):
            ...

`stream` resumes with ``Last-Event-ID`` after a dropped connection, so the events
it yields are contiguous and end with the terminal one. `Tokenbus` (sync_client.py)
is the same client without asyncio; both build on `protocol`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType

import httpx
from httpx_sse import SSEError, aconnect_sse

from schemas import StreamEvent, is_terminal

from .protocol import (
    Pace,
    StreamCursor,
    Submission,
    headers_for,
    raise_for_error,
    request_path,
    submission_of,
    submit_body,
    timeout_of,
)


class AsyncTokenbus:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_reconnects: int = 10,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        """``api_key``: sent as ``Authorization: Bearer`` on every call, for a server
        with keys configured (it names the tenant). ``timeout``: for connecting and
        for each call except reading a stream, which may be quiet for long.
        ``max_reconnects``: dropped connections in a row that `stream` resumes."""
        self._http = http or httpx.AsyncClient(
            base_url=base_url, timeout=timeout_of(timeout), headers=headers_for(api_key)
        )
        self._max_reconnects = max_reconnects

    async def submit(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        deadline: datetime | str | None = None,
        metadata: Mapping[str, str] | None = None,
        cancel_on_disconnect: bool | None = None,
        moderation: str | None = None,
    ) -> Submission:
        """Submit a job (a ``prompt`` or a chat of ``messages``); returns once the
        broker has it. What is not given takes the server's default."""
        body = submit_body(
            prompt, messages, model=model, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, deadline=deadline,
            metadata=metadata, cancel_on_disconnect=cancel_on_disconnect,
            moderation=moderation,
        )  # fmt: skip
        return submission_of(await self._http.post("/v1/requests", json=body))

    async def cancel(self, request_id: uuid.UUID | str) -> None:
        """Ask the worker generating ``request_id`` to stop; its stream then ends
        with ``finish_reason: "cancelled"``. Raises `TokenbusError` (404) for an id
        the server does not know."""
        raise_for_error(await self._http.delete(request_path(request_id)))

    async def stream(
        self, request_id: uuid.UUID | str, *, after: int = -1, pace: Pace = "fast"
    ) -> AsyncIterator[StreamEvent]:
        """Events after seq ``after``, reconnecting where the last one left off.
        ``pace="original"`` replays a finished stream with its recorded timing.

        Yields nothing if the stream finished at ``after``; raises `TokenbusError`
        (416 ``after_end_of_stream``) if it finished before, and `StreamTruncated`
        if the log no longer holds the events asked for.
        """
        cursor = StreamCursor(
            request_id, after=after, pace=pace, max_reconnects=self._max_reconnects
        )
        while True:
            try:
                headers, params = cursor.headers(), cursor.params
                async with aconnect_sse(
                    self._http, "GET", cursor.url, headers=headers, params=params
                ) as source:
                    if source.response.is_error:
                        await source.response.aread()
                    if not cursor.opened(source.response):
                        return
                    async for message in source.aiter_sse():
                        event = cursor.event_of(message)
                        if event is not None:
                            yield event
                            if is_terminal(event):
                                return
            except (httpx.TransportError, SSEError):
                delay = cursor.retry_delay()
                if delay is None:
                    raise
                await asyncio.sleep(delay)  # reconnect backoff

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncTokenbus:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# The first name of the async client, kept for the code that uses it.
TokenbusClient = AsyncTokenbus
