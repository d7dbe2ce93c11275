"""The one place that turns messages into bytes and back.

Kafka values are the JSON of the pydantic models (every field, so readers in any
language see the whole record). SSE frames carry the very same JSON (`sse_frame`;
the relay encodes each event's frame once and shares the bytes among its
subscribers). Nothing else in tokenbus builds these strings by hand.
"""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from .events import StreamEvent
from .requests import Cancel, GenerationRequest
from .verdicts import Verdict


class MalformedMessage(ValueError):
    """A message on a topic that does not decode. Skip it, report it, keep consuming."""


_stream_event: TypeAdapter[StreamEvent] = TypeAdapter(StreamEvent)

_M = TypeVar("_M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    """A request, event or cancel as a Kafka value."""
    return message.model_dump_json().encode()


def sse_frame(event: StreamEvent) -> bytes:
    """A stream event as an SSE frame: ``id`` is the seq a client resumes after,
    ``event`` the type, ``data`` the event's JSON (one line: JSON escapes newlines)."""
    data = type(event).__pydantic_serializer__.to_json(event)
    return b"id: %d\r\nevent: %s\r\ndata: %s\r\n\r\n" % (event.seq, event.type.encode(), data)


def sse_error_frame(code: str, message: str) -> bytes:
    """A relay-level problem with a stream (not an event of the stream itself)."""
    data = json.dumps({"code": code, "message": message})
    return b"event: error\r\ndata: %s\r\n\r\n" % data.encode()


def _decode(model: type[_M], value: bytes | None) -> _M:
    if value is None:
        raise MalformedMessage(f"empty {model.__name__} (tombstone)")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        raise MalformedMessage(f"not a valid {model.__name__}: {_summary(exc)}") from exc


def decode_request(value: bytes | None) -> GenerationRequest:
    return _decode(GenerationRequest, value)


def decode_cancel(value: bytes | None) -> Cancel:
    return _decode(Cancel, value)


def decode_verdict(value: bytes | None) -> Verdict:
    return _decode(Verdict, value)


def decode_event(value: bytes | None) -> StreamEvent:
    if value is None:
        raise MalformedMessage("empty StreamEvent (tombstone)")
    try:
        return _stream_event.validate_json(value)
    except ValidationError as exc:
        raise MalformedMessage(f"not a valid StreamEvent: {_summary(exc)}") from exc


def _summary(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<root>"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"
