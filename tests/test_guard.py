"""The guard end to end, with the real model and broker: a moderated stream that
makes the model write an e-mail address is cut and ends ``content_filter``; an
unmoderated one runs on; a stale guard's verdict does not count; a guard killed
with SIGKILL mid-stream is replaced and judges the stream again under a new epoch.

Strict streams at the relay: no SSE client, live or replayed (from the relay's
memory or from the log by another relay), ever receives the flagged text; the
stream stays contiguous and ends ``content_filter``; with no guard running, a
strict stream fails closed after the bounded wait, having delivered no text."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import AuditStore, account, open_store, verify
from consumers.guard import Guard, Policies
from producers import TokenbusClient
from schemas import (
    FinishedEvent,
    FinishReason,
    ModerationMode,
    StreamEvent,
    TokenEvent,
    Verdict,
    VerdictView,
    Violation,
    decode_event,
    encode,
    message_key,
)
from tokenbus.bus.kafka import start_producer
from tokenbus.bus.settings import GuardSettings, KafkaSettings, kafka_env
from tokenbus.bus.verdicts import VerdictTail
from workers import LoadedModel

from .audit_support import auditing
from .conftest import (
    ON_TANSU,
    assert_complete,
    collect,
    eventually,
    running,
    serving,
    text_of,
    working,
)
from .guard_support import guarding

pytestmark = pytest.mark.broker_behaviour

# A plain prompt SmolLM2 continues, greedily, with " jdoe@example.com" and then a
# paragraph about sustainable living.
EMAIL = "Name: John Smith\nEmail: john.smith@example.com\n\nName: Jane Doe\nEmail:"
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@contextlib.asynccontextmanager
async def following(kafka: KafkaSettings) -> AsyncIterator[VerdictTail]:
    tail = VerdictTail(kafka)
    async with running(tail.run(), tail.caught_up):
        yield tail


@dataclass
class Bus:
    client: TokenbusClient
    http: httpx.AsyncClient
    tail: VerdictTail
    guard: Guard


@pytest.fixture
async def bus(kafka: KafkaSettings, smollm: LoadedModel) -> AsyncIterator[Bus]:
    async with (
        serving(kafka) as (url, http),
        working(kafka, smollm),
        guarding(kafka) as guard,
        following(kafka) as tail,
        TokenbusClient(url) as client,
    ):
        yield Bus(client, http, tail, guard)


async def test_monitor_cuts_the_stream_right_after_an_email_address(bus: Bus) -> None:
    client, tail = bus.client, bus.tail
    submission = await client.submit(EMAIL, max_tokens=60, temperature=0, moderation="monitor")
    events = await collect(client, submission.request_id)
    assert_complete(events)
    end = events[-1]
    assert isinstance(end, FinishedEvent)
    assert end.finish_reason is FinishReason.CONTENT_FILTER
    assert end.content_filter is not None and end.content_filter.category == "email"
    text = text_of(events)
    assert "jdoe@example.com" in text  # monitor mode: delivered at once, then cut
    view = await tail.wait_judged(submission.request_id, end.seq, deadline=_in(30))
    flagged = view.flagged
    assert flagged is not None and flagged.category == "email" and flagged.policy == "pii.email"
    assert text[slice(*flagged.span)] == "jdoe@example.com"
    assert end.content_filter.seq == flagged.seq
    # Cut right after: within a few tokens of the address's end (the guard waits for
    # the next token to know the address is over; then a fetch and a decode step).
    assert end.seq - flagged.end_seq <= 8
    assert end.usage.completion_tokens < 60
    assert view.final


async def test_audit_stores_the_verdicts_with_the_records_they_judged(
    bus: Bus, kafka: KafkaSettings, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    path = str(tmp_path / "audit.db")
    async with auditing(kafka, path, key):
        submission = await bus.client.submit(EMAIL, max_tokens=60, temperature=0,
                                             moderation="monitor")  # fmt: skip
        rid = submission.request_id
        events = await collect(bus.client, rid)
        await bus.tail.wait_judged(rid, events[-1].seq, deadline=_in(30))
        with open_store(path) as reader:
            await eventually(lambda: _audited_through(reader, rid, events[-1].seq))
    with open_store(path) as store:  # the consumer checkpointed as it stopped
        found = account(store, rid)
        assert verify(store, key.public_key()).clean
    assert found is not None and found["outcome"]["finish_reason"] == "content_filter"
    assert found["outcome"]["content_filter"]["category"] == "email"
    moderation = found["moderation"]
    assert moderation["final"] and moderation["judged_through"] == events[-1].seq
    assert [v["text"] for v in moderation["violations"]] == ["jdoe@example.com"]


def _audited_through(store: AuditStore, rid: uuid.UUID, seq: int) -> bool:
    found = account(store, rid)
    return bool(found and found["moderation"] and found["moderation"]["final"]
                and len(found["events"]) == seq + 1)  # fmt: skip


async def test_off_changes_nothing(bus: Bus) -> None:
    client, tail, guard = bus.client, bus.tail, bus.guard
    submission = await client.submit(EMAIL, max_tokens=40, temperature=0, moderation="off")
    events = await collect(client, submission.request_id)
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert "jdoe@example.com" in text_of(events)
    await eventually(lambda: guard.metrics.streams.labels("off")._value.get() == 1)
    assert tail.view(submission.request_id) is None  # no verdict: not judged


async def test_a_stale_guards_verdict_does_not_count(bus: Bus, kafka: KafkaSettings) -> None:
    client, tail = bus.client, bus.tail
    submission = await client.submit(messages=STORY, max_tokens=60, temperature=0,
                                     moderation="monitor")  # fmt: skip
    rid = submission.request_id
    await eventually(lambda: tail.watermark(rid) >= 2)
    view = tail.view(rid)
    assert view is not None
    stale = Verdict(
        request_id=rid, guard="frozen-guard", epoch=view.epoch - 1, judged_through=2,
        violations=[Violation(seq=1, end_seq=1, category="deny", policy="deny",
                              policy_version="1", span=(0, 1))],
        tenant="default", mode=ModerationMode.MONITOR, policy_version="1", ts=datetime.now(UTC),
    )  # fmt: skip
    producer = await start_producer(kafka)
    try:
        await producer.send_and_wait(kafka.topics.verdicts, encode(stale), key=message_key(rid))
    finally:
        await producer.stop()
    events = await collect(client, rid)
    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason is FinishReason.LENGTH  # not cut
    await eventually(lambda: tail.fenced >= 1)
    assert tail.view(rid).flagged is None  # type: ignore[union-attr]


async def test_malformed_messages_are_skipped_and_counted(bus: Bus, kafka: KafkaSettings) -> None:
    rid = uuid.uuid4()
    producer = await start_producer(kafka)
    try:
        for topic in (kafka.topics.tokens, kafka.topics.verdicts):
            await producer.send_and_wait(topic, b"{not json", key=message_key(rid))
    finally:
        await producer.stop()
    submission = await bus.client.submit(EMAIL, max_tokens=40, temperature=0,
                                         moderation="monitor")  # fmt: skip
    events = await collect(bus.client, submission.request_id)
    assert isinstance(events[-1], FinishedEvent)
    assert events[-1].finish_reason is FinishReason.CONTENT_FILTER  # judged all the same
    await eventually(lambda: bus.guard.metrics.malformed._value.get() == 1)
    await eventually(lambda: bus.tail.malformed == 1)


async def test_openai_endpoints_say_content_filter(bus: Bus) -> None:
    answer = await bus.http.post(
        "/v1/completions",
        json={"prompt": EMAIL, "max_tokens": 60, "temperature": 0, "moderation": "monitor"},
    )
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"


async def test_the_tenant_default_comes_from_the_policy_file(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text('[default]\nmode = "strict"\n[tenants.other]\nmode = "off"\n')
    async with serving(kafka, guard_policies=policies) as (_, http):
        chosen = await http.post("/v1/requests", json={"prompt": "hi", "moderation": "monitor"})
        default = await http.post("/v1/requests", json={"prompt": "hi"})
    assert chosen.json()["moderation"] == "monitor"
    assert default.json()["moderation"] == "strict"


@pytest.mark.timeout(300)  # two guard processes, a group rebalance and a generation
async def test_a_guard_killed_mid_strict_stream_is_replaced_and_the_stream_goes_on(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    # Strict: the client's stream is open across the kill, and it may receive only
    # what a guard has judged; it waits while no guard runs (up to strict_wait_s).
    async with (
        serving(kafka, strict_wait_s=120) as (url, _),
        working(kafka, smollm),
        following(kafka) as tail,
        TokenbusClient(url) as client,
    ):
        first = await _guard_process(kafka)
        try:
            submission = await client.submit(messages=STORY, max_tokens=80, temperature=0,
                                             moderation="strict")  # fmt: skip
            rid = submission.request_id
            streaming = asyncio.create_task(collect(client, rid))
            await eventually(lambda: tail.watermark(rid) >= 3, within=60)
            before = tail.view(rid)
            assert before is not None and not before.final  # killed mid-stream
            epoch = before.epoch
            first.send_signal(signal.SIGKILL)
            await first.wait()
            second = await _guard_process(kafka)
            try:
                events = await asyncio.wait_for(streaming, 240)
                assert_complete(events)
                assert isinstance(events[-1], FinishedEvent)
                assert events[-1].finish_reason is not FinishReason.CONTENT_FILTER
                view = await tail.wait_judged(rid, events[-1].seq, deadline=_in(60))
                await eventually(lambda: _final(view), within=60)
                assert view.epoch > epoch  # the new guard judged it again, from its start
                assert view.flagged is None
            finally:
                await _stop(second)
        finally:
            await _stop(first)


def _final(view: VerdictView) -> bool:
    return view.final


async def _guard_process(kafka: KafkaSettings) -> asyncio.subprocess.Process:
    env = os.environ | kafka_env(kafka) | {"TOKENBUS_GUARD_GUARD_ID": f"g-{uuid.uuid4().hex[:6]}"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenbus", "guard", env=env, start_new_session=True
    )


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


def _in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def _raw_stream(url: str, path: str) -> tuple[bytes, list[StreamEvent]]:
    """The SSE bytes of a whole stream, and its events."""
    async with httpx.AsyncClient(timeout=60) as http, http.stream("GET", url + path) as response:
        assert response.status_code == 200
        raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    events = [
        decode_event(line.removeprefix(b"data: "))
        for frame in raw.split(b"\r\n\r\n")
        if not frame.startswith(b"event: error")  # the relay's own word, not an event
        for line in frame.split(b"\r\n")
        if line.startswith(b"data: ")
    ]
    return raw, events


async def test_strict_never_delivers_the_flagged_text(bus: Bus, kafka: KafkaSettings) -> None:
    submission = await bus.client.submit(EMAIL, max_tokens=60, temperature=0, moderation="strict")
    rid = submission.request_id
    live = await collect(bus.client, rid)
    assert_complete(live)
    end = live[-1]
    assert isinstance(end, FinishedEvent) and end.finish_reason is FinishReason.CONTENT_FILTER
    assert end.content_filter is not None and end.content_filter.category == "email"
    assert "example.com" not in text_of(live) and "jdoe" not in text_of(live)
    # From the flagged token on, tokens come redacted: same seqs, no text.
    redacted = [e for e in live if isinstance(e, TokenEvent) and e.seq >= end.content_filter.seq]
    assert redacted and all(e.text == "" and e.token_ids == [] for e in redacted)
    # What the model wrote (the log holds it; the relay never sends it).
    view = bus.tail.view(rid)
    assert view is not None and view.flagged is not None

    path = f"/v1/requests/{rid}/events"
    url = str(bus.http.base_url).rstrip("/")
    replayed_raw, replayed = await _raw_stream(url, path)  # from this relay's memory
    assert b"example.com" not in replayed_raw
    assert [e.seq for e in replayed] == [e.seq for e in live]
    async with serving(kafka) as (fresh, _):  # another relay: from the log
        from_log_raw, from_log = await _raw_stream(fresh, path)
    assert b"example.com" not in from_log_raw and b"jdoe" not in from_log_raw
    assert [e.seq for e in from_log] == [e.seq for e in live]


async def test_strict_fails_closed_without_a_guard(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    async with serving(kafka, strict_wait_s=2) as (url, http), working(kafka, smollm):
        submitted = await http.post(
            "/v1/requests", json={"prompt": EMAIL, "max_tokens": 20, "moderation": "strict"}
        )
        assert submitted.status_code == 202, submitted.text
        path = f"/v1/requests/{submitted.json()['request_id']}/events"
        async with asyncio.timeout(60):
            raw, events = await _raw_stream(url, path)
    assert b"event: error" in raw and b"guard_unavailable" in raw and b"fails closed" in raw
    assert not [e for e in events if isinstance(e, TokenEvent) and e.text]


async def test_strict_on_the_openai_endpoint(bus: Bus) -> None:
    answer = await bus.http.post(
        "/v1/completions",
        json={"prompt": EMAIL, "max_tokens": 60, "temperature": 0, "moderation": "strict"},
    )
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert "example.com" not in choice["text"]


@pytest.mark.skipif(not ON_TANSU, reason="needs a broker that refuses a producer id: Tansu")
async def test_a_guard_whose_producer_cannot_start_stops_its_consumer(kafka: KafkaSettings) -> None:
    """The guard makes its group consumer, then starts its producer. Required to be
    idempotent on a broker that refuses producer ids, the producer cannot start; the
    consumer was left unstopped (aiokafka's "Unclosed AIOKafkaConsumer" then failed
    a later test). The guard's error is what the caller sees."""
    strict = kafka.model_copy(update={"enable_idempotence": True})
    guard = Guard(kafka=strict, settings=GuardSettings(), policies=Policies.builtin())
    with pytest.raises(KafkaError, match="cannot be honoured"):
        await guard.run()
    assert guard._consumer is not None
    assert guard._consumer._closed, "the guard's consumer was left unstopped"
