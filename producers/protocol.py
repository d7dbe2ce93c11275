"""The HTTP API as the Python clients speak it, with no I/O: the submit body, the
answers, the errors, and the reading of one event stream. `Tokenbus` (sync) and
`AsyncTokenbus` both build on these, so they cannot drift apart."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import httpx
from httpx_sse import ServerSentEvent

from schemas import StreamEvent, decode_event

Pace = Literal["fast", "original"]


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


def headers_for(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def timeout_of(seconds: float) -> httpx.Timeout:
    # No read timeout: a stream may be quiet for as long as a queue is long.
    return httpx.Timeout(seconds, read=None)


def submit_body(
    prompt: str | None,
    messages: Sequence[Mapping[str, str]] | None,
    *,
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    deadline: datetime | str | None,
    metadata: Mapping[str, str] | None,
    cancel_on_disconnect: bool | None,
    moderation: str | None = None,
) -> dict[str, Any]:
    """The JSON of ``POST /v1/requests``; what is None is left to the server's default.

    ``stop`` may be one string, as in the OpenAI API: the native API takes a list.
    """
    # A string is sent as given (ISO 8601 with a zone): the server says if it is not.
    if isinstance(deadline, datetime) and deadline.utcoffset() is None:
        raise ValueError("deadline must be timezone-aware, e.g. datetime.now(UTC) + timedelta(...)")
    body: dict[str, Any] = {
        "prompt": prompt,
        "messages": [dict(m) for m in messages] if messages is not None else None,
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": [stop] if isinstance(stop, str) else list(stop) if stop is not None else None,
        "deadline": deadline.isoformat() if isinstance(deadline, datetime) else deadline,
        "metadata": dict(metadata) if metadata is not None else None,
        "cancel_on_disconnect": cancel_on_disconnect,
        "moderation": moderation,
    }
    return {name: value for name, value in body.items() if value is not None}


def submission_of(response: httpx.Response) -> Submission:
    raise_for_error(response)
    data = response.json()
    return Submission(uuid.UUID(data["request_id"]), data["events_url"], data.get("stream_token"))


def request_path(request_id: uuid.UUID | str) -> str:
    return f"/v1/requests/{request_id}"


def raise_for_error(response: httpx.Response) -> None:
    """A `TokenbusError` for an error answer, read from the API's one error shape."""
    if not response.is_error:
        return
    try:
        error = response.json()["error"]
        raise TokenbusError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        raise TokenbusError(response.status_code, "http_error", response.text) from None


class StreamCursor:
    """Where one read of ``/v1/requests/{id}/events`` stands, across reconnects:
    the last seq seen (sent back as ``Last-Event-ID``), and how many reconnects in
    a row have failed.

    A first connection that fails is not retried: a server that was never reached
    is a wrong URL or a stopped server, said at once. Once connected, a dropped
    connection is retried with backoff, ``max_reconnects`` times in a row at most.
    """

    def __init__(
        self, request_id: uuid.UUID | str, *, after: int, pace: Pace, max_reconnects: int
    ) -> None:
        self.url = request_path(request_id) + "/events"
        self.params = {"pace": pace} if pace != "fast" else {}
        self.last = after
        self._connected = False
        self._failures = 0
        self._max_reconnects = max_reconnects

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": str(self.last)} if self.last >= 0 else {}

    def opened(self, response: httpx.Response) -> bool:
        """Whether events follow (a 204 means the stream ended at ``last``). The
        caller reads an error answer's body first."""
        raise_for_error(response)
        self._connected = True
        return response.status_code != 204

    def event_of(self, message: ServerSentEvent) -> StreamEvent | None:
        """The next event to yield, or None for a keep-alive or a duplicate."""
        if not message.data:
            return None
        if message.event == "error":
            error = message.json()
            raise StreamTruncated(error["code"], error["message"])
        event = decode_event(message.data.encode())
        if event.seq <= self.last:
            return None
        self._failures = 0
        self.last = event.seq
        return event

    def retry_delay(self) -> float | None:
        """After a transport error: seconds to wait before reconnecting, or None to
        give up (raise the error)."""
        self._failures += 1
        if not self._connected or self._failures > self._max_reconnects:
            return None
        return min(0.1 * 2.0**self._failures, 5.0)
