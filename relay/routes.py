"""``GET /v1/requests/{id}/events``: a request's stream as Server-Sent Events.

    id: <seq>        event: started | token | finished | failed        data: <json>

Resume with ``Last-Event-ID: N`` or ``?after=N`` (the stream continues at N+1).
``?pace=original`` replays a stream with its recorded timing. Keep-alive comments
flow while nothing else does; the response ends after the terminal event, or
after an ``event: error`` when the log no longer holds what was asked for.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from producers.submitter import BrokerUnavailable, Submitter
from schemas import Cancel, StreamEvent, error_to_sse, event_to_sse
from tokenbus.access import Access
from tokenbus.http import ApiError, client_address, parse_request_id

from .directory import RequestDirectory
from .hub import StreamHub
from .subscription import StreamTruncated, subscribe

log = logging.getLogger(__name__)
router = APIRouter()

# Proxies (nginx and friends) must pass each event on at once.
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def resume_point(after: int | None, last_event_id: str | None) -> int:
    """The seq to resume after; -1 for the whole stream."""
    if last_event_id is not None and last_event_id.strip():
        try:
            value = int(last_event_id.strip())
        except ValueError:
            raise ApiError(
                400, "invalid_last_event_id",
                f"Last-Event-ID {last_event_id!r} is not a seq (an integer >= 0)",
            ) from None  # fmt: skip
        if value < 0:
            raise ApiError(400, "invalid_last_event_id", "Last-Event-ID must be >= 0")
        return value
    return -1 if after is None else after


@router.get("/v1/requests/{request_id}/events", response_model=None)
async def stream_events(
    request_id: str,
    request: Request,
    after: Annotated[int | None, Query(ge=-1, description="resume after this seq")] = None,
    pace: Annotated[Literal["fast", "original"], Query()] = "fast",
    token: Annotated[str | None, Query(description="stream token from the submission")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    rid = parse_request_id(request_id)
    resume_after = resume_point(after, last_event_id)
    access: Access = request.state.access
    client = client_address(request)
    if token is not None:
        caller = access.check_stream_token(token, rid, client)
    else:
        caller = access.authenticate(authorization, client)
    directory: RequestDirectory = request.state.directory
    known = await directory.owned(rid, caller)
    release = access.open_stream(caller)  # a 429 comes here, before the response starts
    settings = request.state.server_settings
    frames = _frames(request, rid, resume_after, pace, known.cancel_on_disconnect)
    return EventSourceResponse(
        _released(frames, release),
        ping=settings.keepalive_s,
        send_timeout=settings.send_timeout_s,
        headers=_STREAM_HEADERS,
    )


async def _released(
    frames: AsyncIterator[ServerSentEvent], release: Callable[[], None]
) -> AsyncIterator[ServerSentEvent]:
    try:
        async for frame in frames:
            yield frame
    finally:
        release()


async def _frames(
    request: Request, rid: uuid.UUID, after: int, pace: str, cancel_on_disconnect: bool
) -> AsyncIterator[ServerSentEvent]:
    state = request.state
    hub: StreamHub = state.hub
    events = subscribe(hub, state.log, rid, after=after)
    if pace == "original":
        events = _original_pace(events)
    # Delivery delay counts live delivery only: events generated after this
    # subscriber connected, at the live pace. A replay's old events would add their
    # age, and delays paced on purpose, to the figure.
    connected = datetime.now(UTC) if pace == "fast" else None
    finished = False
    try:
        async for event in events:
            yield event_to_sse(event)
            # Resumed by sse-starlette once the frame has been sent.
            if connected is not None and event.ts >= connected:
                hub.delivery_delay.observe((datetime.now(UTC) - event.ts).total_seconds())
        finished = True
    except StreamTruncated as exc:
        finished = True
        yield error_to_sse("stream_truncated", str(exc))
    finally:
        if not finished and cancel_on_disconnect:
            _cancel_in_background(state.submitter, rid, state.background)


async def _original_pace(events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    """Each event when it is due: as far after the first as it was when recorded."""
    first: datetime | None = None
    start = 0.0
    async for event in events:
        if first is None:
            first, start = event.ts, time.monotonic()
        else:
            due = start + (event.ts - first).total_seconds()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the recorded gap: pacing is the point here
        yield event


def _cancel_in_background(
    submitter: Submitter, rid: uuid.UUID, background: set[asyncio.Task[None]]
) -> None:
    """The subscriber is gone (its task is being cancelled), so the Cancel is sent
    from a task of its own."""

    async def cancel() -> None:
        try:
            await submitter.cancel(
                Cancel(request_id=rid, reason="client disconnected", ts=datetime.now(UTC))
            )
        except BrokerUnavailable:
            log.warning("could not cancel %s after its client disconnected", rid)

    task = asyncio.get_running_loop().create_task(cancel())
    background.add(task)
    task.add_done_callback(background.discard)
