"""The synchronous Python client, `Tokenbus`: `AsyncTokenbus` without asyncio.

with Tokenbus("http://127.0.0.1:8000") as client:
    submission = client.submit("Write a haiku about Kafka", max_tokens=64)
    for event in client.stream(submission.request_id):
        ...
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType

import httpx
from httpx_sse import SSEError, connect_sse

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


class Tokenbus:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_reconnects: int = 10,
        http: httpx.Client | None = None,
    ) -> None:
        """As `AsyncTokenbus`: ``api_key`` is sent as ``Authorization: Bearer``;
        ``max_reconnects`` is how many dropped connections in a row `stream` resumes."""
        self._http = http or httpx.Client(
            base_url=base_url, timeout=timeout_of(timeout), headers=headers_for(api_key)
        )
        self._max_reconnects = max_reconnects

    def submit(
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
        return submission_of(self._http.post("/v1/requests", json=body))

    def cancel(self, request_id: uuid.UUID | str) -> None:
        """Ask the worker generating ``request_id`` to stop; raises `TokenbusError`
        (404) for an id the server does not know."""
        raise_for_error(self._http.delete(request_path(request_id)))

    def stream(
        self, request_id: uuid.UUID | str, *, after: int = -1, pace: Pace = "fast"
    ) -> Iterator[StreamEvent]:
        """Events after seq ``after``, reconnecting where the last one left off; as
        `AsyncTokenbus.stream`."""
        cursor = StreamCursor(
            request_id, after=after, pace=pace, max_reconnects=self._max_reconnects
        )
        while True:
            try:
                headers, params = cursor.headers(), cursor.params
                with connect_sse(
                    self._http, "GET", cursor.url, headers=headers, params=params
                ) as source:
                    if source.response.is_error:
                        source.response.read()
                    if not cursor.opened(source.response):
                        return
                    for message in source.iter_sse():
                        event = cursor.event_of(message)
                        if event is not None:
                            yield event
                            if is_terminal(event):
                                return
            except (httpx.TransportError, SSEError):
                delay = cursor.retry_delay()
                if delay is None:
                    raise
                time.sleep(delay)  # reconnect backoff

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Tokenbus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
