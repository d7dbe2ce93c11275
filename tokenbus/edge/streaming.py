"""The one SSE streaming helper: every event stream the HTTP API serves (the native
``/v1/requests/{id}/events`` and the OpenAI ``stream: true`` responses) goes
through it, so each gets the same treatment:

- the per-tenant and per-client stream limits (a 429 before the response starts);
- keep-alive comments, and the send timeout that drops a client stuck that long;
- the stream's slot released however the response ends;
- ``cancel_on_disconnect``: a subscriber that leaves before the end cancels the
  request (a Cancel on ``tokenbus.control``, sent from a task of its own).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from fastapi import Request

from producers.submitter import BrokerUnavailable, Submitter
from schemas import Cancel

from .access import Access, Caller
from .sse_response import SseResponse

log = logging.getLogger(__name__)

# Proxies (nginx and friends) must pass each event on at once.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def open_stream(request: Request, caller: Caller) -> Callable[[], None]:
    """Count a stream against the caller's limits (429 when over); returns the
    function that releases it. Take it before anything is submitted."""
    access: Access = request.state.access
    return access.open_stream(caller)


def stream_response(
    request: Request,
    request_id: uuid.UUID,
    chunks: AsyncIterator[bytes],
    release: Callable[[], None],
    *,
    cancel_on_disconnect: bool,
    headers: dict[str, str] | None = None,
) -> SseResponse:
    """``chunks`` (encoded SSE frames) as an SSE response; ``release`` is called once
    it ends, and the request is cancelled if it ends before ``chunks`` does and
    ``cancel_on_disconnect``."""
    settings = request.state.server_settings
    state = request.state

    def on_end(complete: bool) -> None:
        release()
        # Not complete: the client went away, a send timed out, or the server
        # is shutting down.
        if not complete and cancel_on_disconnect:
            _cancel(state, request_id)

    return SseResponse(
        chunks,
        ping_s=settings.keepalive_s,
        send_timeout_s=settings.send_timeout_s,
        headers=STREAM_HEADERS | (headers or {}),
        on_end=on_end,
    )


def _cancel(state: object, request_id: uuid.UUID) -> None:
    submitter: Submitter = state.submitter  # type: ignore[attr-defined]
    background: set[asyncio.Task[None]] = state.background  # type: ignore[attr-defined]

    async def cancel() -> None:
        try:
            await submitter.cancel(
                Cancel(request_id=request_id, reason="client disconnected", ts=datetime.now(UTC))
            )
        except BrokerUnavailable:
            log.warning("could not cancel %s after its client disconnected", request_id)

    task = asyncio.get_running_loop().create_task(cancel())
    background.add(task)
    task.add_done_callback(background.discard)
