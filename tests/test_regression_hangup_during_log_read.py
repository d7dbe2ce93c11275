"""Regression: a subscriber that hung up just as the relay began reading its stream
from the log leaked that read's Kafka connection. sse-starlette cancels a response
through an anyio cancel scope; cancelled halfway through `start()`, an aiokafka
consumer keeps a connection that `stop()` never closes. Found by CI as an unclosed
AIOKafkaConnection after test_concurrent_stream_limit_answers_429. The relay's own
SSE response now cancels the subscriber's task natively (`Task.cancel`), which an
anyio shield does not hold off: both kinds are tested."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import anyio

from tokenbus.bus.log import LogReader
from tokenbus.bus.settings import KafkaSettings

from .test_fanout import submit_only


async def test_log_reads_cancelled_at_any_point_close_their_connection(
    kafka: KafkaSettings,
) -> None:
    request = await submit_only(kafka)
    reader = LogReader(kafka=kafka)
    # Deadlines from 0 to 20 ms: some land while the read's consumer is starting,
    # as a hang-up does.
    for step in range(40):
        with anyio.move_on_after(step * 0.0005):
            async for _ in reader.events(request.request_id, from_seq=0, before_seq=10):
                pass
    gc.collect()  # a leaked connection warns when collected, and warnings are errors


async def test_log_reads_whose_task_is_cancelled_at_any_point_close_their_connection(
    kafka: KafkaSettings,
) -> None:
    request = await submit_only(kafka)
    reader = LogReader(kafka=kafka)

    async def read() -> None:
        async for _ in reader.events(request.request_id, from_seq=0, before_seq=10):
            pass

    for step in range(40):
        task = asyncio.create_task(read())
        done, _ = await asyncio.wait({task}, timeout=step * 0.0005)
        if not done:
            task.cancel()  # as SseResponse does when the client hangs up
        with contextlib.suppress(asyncio.CancelledError):
            await task
    gc.collect()
