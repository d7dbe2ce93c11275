"""What `tokenbus audit show` and `tokenbus audit export` print."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from schemas import (
    FailedEvent,
    FinishedEvent,
    MalformedMessage,
    StartedEvent,
    TokenEvent,
    decode_event,
    decode_request,
)

from .store import AuditStore, submitted_ms


def show(store: AuditStore, request_id: uuid.UUID) -> str | None:
    """A human-readable account of one request; None if the store has nothing of it."""
    request = store.request(request_id)
    events = store.events(request_id)
    if request is None and not events:
        return None
    when = datetime.fromtimestamp(submitted_ms(request_id) / 1000, tz=UTC)
    lines = [f"request    {request_id}", f"submitted  {when.isoformat()}"]
    if request is None:
        lines.append("prompt     (no request message in the store: it was malformed or is missing)")
    else:
        try:
            submitted = decode_request(request.value)
        except MalformedMessage as exc:
            lines.append(f"prompt     (the stored request does not decode: {exc})")
        else:
            lines.append(f"tenant     {submitted.tenant}")
            lines.append(f"model      {submitted.model} (as requested)")
            lines.append(f"parameters {submitted.sampling.model_dump_json()}")
            if submitted.prompt is not None:
                lines.append(f"prompt     {submitted.prompt!r}")
            for i, message in enumerate(submitted.messages or []):
                label = "prompt" if i == 0 else ""
                lines.append(f"{label:<10} {message.role}: {message.content!r}")
    decoded = []
    for record in events:
        try:
            decoded.append(decode_event(record.value))
        except MalformedMessage as exc:  # only a tampered store holds one
            lines.append(f"record     seq {record.seq} does not decode ({exc}): run verify")
    workers = sorted({(e.worker, e.attempt) for e in decoded})
    lines += [f"worker     {worker} (attempt {attempt})" for worker, attempt in workers]
    text = "".join(e.text for e in decoded if isinstance(e, TokenEvent))
    for event in decoded:
        if isinstance(event, StartedEvent):
            lines.append(f"served by  {event.model} revision {event.model_revision}")
            lines.append(f"           {event.prompt_tokens} prompt tokens, "
                         f"queued {event.queue_wait_ms:.0f} ms")  # fmt: skip
        elif isinstance(event, FinishedEvent):
            ttft = f"{event.timings.ttft_ms:.0f} ms" if event.timings.ttft_ms is not None else "-"
            lines.append(
                f"finished   {event.finish_reason}: {event.usage.completion_tokens} tokens, "
                f"ttft {ttft}, total {event.timings.total_ms:.0f} ms"
            )
        elif isinstance(event, FailedEvent):
            lines.append(f"failed     {event.code}: {event.message}")
    if not decoded or not isinstance(decoded[-1], FinishedEvent | FailedEvent):
        lines.append("status     no terminal event (yet)")
    lines.append(f"text       {text!r}")
    lines.append("events     seq  +ms      type      text")
    start = decoded[0].ts if decoded else None
    for event in decoded:
        offset = (event.ts - start).total_seconds() * 1000 if start else 0.0
        shown = repr(event.text) if isinstance(event, TokenEvent) else ""
        lines.append(f"           {event.seq:<4} {offset:<8.1f} {event.type:<9} {shown}")
    if events:
        lines.append(f"chain head {events[-1].hash.hex()}")
    return "\n".join(lines)


def export_jsonl(
    store: AuditStore, *, since: datetime | None = None, until: datetime | None = None
) -> Iterator[str]:
    """One JSON line per record, the request first, then its events by seq; each with
    its hash and the message exactly as logged (``message``)."""
    since_ms = int(since.timestamp() * 1000) if since else 0
    until_ms = int(until.timestamp() * 1000) if until else None
    for request_id in store.request_ids(since_ms=since_ms, until_ms=until_ms):
        request = store.request(request_id)
        if request is not None:
            yield _line(kind="request", request_id=str(request_id), seq=None,
                        hash=request.digest.hex(), message=_json(request.value))  # fmt: skip
        for event in store.events(request_id):
            yield _line(kind="event", request_id=str(request_id), seq=event.seq,
                        hash=event.hash.hex(), message=_json(event.value))  # fmt: skip


def _json(value: bytes) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value.decode(errors="replace")


def _line(**fields: Any) -> str:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
