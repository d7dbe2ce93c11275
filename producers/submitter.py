"""Putting requests on ``tokenbus.requests``, acknowledged by the broker."""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas import Cancel, GenerationRequest, encode, message_key
from tokenbus.bus.kafka import start_producer, stop_all
from tokenbus.bus.settings import KafkaSettings

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """The broker did not acknowledge the message: not accepted. Retry later. Where
    it was sent and the acknowledgement did not come in time, the message may still
    be written (its reason says so, and names the request)."""


_READY_TIMEOUT_S = 2.0


class Submitter:
    """Owns the API's producer. It connects lazily and reconnects after a failure,
    so the API starts (and says it is not ready) even while the broker is away."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()

    async def submit(self, request: GenerationRequest) -> None:
        """Return once the broker has acknowledged the request (acks=all)."""
        await self._send(
            self._kafka.topics.requests, request.request_id, encode(request), "request"
        )

    async def cancel(self, cancel: Cancel) -> None:
        await self._send(
            self._kafka.topics.control, cancel.request_id, encode(cancel), "the cancel of"
        )

    async def ready(self) -> bool:
        """Whether a broker answers now: a metadata round trip, not only a producer
        that once connected (it stays "connected" through an outage)."""
        try:
            producer = await self._connected()
            async with asyncio.timeout(_READY_TIMEOUT_S):
                await producer.client.fetch_all_metadata()
        except (BrokerUnavailable, KafkaError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        if self._producer is not None:
            await stop_all(self._producer)
            self._producer = None
        await asyncio.gather(*self._stopping)

    def _discard(self, producer: AIOKafkaProducer) -> None:
        """Start afresh next time. The failed producer stops in the background: its
        stop waits for what it has in flight, up to `stop_all`'s bound when the broker
        does not answer, and the caller's 503 should not wait for that. (Once only:
        sends that failed together each discard it, and a newer one is kept.)"""
        if self._producer is producer:
            self._producer = None
            stopping = asyncio.create_task(stop_all(producer))
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)

    async def _send(self, topic: str, request_id: uuid.UUID, value: bytes, what: str) -> None:
        producer = await self._connected()
        timeout_s = self._kafka.request_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout_s):
                await producer.send_and_wait(topic, value, key=message_key(request_id))
        except (KafkaError, TimeoutError) as exc:
            self._discard(producer)
            # Sent, but not acknowledged: the broker may have it all the same (or
            # get it from a retry still in flight), so the id is named for the
            # client to look it up; a second submission would be a second request.
            raise BrokerUnavailable(
                f"the broker at {self._kafka.bootstrap} did not acknowledge {what} {request_id} "
                f"within {timeout_s:g}s ({type(exc).__name__}): not accepted, retry later. "
                "It may be written all the same: the request's events show whether it was"
            ) from exc

    async def _connected(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                try:
                    producer = await start_producer(self._kafka)
                except KafkaError as exc:
                    raise BrokerUnavailable(
                        f"cannot reach the broker at {self._kafka.bootstrap} "
                        f"({type(exc).__name__}); is it running? (`tokenbus up` starts one)"
                    ) from exc
                self._producer = producer
            return self._producer
