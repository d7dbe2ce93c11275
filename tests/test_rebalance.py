"""A member that joins the worker group takes its share of the partitions and no
more. Requests in flight on the partitions that stay go on generating through the
rebalance, under the attempt they began with: no claim, no re-prefill. Those on
the partitions that moved are stopped and continued by the partitions' next
owner. Every stream is whole either way."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from aiokafka import TopicPartition

from producers import TokenbusClient
from producers.submitter import Submitter
from schemas import (
    GenerationRequest,
    SamplingParams,
    StreamEvent,
    TokenEvent,
    is_terminal,
    uuid7,
)
from tokenbus.bus.kafka import new_consumer, partition_for
from tokenbus.bus.settings import KafkaSettings
from workers import LoadedModel
from workers.assignor import StickyAssignor

from .conftest import assert_complete, eventually, serving, text_of, working

pytestmark = pytest.mark.broker_behaviour

ESSAY = [
    {
        "role": "user",
        "content": "Write a long essay about the history of the Roman Empire, with many details.",
    }
]
MAX_TOKENS = 400  # SmolLM2 writes all 400 (greedy): in flight through both rebalances


def request_on(partition: int, kafka: KafkaSettings) -> GenerationRequest:
    """A request whose id puts it on ``partition``."""
    while True:
        request_id = uuid7()
        if partition_for(request_id, kafka.partitions) == partition:
            return GenerationRequest(
                request_id=request_id,
                messages=ESSAY,
                sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                submitted_at=datetime.now(UTC),
            )


async def test_requests_on_partitions_that_stay_go_on_through_a_rebalance(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    assert kafka.partitions == 4
    requests = [request_on(p, kafka) for p in range(4) for _ in range(2)]
    tp = {
        r.request_id: TopicPartition(kafka.topics.requests, partition_for(r.request_id, 4))
        for r in requests
    }
    streams: dict[uuid.UUID, list[StreamEvent]] = {r.request_id: [] for r in requests}

    async with (
        serving(kafka) as (url, _),
        working(kafka, smollm) as worker,
        TokenbusClient(url) as client,
    ):

        async def follow(request: GenerationRequest) -> None:
            async for event in client.stream(request.request_id):
                streams[request.request_id].append(event)

        submitter = Submitter(kafka)
        try:
            for request in requests:
                await submitter.submit(request)
        finally:
            await submitter.close()
        async with asyncio.TaskGroup() as following:
            for request in requests:
                following.create_task(follow(request))
            await eventually(
                lambda: all(any(isinstance(e, TokenEvent) for e in s) for s in streams.values()),
                within=60,
            )
            # A second member joins the group: it takes its share and serves nothing.
            newcomer = new_consumer(
                kafka,
                group_id=f"{kafka.topic_prefix}workers",
                session_timeout_ms=6000,
                heartbeat_interval_ms=500,
                partition_assignment_strategy=(StickyAssignor(set),),
            )
            newcomer.subscribe([kafka.topics.requests])
            await newcomer.start()
            try:

                def settled() -> bool:  # the worker knows it gave up what the newcomer has
                    taken = newcomer.assignment()
                    return bool(taken) and not taken & worker.partitions

                await eventually(settled, within=60)
                moved = newcomer.assignment()
                kept = worker.partitions
                running = {rid for rid, s in streams.items() if not is_terminal(s[-1])}
            finally:
                await newcomer.stop()  # it leaves: the worker gets its partitions back
            await eventually(lambda: len(worker.partitions) == kafka.partitions, within=60)

    assert len(moved) == len(kept) == kafka.partitions // 2  # its share, no more
    through = [rid for rid in running if tp[rid] in kept]
    taken_over = [rid for rid in running if tp[rid] in moved]
    assert through and taken_over, "the requests ended before the rebalance: make them longer"
    for events in streams.values():
        assert_complete(events)
        assert text_of(events) == smollm.tokenizer.decode(
            [i for e in events if isinstance(e, TokenEvent) for i in e.token_ids],
            skip_special_tokens=True,
        )
    for rid in through:  # went on under the attempt it began with
        assert len({e.attempt for e in streams[rid]}) == 1, rid
    for rid in taken_over:  # stopped when its partition moved, then claimed again
        assert len({e.attempt for e in streams[rid]}) == 2, rid
    # The same greedy request eight times: the same tokens, interrupted or not.
    token_ids = {
        tuple(i for e in events if isinstance(e, TokenEvent) for i in e.token_ids)
        for events in streams.values()
    }
    assert len(token_ids) == 1 and len(next(iter(token_ids))) == MAX_TOKENS
