"""An async Python client for tokenbus.

    async with TokenbusClient("http://127.0.0.1:8000") as client:
        submission = await client.submit(prompt="Write a haiku about Kafka")
        async for event in client.stream(submission.request_id):
            ...

`stream` resumes with ``Last-Event-ID`` after a dropped connection, so the events
it yields are contiguous and end with the terminal one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from schemas import StreamEvent, decode_event, is_terminal


class TokenbusError(Exception):
    """The server refused: ``status`` and ``code`` say why, ``message`` what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class StreamTruncated(Exception):
    """The relay could not serve the stream from where it was asked (the log's
    retention window passed it); the server's ``code`` and ``message`` say more."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Submission:
    request_id: uuid.UUID
    events_url: str
    # Reads this one stream without the API key (`?token=`, for an EventSource).
    stream_token: str | None = None


class TokenbusClient:
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
        with keys configured (it names the tenant)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(timeout, read=None), headers=headers
        )
        self._max_reconnects = max_reconnects

    async def submit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        **params: Any,
    ) -> Submission:
        """Submit a job; returns once the broker has it. ``params``: model,
        max_tokens, temperature, top_p, top_k, seed, stop, deadline, metadata."""
        body: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
        if prompt is not None:
            body["prompt"] = prompt
        if messages is not None:
            body["messages"] = messages
        response = await self._http.post("/v1/requests", json=body)
        _raise_for_error(response)
        data = response.json()
        return Submission(
            uuid.UUID(data["request_id"]), data["events_url"], data.get("stream_token")
        )

    async def stream(
        self, request_id: uuid.UUID | str, *, after: int = -1, pace: str = "fast"
    ) -> AsyncIterator[StreamEvent]:
        """Events after seq ``after``, reconnecting where the last one left off.
        ``pace="original"`` replays a finished stream with its recorded timing.

        Yields nothing if the stream finished at ``after``; raises `TokenbusError`
        (416 ``after_end_of_stream``) if it finished before, and `StreamTruncated`
        if the log no longer holds the events asked for.
        """
        last = after
        failures = 0
        url = f"/v1/requests/{request_id}/events"
        params = {"pace": pace} if pace != "fast" else {}
        while True:
            headers = {"Last-Event-ID": str(last)} if last >= 0 else {}
            try:
                async with aconnect_sse(
                    self._http, "GET", url, headers=headers, params=params
                ) as source:
                    if source.response.is_error:
                        await source.response.aread()
                        _raise_for_error(source.response)
                    if source.response.status_code == 204:
                        return  # the stream ended at `last`: nothing is left to send
                    async for message in source.aiter_sse():
                        if not message.data:
                            continue  # a keep-alive comment
                        if message.event == "error":
                            error = message.json()
                            raise StreamTruncated(error["code"], error["message"])
                        event = decode_event(message.data.encode())
                        if event.seq <= last:
                            continue
                        failures = 0
                        last = event.seq
                        yield event
                        if is_terminal(event):
                            return
            except (httpx.TransportError, SSEError):
                failures += 1
                if failures > self._max_reconnects:
                    raise
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))  # reconnect backoff

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> TokenbusClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _raise_for_error(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        error = response.json()["error"]
        raise TokenbusError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        raise TokenbusError(response.status_code, "http_error", response.text) from None
