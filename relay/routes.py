"""``GET /v1/requests/{id}/events``: a request's stream as Server-Sent Events.

    id: <seq>        event: started | token | finished | failed        data: <json>

Resume with ``Last-Event-ID: N`` or ``?after=N`` (the stream continues at N+1).
Keep-alive comments flow while nothing else does; the response ends after the
terminal event.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from schemas import event_to_sse
from schemas.ids import is_uuid7
from tokenbus.http import ApiError

from .hub import StreamHub
from .log import LogReader, LogReadTimeout
from .subscription import subscribe

router = APIRouter()

# Proxies (nginx and friends) must pass each event on at once.
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def parse_request_id(raw: str) -> uuid.UUID:
    try:
        request_id = uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "invalid_request_id", f"{raw!r} is not a request id (a UUID)") from None
    if not is_uuid7(request_id):
        raise ApiError(400, "invalid_request_id", f"{raw} is not a tokenbus request id (UUIDv7)")
    return request_id


def resume_point(after: int | None, last_event_id: str | None) -> int:
    """The seq to resume after; -1 for the whole stream."""
    if last_event_id is not None and last_event_id.strip():
        try:
            value = int(last_event_id.strip())
        except ValueError:
            raise ApiError(
                400,
                "invalid_last_event_id",
                f"Last-Event-ID {last_event_id!r} is not a seq (an integer >= 0)",
            ) from None
        if value < 0:
            raise ApiError(400, "invalid_last_event_id", "Last-Event-ID must be >= 0")
        return value
    return -1 if after is None else after


@router.get("/v1/requests/{request_id}/events", response_model=None)
async def stream_events(
    request_id: str,
    request: Request,
    after: Annotated[int | None, Query(ge=-1, description="resume after this seq")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    rid = parse_request_id(request_id)
    resume_after = resume_point(after, last_event_id)
    hub: StreamHub = request.state.hub
    log: LogReader = request.state.log
    if not hub.holds(rid):
        try:
            known = await log.was_submitted(rid)
        except LogReadTimeout as exc:
            raise ApiError(503, "log_unavailable", str(exc), {"Retry-After": "5"}) from exc
        if not known:
            raise ApiError(
                404,
                "unknown_request",
                f"no request {rid} was submitted (or it has left the log's retention window)",
            )
    settings = request.state.server_settings
    return EventSourceResponse(
        _frames(hub, log, rid, resume_after),
        ping=settings.keepalive_s,
        send_timeout=settings.send_timeout_s,
        headers=_STREAM_HEADERS,
    )


async def _frames(
    hub: StreamHub, log: LogReader, request_id: uuid.UUID, after: int
) -> AsyncIterator[ServerSentEvent]:
    async for event in subscribe(hub, log, request_id, after=after):
        yield event_to_sse(event)
