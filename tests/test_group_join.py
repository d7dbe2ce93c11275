"""Workers join their group in one rebalance each.

aiokafka 0.14 sends one JoinGroup per assignor a consumer offers, each with the
protocols listed so far (the send sits inside its loop over assignors;
aio-libs/aiokafka#1168). With two assignors every join was two joins, the second
with changed metadata, which restarts the rebalance: on Apache Kafka two workers
starting together could keep failing each other's SyncGroup for minutes (a
generation past 2,500 in the benchmarks). Workers now offer one assignor.
"""

from __future__ import annotations

import pytest

from tokenbus.bus.settings import KafkaSettings
from workers import LoadedModel, Worker

from .conftest import eventually, working

pytestmark = pytest.mark.broker_behaviour


def generation(worker: Worker) -> int:
    consumer = worker._consumer
    assert consumer is not None
    return int(consumer._coordinator.generation)


async def test_two_workers_join_their_group_in_one_rebalance_each(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    async with working(kafka, smollm, "worker-a") as first:
        alone = generation(first)  # Kafka counts from 1, Tansu from 0
        async with working(kafka, smollm, "worker-b") as second:

            def settled() -> bool:
                held = first.partitions | second.partitions
                together = generation(first) == generation(second)
                return len(held) == kafka.partitions and together

            await eventually(settled, within=60)
            # One rebalance for the second worker's join, not two or more.
            assert generation(second) == alone + 1
