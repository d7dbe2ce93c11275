"""SSE framing: a stream event is a frame whose `data` is the event's wire JSON
(`schemas.wire` encodes the same model for Kafka), `id: <seq>`, `event: <type>`."""

from __future__ import annotations

import json

from sse_starlette import ServerSentEvent

from schemas import StreamEvent


def event_to_sse(event: StreamEvent) -> ServerSentEvent:
    """A stream event as an SSE frame: `id` is the seq a client resumes after."""
    return ServerSentEvent(id=str(event.seq), event=event.type, data=event.model_dump_json())


def error_to_sse(code: str, message: str) -> ServerSentEvent:
    """A relay-level problem with a stream (not an event of the stream itself)."""
    return ServerSentEvent(event="error", data=json.dumps({"code": code, "message": message}))
