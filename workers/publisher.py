"""Publishing a request's events to ``tokenbus.tokens``.

`send()` only appends to the producer's batch (sent at once, or with the next
produce request if one is in flight), so a token never waits for a broker round
trip; the delivery futures are gathered when the terminal event is sent, and only
then is the request's offset committed.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer

from schemas import (
    ContentFilter,
    ErrorCode,
    FailedEvent,
    FinishedEvent,
    FinishReason,
    StartedEvent,
    Timings,
    TokenEvent,
    Usage,
    encode,
    message_key,
)

_PRUNE_AT = 256

_Event = TypeVar("_Event", StartedEvent, TokenEvent, FinishedEvent, FailedEvent)


class EventStream:
    """The events of one request, numbered 0, 1, 2 ... as they are published."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        request_id: uuid.UUID,
        worker: str,
        *,
        attempt: int = 0,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._key = message_key(request_id)
        self.request_id = request_id
        self.worker = worker
        self.attempt = attempt  # see schemas.fencing
        self.next_seq = 0
        self._deliveries: list[asyncio.Future[Any]] = []
        self.terminal: FinishedEvent | FailedEvent | None = None  # once the broker has it

    async def started(self, **fields: Any) -> None:
        await self._publish(StartedEvent, fields)

    async def token(self, text: str, token_ids: list[int], logprob: float | None) -> None:
        await self._publish(TokenEvent, {"text": text, "token_ids": token_ids, "logprob": logprob})

    async def finished(
        self,
        reason: FinishReason,
        usage: Usage,
        timings: Timings,
        *,
        content_filter: ContentFilter | None = None,
    ) -> None:
        fields = {"finish_reason": reason, "usage": usage, "timings": timings}
        if content_filter is not None:
            fields["content_filter"] = content_filter
        event = await self._publish(FinishedEvent, fields)
        await self.flush()
        self.terminal = event

    async def failed(self, code: ErrorCode, message: str) -> None:
        event = await self._publish(FailedEvent, {"code": code, "message": message})
        await self.flush()
        self.terminal = event

    async def flush(self) -> None:
        """Wait until the broker has every event sent so far (raises if it refused one)."""
        deliveries, self._deliveries = self._deliveries, []
        await asyncio.gather(*deliveries)

    async def _publish(self, kind: type[_Event], fields: dict[str, Any]) -> _Event:
        event = kind(
            request_id=self.request_id,
            seq=self.next_seq,
            ts=datetime.now(UTC),
            worker=self.worker,
            attempt=self.attempt,
            **fields,
        )
        delivery = await self._producer.send(self._topic, encode(event), key=self._key)
        self._deliveries.append(delivery)
        self.next_seq += 1
        if len(self._deliveries) >= _PRUNE_AT:
            done = [d for d in self._deliveries if d.done()]
            for d in done:
                d.result()  # surface a refused event now, not at the end
            self._deliveries = [d for d in self._deliveries if not d.done()]
        return event
