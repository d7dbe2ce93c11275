"""The contract: ids, bounds, and the one wire encoding."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas import (
    ErrorCode,
    FailedEvent,
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    MalformedMessage,
    StartedEvent,
    Timings,
    TokenEvent,
    Topics,
    Usage,
    decode_event,
    decode_request,
    encode,
    sse_frame,
    uuid7,
    uuid7_unix_ms,
)
from tokenbus.bus.kafka import partition_for

NOW = datetime.now(UTC)


def test_uuid7_is_version_7_and_carries_its_timestamp() -> None:
    before = time.time_ns() // 1_000_000
    rid = uuid7()
    after = time.time_ns() // 1_000_000
    assert rid.version == 7 and rid.variant == uuid.RFC_4122
    assert before <= uuid7_unix_ms(rid) <= after
    assert len({uuid7() for _ in range(1000)}) == 1000


def test_uuid7_orders_by_time() -> None:
    assert uuid7(unix_ms=1_000) < uuid7(unix_ms=2_000)


def test_request_requires_a_uuid7() -> None:
    with pytest.raises(ValidationError, match="UUIDv7"):
        GenerationRequest(request_id=uuid.uuid4(), prompt="x", submitted_at=NOW)


def test_request_round_trips_and_ignores_unknown_fields() -> None:
    request = GenerationRequest(request_id=uuid7(), prompt="hi", submitted_at=NOW)
    wire = json.loads(encode(request))
    assert wire["schema_version"] == 1 and wire["sampling"]["max_tokens"] == 256
    wire["added_in_a_later_version"] = True
    assert decode_request(json.dumps(wire).encode()) == request


EVENTS = [
    StartedEvent(
        request_id=uuid7(),
        seq=0,
        ts=NOW,
        worker="w",
        model="m",
        model_revision="r",
        prompt_tokens=3,
        queue_wait_ms=1.5,
    ),
    TokenEvent(request_id=uuid7(), seq=1, ts=NOW, worker="w", text="héllo\n", token_ids=[1, 2]),
    FinishedEvent(
        request_id=uuid7(),
        seq=2,
        ts=NOW,
        worker="w",
        finish_reason=FinishReason.LENGTH,
        usage=Usage(prompt_tokens=3, completion_tokens=1),
        timings=Timings(ttft_ms=1.0, total_ms=2.0),
    ),
    FailedEvent(
        request_id=uuid7(), seq=0, ts=NOW, worker="w", code=ErrorCode.INTERNAL_ERROR, message="boom"
    ),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_event_round_trips_through_kafka_encoding(event: object) -> None:
    assert decode_event(encode(event)) == event  # type: ignore[arg-type]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_sse_frame_carries_seq_type_and_the_same_json(event: object) -> None:
    raw = sse_frame(event).decode()  # type: ignore[arg-type]
    lines = raw.strip().splitlines()
    assert lines[0] == f"id: {event.seq}"  # type: ignore[attr-defined]
    assert lines[1] == f"event: {event.type}"  # type: ignore[attr-defined]
    assert len(lines) == 3 and lines[2].startswith("data: ")  # newlines in text stay escaped
    assert decode_event(lines[2].removeprefix("data: ").encode()) == event


@pytest.mark.parametrize("value", [None, b"", b"{", b'{"type": "token"}', b'{"type": "nope"}'])
def test_malformed_events_raise_one_error_type(value: bytes | None) -> None:
    with pytest.raises(MalformedMessage):
        decode_event(value)


def test_topics_with_prefix() -> None:
    topics = Topics.with_prefix("x.")
    assert topics.all() == (
        "x.tokenbus.requests",
        "x.tokenbus.tokens",
        "x.tokenbus.control",
        "x.tokenbus.dead-letter",
        "x.tokenbus.audit-checkpoints",
        "x.tokenbus.verdicts",
    )


def test_partition_for_matches_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    for _ in range(50):
        rid = uuid7()
        key = str(rid).encode()
        assert partition_for(rid, 4) == DefaultPartitioner()(key, [0, 1, 2, 3], [0, 1, 2, 3])


def _token(seq: int, attempt: int, text: str = "t") -> TokenEvent:
    rid = uuid.UUID(int=7 << 76)
    return TokenEvent(request_id=rid, seq=seq, ts=NOW, worker="w", text=text, token_ids=[seq],
                      attempt=attempt)  # fmt: skip


def accepted(events: list[TokenEvent], **view: object) -> list[tuple[int, int]]:
    from schemas import StreamView

    rule = StreamView(**view)  # type: ignore[arg-type]
    return [(e.seq, e.attempt) for e in events if rule.accept(e)]


def test_fencing_takes_the_first_of_each_seq_and_drops_lower_attempts() -> None:
    log = [
        _token(0, 1), _token(1, 1), _token(2, 1),
        _token(3, 1),  # the stale worker slipped one in before the claim: it counts
        _token(3, 5),  # the new owner's claim: a duplicate seq, but it raises the attempt
        _token(4, 1),  # the stale worker again: fenced
        _token(4, 5), _token(5, 5),
    ]  # fmt: skip
    assert accepted(log) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 5), (5, 5)]


def test_fencing_drops_duplicates_of_one_attempt() -> None:
    assert accepted([_token(0, 1), _token(0, 1), _token(1, 1)]) == [(0, 1), (1, 1)]


def test_a_view_anchored_mid_stream_starts_at_its_first_event() -> None:
    assert accepted([_token(7, 1), _token(8, 1)], anchor_on_first=True) == [(7, 1), (8, 1)]
    assert accepted([_token(7, 1)]) == []
