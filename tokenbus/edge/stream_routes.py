"""``GET /v1/requests/{id}/events``: a request's stream as Server-Sent Events.

    id: <seq>        event: started | token | finished | failed        data: <json>

Resume with ``Last-Event-ID: N`` or ``?after=N`` (the stream continues at N+1).
``?pace=original`` replays a stream with its recorded timing. Keep-alive comments
flow while nothing else does; the response ends after the terminal event, or
after an ``event: error`` when the log no longer holds what was asked for.

Nothing waits for a seq that cannot come: resuming a finished stream at its
terminal seq answers 204 at once (an EventSource stops reconnecting on it), and
past it 416 ``after_end_of_stream``, saying where the stream ended. Only a
finished stream's end is known; on a live one a high seq may still come, and is
waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from prometheus_client import Histogram

from relay.hub import Held, StreamHub
from relay.strict import GuardTimeout
from relay.subscription import ResumedPastEnd, StreamTruncated, subscribe
from schemas import is_terminal, sse_error_frame
from tokenbus.bus.log import LogReader, LogReadTimeout

from .access import Access
from .directory import RequestDirectory
from .errors import ApiError, client_address, parse_request_id
from .sse_response import SseResponse
from .streaming import open_stream, stream_response

log = logging.getLogger(__name__)
router = APIRouter()

# Seqs are int64 on the wire (a consumer in any language reads them so).
_MAX_SEQ = 2**63 - 1


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
        if not 0 <= value <= _MAX_SEQ:
            raise ApiError(400, "invalid_last_event_id", f"Last-Event-ID must be 0..{_MAX_SEQ}")
        return value
    if after is not None and after > _MAX_SEQ:
        raise ApiError(400, "invalid_after", f"after must be -1..{_MAX_SEQ}", param="after")
    return -1 if after is None else after


async def check_resume_point(
    hub: StreamHub, log_reader: LogReader, rid: uuid.UUID, after: int
) -> bool:
    """Whether there is anything left after seq ``after``: False when the stream
    finished at ``after`` (204); 416 past its end. A stream not finished (as far as
    the hub or the log know) may still reach any seq."""
    if after < 0:
        return True
    last = hub.last_held(rid)
    end = last.seq if last is not None and is_terminal(last) else None
    if end is None and not hub.holds(rid):
        try:
            end = await log_reader.finished_at(rid)
        except LogReadTimeout as exc:
            raise ApiError(503, "log_unavailable", str(exc), {"Retry-After": "5"}) from exc
    if end is None or after < end:
        return True
    if after == end:
        return False
    raise ApiError(416, "after_end_of_stream", str(ResumedPastEnd(rid, after, end)))


@router.get("/v1/requests/{request_id}/events", response_model=None)
async def stream_events(
    request_id: str,
    request: Request,
    after: Annotated[int | None, Query(ge=-1, description="resume after this seq")] = None,
    pace: Annotated[Literal["fast", "original"], Query()] = "fast",
    token: Annotated[str | None, Query(description="stream token from the submission")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> SseResponse | Response:
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
    if not await check_resume_point(request.state.hub, request.state.log, rid, resume_after):
        return Response(status_code=204)  # complete: an EventSource stops reconnecting
    release = open_stream(request, caller)  # a 429 comes here, before the response starts
    return stream_response(
        request,
        rid,
        _frames(request, rid, resume_after, pace, strict=known.strict),
        release,
        cancel_on_disconnect=known.cancel_on_disconnect,
    )


async def _frames(
    request: Request, rid: uuid.UUID, after: int, pace: str, *, strict: bool
) -> AsyncIterator[bytes]:
    state = request.state
    hub: StreamHub = state.hub
    batches = subscribe(
        hub, state.log, rid, after=after,
        strict=state.verdicts if strict else None,
        strict_wait_s=state.server_settings.strict_wait_s,
    )  # fmt: skip
    if pace == "original":
        batches = _original_pace(batches)
    # Delivery delay counts live delivery only: events generated after this
    # subscriber connected, at the live pace. A replay's old events would add their
    # age, and delays paced on purpose, to the figure.
    connected = time.time() if pace == "fast" else None
    delay: Histogram | None = None  # this stream's model's series, once known
    try:
        async for batch in batches:
            # Each frame was encoded once by the hub; a batch goes out in one write.
            yield batch[0].frame if len(batch) == 1 else b"".join([h.frame for h in batch])
            # Resumed once the bytes have been sent (SseResponse). Plain floats: this
            # runs per event and subscriber, the relay's hottest loop.
            if connected is not None:
                now = time.time()
                for held in batch:
                    if held.ts >= connected:
                        if delay is None:
                            delay = hub.delivery_delay.labels(model=hub.model_of(rid) or "unknown")
                        delay.observe(now - held.ts)
    except StreamTruncated as exc:
        yield sse_error_frame("stream_truncated", str(exc))
    except ResumedPastEnd as exc:  # it ended between the check and the subscription
        yield sse_error_frame("after_end_of_stream", str(exc))
    except GuardTimeout as exc:
        yield sse_error_frame("guard_unavailable", f"{exc}: a strict stream fails closed")


async def _original_pace(batches: AsyncIterator[list[Held]]) -> AsyncIterator[list[Held]]:
    """Each event when it is due: as far after the first as it was when recorded."""
    first: datetime | None = None
    start = 0.0
    async for batch in batches:
        for held in batch:
            if first is None:
                first, start = held.event.ts, time.monotonic()
            else:
                due = start + (held.event.ts - first).total_seconds()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # the recorded gap: pacing is the point here
            yield [held]
