"""Another tenant's request id and an id never submitted take the same path: both
answer 404 only after reading the log to its end, so the time a 404 takes does not
say whether the id exists (a remembered request used to answer from memory, in a
quarter of the time)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from schemas import GenerationRequest, encode, message_key, uuid7
from tokenbus.bus.kafka import new_producer
from tokenbus.bus.log import LogReader, Submitted
from tokenbus.bus.settings import KafkaSettings, ServerSettings
from tokenbus.edge.access import Access, Caller
from tokenbus.edge.directory import RequestDirectory
from tokenbus.edge.errors import ApiError

KEYS = {"key-acme": "acme", "key-globex": "globex"}
ACME, GLOBEX = Caller("acme", "127.0.0.1"), Caller("globex", "127.0.0.1")


class WatchedLog(LogReader):
    """The real log reader, noting each search and whether it ended before the end
    of the log."""

    def __init__(self, kafka: KafkaSettings) -> None:
        super().__init__(kafka=kafka)
        self.searches: list[tuple[uuid.UUID, str]] = []

    async def find_request(
        self, request_id: uuid.UUID, *, stop: Callable[[Submitted], bool] = lambda _: True
    ) -> Submitted | None:
        ended_early = False

        def watched(found: Submitted) -> bool:
            nonlocal ended_early
            ended_early = stop(found)
            return ended_early

        found = await super().find_request(request_id, stop=watched)
        self.searches.append((request_id, "found early" if ended_early else "to the end"))
        return found


async def submitted_by(kafka: KafkaSettings, tenant: str) -> GenerationRequest:
    request = GenerationRequest(
        request_id=uuid7(), tenant=tenant, prompt="p", submitted_at=datetime.now(UTC)
    )
    producer = new_producer(kafka)
    await producer.start()
    try:
        key = message_key(request.request_id)
        await producer.send_and_wait(kafka.topics.requests, encode(request), key=key)
    finally:
        await producer.stop()
    return request


async def not_found(directory: RequestDirectory, request_id: uuid.UUID, caller: Caller) -> None:
    with pytest.raises(ApiError) as refused:
        await directory.owned(request_id, caller)
    assert refused.value.status == 404 and refused.value.code == "unknown_request"


async def test_a_foreign_id_and_a_missing_one_take_the_same_path(kafka: KafkaSettings) -> None:
    access = Access(ServerSettings(api_keys=KEYS))
    acme = await submitted_by(kafka, "acme")
    await submitted_by(kafka, "acme")  # more log after it, for a read to the end to cross
    never = uuid7()

    # The relay that accepted it remembers it: globex still waits for the log.
    log = WatchedLog(kafka)
    directory = RequestDirectory(log, access)
    directory.remember(acme)
    await not_found(directory, acme.request_id, GLOBEX)
    assert log.searches == [(acme.request_id, "to the end")]  # not answered from memory
    await not_found(directory, never, GLOBEX)
    assert log.searches == [(acme.request_id, "to the end"), (never, "to the end")]

    # A relay that never saw it: one search each, to the end, for whoever may not read it.
    log = WatchedLog(kafka)
    directory = RequestDirectory(log, access)
    await not_found(directory, acme.request_id, GLOBEX)
    await not_found(directory, acme.request_id, GLOBEX)  # remembered now: the same again
    await not_found(directory, never, GLOBEX)
    assert log.searches == [
        (acme.request_id, "to the end"), (acme.request_id, "to the end"), (never, "to the end"),
    ]  # fmt: skip

    # Its owner is served from memory, or from a search that ends once found.
    log = WatchedLog(kafka)
    directory = RequestDirectory(log, access)
    assert (await directory.owned(acme.request_id, ACME)).tenant == "acme"
    assert (await directory.owned(acme.request_id, ACME)).tenant == "acme"
    assert log.searches == [(acme.request_id, "found early")]
