"""The one place that turns messages into bytes and back.

Kafka values are the JSON of the pydantic models (every field, so readers in any
language see the whole record). SSE frames carry the very same JSON (see
`tokenbus.edge.sse`, the edge that speaks SSE). Nothing else in tokenbus builds
these strings by hand.
"""

from __future__ import annotations

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
