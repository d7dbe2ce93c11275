"""The analytics consumer as it runs: `tokenbus analytics` in its own process
against the session broker, fed by real requests through the relay and a worker
with the real SmolLM2. Its figures are checked against timings computed here from
the events themselves."""

from __future__ import annotations

import contextlib
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from schemas import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    StartedEvent,
    StreamEvent,
    Timings,
    TokenEvent,
    Usage,
    decode_event,
    encode,
    is_terminal,
    message_key,
    uuid7,
)
from tokenbus.bus.kafka import new_producer, partition_for
from tokenbus.bus.settings import KafkaSettings
from workers import LoadedModel

from .analytics_support import analytics_process
from .conftest import eventually, serving, working

pytestmark = pytest.mark.broker_behaviour

KEYS = {"key-acme": "acme", "key-globex": "globex"}
CHAT = [{"role": "user", "content": "Name a colour."}]


@dataclass
class Analytics:
    url: str
    http: httpx.AsyncClient

    async def summary(self) -> dict[str, Any]:
        response = await self.http.get("/summary")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    async def metrics(self) -> dict[str, float]:
        """Every sample as ``name{label=value,...}`` -> value."""
        text = (await self.http.get("/metrics")).text
        return {
            sample.name + _labels(sample.labels): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def requests_counted(self, tenant: str) -> int:
        rows = (await self.summary())["by_tenant"]
        return sum(row["requests"] for row in rows if row["tenant"] == tenant)


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


@contextlib.asynccontextmanager
async def running_analytics(kafka: KafkaSettings, log_path: Path) -> AsyncIterator[Analytics]:
    """`tokenbus analytics` in a child process, ready (joined) when yielded; stopped
    with SIGINT, as Ctrl-C does, and required to exit cleanly."""
    async with (
        analytics_process(kafka, log_path, ready_within=30, stop=signal.SIGINT) as child,
        httpx.AsyncClient(base_url=child.url, timeout=10) as http,
    ):
        yield Analytics(url=child.url, http=http)
    if child.killed:
        pytest.fail("analytics did not stop on SIGINT within 20 s")
    assert child.process.returncode == 0, child.log_tail()


@pytest.fixture
async def analytics(kafka: KafkaSettings, tmp_path: Path) -> AsyncIterator[Analytics]:
    async with running_analytics(kafka, tmp_path / "analytics.log") as running:
        yield running


@pytest.fixture
async def relay(kafka: KafkaSettings, smollm: LoadedModel) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(kafka, api_keys=KEYS) as (_, http), working(kafka, smollm):
        yield http


async def run_request(http: httpx.AsyncClient, key: str, max_tokens: int) -> Expected:
    """Submit, follow the SSE stream to its end, and compute the figures from it."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"messages": CHAT, "max_tokens": max_tokens, "temperature": 0}
    response = await http.post("/v1/requests", json=body, headers=headers)
    assert response.status_code == 202, response.text
    submission = response.json()
    events: list[StreamEvent] = []
    async with aconnect_sse(http, "GET", submission["events_url"], headers=headers) as source:
        async for message in source.aiter_sse():
            if message.data:
                events.append(decode_event(message.data.encode()))
    assert events and is_terminal(events[-1])
    return Expected.of(datetime.fromisoformat(submission["submitted_at"]), events)


@dataclass
class Expected:
    """One request's figures, computed here from its events (seconds)."""

    model: str
    finish_reason: str
    tokens: int
    queue_wait: float
    ttft_submission: float
    ttft_pickup: float
    gaps: list[float]
    tokens_per_s: float

    @classmethod
    def of(cls, submitted_at: datetime, events: list[StreamEvent]) -> Expected:
        started, finished = events[0], events[-1]
        assert isinstance(started, StartedEvent) and isinstance(finished, FinishedEvent)
        tokens = [e for e in events if isinstance(e, TokenEvent) and e.token_ids]
        count = sum(len(t.token_ids) for t in tokens)
        return cls(
            model=started.model,
            finish_reason=finished.finish_reason,
            tokens=count,
            queue_wait=(started.ts - submitted_at).total_seconds(),
            ttft_submission=(tokens[0].ts - submitted_at).total_seconds(),
            ttft_pickup=(tokens[0].ts - started.ts).total_seconds(),
            gaps=[(b.ts - a.ts).total_seconds() for a, b in pairwise(tokens)],
            tokens_per_s=count / (finished.ts - started.ts).total_seconds(),
        )


def merged(rows: list[dict[str, Any]], figure: str) -> tuple[int, float]:
    """(count, sum) of a figure over windows (a test may straddle a minute)."""
    count = sum(row[figure]["count"] for row in rows)
    total = sum(row[figure]["count"] * (row[figure]["mean"] or 0) for row in rows)
    return count, total


async def test_analytics_agree_with_the_events(
    relay: httpx.AsyncClient, analytics: Analytics
) -> None:
    acme = [await run_request(relay, "key-acme", n) for n in (5, 8)]
    globex = [await run_request(relay, "key-globex", 6)]

    async def counted() -> bool:
        return (await analytics.requests_counted("acme"), await analytics.requests_counted(
            "globex")) == (2, 1)  # fmt: skip

    await eventually(counted, within=30)
    summary = await analytics.summary()
    for tenant, expected in (("acme", acme), ("globex", globex)):
        rows = [row for row in summary["by_tenant"] if row["tenant"] == tenant]
        assert sum(row["completion_tokens"] for row in rows) == sum(e.tokens for e in expected)
        for figure, values in (
            ("queue_wait_s", [e.queue_wait for e in expected]),
            ("ttft_submission_s", [e.ttft_submission for e in expected]),
            ("ttft_pickup_s", [e.ttft_pickup for e in expected]),
            ("inter_token_s", [gap for e in expected for gap in e.gaps]),
            ("tokens_per_s", [e.tokens_per_s for e in expected]),
        ):
            count, total = merged(rows, figure)
            assert count == len(values), figure
            assert total == pytest.approx(sum(values), rel=1e-6, abs=1e-6), figure
        for row in rows:  # quantiles are never outside what was seen
            ttft = row["ttft_submission_s"]
            assert ttft["min"] <= ttft["p50"] <= ttft["p99"] <= ttft["max"]

    everyone = acme + globex
    model = everyone[0].model
    by_model = [row for row in summary["by_model"] if row["model"] == model]
    assert sum(row["requests"] for row in by_model) == 3
    assert sum(row["outcomes"].get("length", 0) for row in by_model) == sum(
        e.finish_reason == "length" for e in everyone
    )

    metrics = await analytics.metrics()
    first = f"model={model},since=submission}}"
    assert metrics["tokenbus_analytics_ttft_seconds_count{" + first] == 3
    assert metrics["tokenbus_analytics_ttft_seconds_sum{" + first] == pytest.approx(
        sum(e.ttft_submission for e in everyone), abs=1e-6
    )
    gaps = [gap for e in everyone for gap in e.gaps]
    assert metrics[f"tokenbus_analytics_inter_token_latency_seconds_count{{model={model}}}"] == len(
        gaps
    )
    assert metrics[f"tokenbus_analytics_tokens_total{{model={model}}}"] == sum(
        e.tokens for e in everyone
    )
    requests = sum(
        value for name, value in metrics.items()
        if name.startswith("tokenbus_analytics_requests_total{")
    )  # fmt: skip
    assert requests == 3


async def test_a_malformed_message_is_skipped_and_counted(
    kafka: KafkaSettings, relay: httpx.AsyncClient, analytics: Analytics
) -> None:
    producer = new_producer(kafka)
    await producer.start()
    try:
        key = message_key(uuid.uuid4())
        await producer.send_and_wait(kafka.topics.tokens, b"{not json", key=key)
        await producer.send_and_wait(kafka.topics.tokens, b'{"type": "token"}', key=key)
    finally:
        await producer.stop()
    await run_request(relay, "key-acme", 4)  # after the bad ones: still counted

    async def counted() -> bool:
        return await analytics.requests_counted("acme") == 1

    await eventually(counted, within=30)
    metrics = await analytics.metrics()
    topic = kafka.topics.tokens
    assert metrics[f"tokenbus_analytics_malformed_messages_total{{topic={topic}}}"] == 2


async def publish_request(
    kafka: KafkaSettings, tenant: str, ended_at: datetime, rid: uuid.UUID | None = None
) -> None:
    """A request and a whole stream of it, as a worker would publish them, ending at
    ``ended_at`` (2 tokens, 100 ms apart), with a stale worker's token in the middle."""
    rid = rid or uuid7()
    key = message_key(rid)
    start = ended_at - timedelta(seconds=1)
    base = {"request_id": rid, "worker": "w1", "attempt": 1}
    events: list[StreamEvent] = [
        StartedEvent(**base, seq=0, ts=start, model="m", model_revision="r",
                     prompt_tokens=1, queue_wait_ms=500),
        TokenEvent(**base, seq=1, ts=start + timedelta(seconds=0.5), text="a", token_ids=[1]),
        TokenEvent(request_id=rid, worker="w0", attempt=0, seq=2, text="stale",
                   ts=start + timedelta(seconds=0.55), token_ids=[7, 8, 9]),
        TokenEvent(**base, seq=2, ts=start + timedelta(seconds=0.6), text="b", token_ids=[2]),
        FinishedEvent(**base, seq=3, ts=ended_at, finish_reason=FinishReason.STOP,
                      usage=Usage(prompt_tokens=1, completion_tokens=2),
                      timings=Timings(ttft_ms=500, total_ms=1000)),
    ]  # fmt: skip
    request = GenerationRequest(
        request_id=rid, tenant=tenant, prompt="hi", submitted_at=start - timedelta(seconds=0.5)
    )
    producer = new_producer(kafka)
    await producer.start()
    try:
        await producer.send_and_wait(kafka.topics.requests, encode(request), key=key)
        for event in events:
            await producer.send_and_wait(kafka.topics.tokens, encode(event), key=key)
    finally:
        await producer.stop()


async def test_windows_tumble_by_the_minute_and_survive_a_restart(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    """Two requests ending in two different minutes land in two windows, held in Faust
    tables whose changelogs (on the embedded broker) bring them back after a restart,
    neither lost nor counted twice. A stale worker's events are not counted."""
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    # Both on one partition, so both windows' changelog records go to one changelog
    # partition, likely in one batch: the case the embedded broker's short answer to
    # ListOffsets (the last batch's first offset + 1) made Faust's recovery stop short of.
    first, second = _on_one_partition(kafka.partitions)
    await publish_request(kafka, "acme", minute - timedelta(seconds=30), first)
    await publish_request(kafka, "acme", minute + timedelta(seconds=5), second)
    log_path = tmp_path / "analytics.log"

    async def windows(analytics: Analytics) -> list[tuple[str, int]]:
        rows = (await analytics.summary())["by_tenant"]
        return [(row["window_start"], row["requests"]) for row in rows if row["tenant"] == "acme"]

    expected = [((minute - timedelta(minutes=1)).isoformat(), 1), (minute.isoformat(), 1)]
    for run in ("first", "after a restart"):
        async with running_analytics(kafka, log_path) as analytics:

            async def both_counted() -> bool:
                return await windows(analytics) == expected

            try:
                # A first start on a fresh cluster creates its changelog topics first.
                await eventually(both_counted, within=60)
            except TimeoutError:
                pytest.fail(f"{run}: windows {await windows(analytics)}, not {expected}")
            summary = await analytics.summary()
            row = summary["by_tenant"][0]
            assert row["ttft_submission_s"]["mean"] == pytest.approx(1.0)
            assert row["inter_token_s"]["mean"] == pytest.approx(0.1)
            assert row["completion_tokens"] == 2  # not the stale worker's 3
            if run == "first":
                fenced = (await analytics.metrics())["tokenbus_analytics_fenced_events_total{}"]
                assert fenced == 2
        if run == "after a restart":
            # Nothing was read again (offsets were committed): the windows came back
            # from the tables' changelogs.
            assert summary["first_event_after_s"] is None


def _on_one_partition(partitions: int) -> tuple[uuid.UUID, uuid.UUID]:
    first = uuid7()
    while True:
        second = uuid7()
        if partition_for(second, partitions) == partition_for(first, partitions):
            return first, second
