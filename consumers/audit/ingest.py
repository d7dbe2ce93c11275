"""Turning fetched Kafka records into a store `Batch`: decode, fence, chain.

Verdicts (``tokenbus.verdicts``) are chained per request in log order, every one
the log holds: which of them count is the readers' fencing rule
(`schemas.VerdictView`), applied when they are shown, not a reason to leave one out
of the record. A verdict read twice (the same bytes: a producer's retry, or the
log read again) is stored once.

Pure and synchronous (the consumer runs it in a thread next to the store write),
so tests and the benchmark drive it without a broker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from schemas import (
    FailedEvent,
    FinishedEvent,
    GenerationRequest,
    MalformedMessage,
    StartedEvent,
    StreamView,
    TokenEvent,
    Topics,
    Verdict,
    decode_event,
    decode_request,
    decode_verdict,
)

from .chain import NO_REQUEST, event_hash, request_digest, verdict_hash
from .records import Batch, EventRecord, RequestRecord, StreamState, VerdictChain, VerdictRecord

log = logging.getLogger(__name__)

Event = StartedEvent | TokenEvent | FinishedEvent | FailedEvent
_GAP_REPORTS_KEPT = 10_000


class Record(Protocol):
    """What the ingest needs of a Kafka record (aiokafka's `ConsumerRecord` has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(slots=True)
class AuditStats:
    """Counts since start (Prometheus reads them through `consumers.audit.metrics`)."""

    requests: int = 0
    events: int = 0
    fenced: int = 0  # events of a lower attempt than one already seen: a stale worker's
    duplicates: int = 0  # events whose seq was already accepted; repeated requests
    gaps: int = 0  # events past the next seq (never in a log the workers wrote)
    malformed: Counter[str] = field(default_factory=Counter)  # by topic
    checkpoints: int = 0
    verdicts: int = 0
    verdict_duplicates: int = 0  # the same verdict read again


Lookup = Callable[[Collection[uuid.UUID]], Mapping[uuid.UUID, StreamState]]


class StreamStates:
    """The fencing state and chain head of recently seen requests, in front of the
    store (an LRU: a stream's events are close together in the log)."""

    def __init__(self, *, load: Lookup, capacity: int = 100_000) -> None:
        self._load = load
        self._capacity = capacity
        self._cache: OrderedDict[uuid.UUID, StreamState] = OrderedDict()

    def get_many(self, request_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, StreamState]:
        wanted = set(request_ids)
        missing = wanted - self._cache.keys()
        loaded = dict(self._load(missing)) if missing else {}
        found: dict[uuid.UUID, StreamState] = {}
        for request_id in wanted:
            state = self._cache.get(request_id) or loaded.get(request_id)
            found[request_id] = state if state is not None else StreamState(request_id)
        return found

    def update(self, states: Iterable[StreamState]) -> None:
        """Take in the states a committed batch wrote."""
        for state in states:
            self._cache[state.request_id] = state
            self._cache.move_to_end(state.request_id)
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)


class VerdictSource(Protocol):
    def verdict_chains(
        self, request_ids: Collection[uuid.UUID]
    ) -> Mapping[uuid.UUID, VerdictChain]: ...
    def verdict_digests(
        self, request_ids: Collection[uuid.UUID]
    ) -> set[tuple[uuid.UUID, bytes]]: ...


class VerdictChains:
    """The verdict chains of recently seen requests and the digests of their verdicts,
    in front of the store (an LRU, as `StreamStates`)."""

    def __init__(
        self,
        *,
        load: Callable[[Collection[uuid.UUID]], Mapping[uuid.UUID, VerdictChain]],
        load_digests: Callable[[Collection[uuid.UUID]], set[tuple[uuid.UUID, bytes]]],
        capacity: int = 100_000,
    ) -> None:
        self._load = load
        self._load_digests = load_digests  # VerdictChains.of(store) passes the store's
        self._capacity = capacity
        self._cache: OrderedDict[uuid.UUID, tuple[VerdictChain, frozenset[bytes]]] = OrderedDict()

    @classmethod
    def of(cls, store: VerdictSource, capacity: int = 100_000) -> VerdictChains:
        return cls(load=store.verdict_chains, load_digests=store.verdict_digests,
                   capacity=capacity)  # fmt: skip

    def get_many(
        self, request_ids: Iterable[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[VerdictChain, frozenset[bytes]]]:
        wanted = set(request_ids)
        missing = wanted - self._cache.keys()
        chains = dict(self._load(missing)) if missing else {}
        digests: dict[uuid.UUID, set[bytes]] = {}
        for rid, digest in self._load_digests(missing) if missing else ():
            digests.setdefault(rid, set()).add(digest)
        found = {}
        for rid in wanted:
            cached = self._cache.get(rid)
            if cached is None:
                chain = chains.get(rid) or VerdictChain(rid)
                cached = (chain, frozenset(digests.get(rid, ())))
            found[rid] = cached
        return found

    def update(self, chains: Iterable[tuple[VerdictChain, frozenset[bytes]]]) -> None:
        for chain, digests in chains:
            self._cache[chain.request_id] = (chain, digests)
            self._cache.move_to_end(chain.request_id)
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)


class Ingest:
    def __init__(
        self,
        *,
        topics: Topics,
        states: StreamStates,
        stats: AuditStats,
        verdicts: VerdictChains,
        cluster: str = "",
    ) -> None:
        self._topics = topics
        self._verdicts = verdicts
        self._verdict_digests: dict[uuid.UUID, frozenset[bytes]] = {}
        self._cluster = cluster
        self._gap_reported: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._states = states
        self.stats = stats

    def build(self, records: Iterable[Record]) -> Batch:
        """The batch these records (in log order per partition) add to the store.

        Nothing is changed until `committed()` is called with the batch, so a failed
        write leaves the cached states as the store has them."""
        batch = Batch(cluster=self._cluster)
        decoded: list[tuple[Record, GenerationRequest | Event]] = []
        verdicts: list[tuple[Record, Verdict]] = []
        for record in records:
            batch.positions[(record.topic, record.partition)] = record.offset + 1
            message = self._decode(record)
            if isinstance(message, Verdict):
                verdicts.append((record, message))
            elif message is not None:
                decoded.append((record, message))
        if verdicts:
            self._chain_verdicts(batch, verdicts)
        before = self._states.get_many({message.request_id for _, message in decoded})
        for record, message in decoded:
            state = batch.streams.get(message.request_id)
            if state is None:
                state = dataclasses.replace(before[message.request_id])
            if isinstance(message, GenerationRequest):
                self._request(batch, record, state)
            else:
                self._event(batch, record, message, state)
        return batch

    def committed(self, batch: Batch) -> None:
        self._states.update(batch.streams.values())
        self._verdicts.update(
            (chain, self._verdict_digests.pop(rid)) for rid, chain in batch.verdict_chains.items()
        )
        self._verdict_digests.clear()
        self.stats.requests += len(batch.requests)
        self.stats.events += len(batch.events)
        self.stats.verdicts += len(batch.verdicts)

    def _chain_verdicts(self, batch: Batch, verdicts: list[tuple[Record, Verdict]]) -> None:
        self._verdict_digests.clear()
        before = self._verdicts.get_many({verdict.request_id for _, verdict in verdicts})
        for record, verdict in verdicts:
            rid = verdict.request_id
            chain = batch.verdict_chains.get(rid)
            if chain is None:
                chain = dataclasses.replace(before[rid][0])
                self._verdict_digests[rid] = before[rid][1]
            value = record.value or b""
            digest = hashlib.sha256(value).digest()
            if digest in self._verdict_digests[rid]:
                self.stats.verdict_duplicates += 1
                continue
            self._verdict_digests[rid] |= {digest}
            chain.head = verdict_hash(chain.head, rid, chain.count, value)
            batch.verdicts.append(
                VerdictRecord(rid, chain.count, value, chain.head, digest, record.partition,
                              record.offset)
            )  # fmt: skip
            chain.count += 1
            batch.verdict_chains[rid] = chain

    def _decode(self, record: Record) -> GenerationRequest | Event | Verdict | None:
        try:
            if record.topic == self._topics.requests:
                return decode_request(record.value)
            if record.topic == self._topics.verdicts:
                return decode_verdict(record.value)
            return decode_event(record.value)
        except MalformedMessage as exc:
            self.stats.malformed[record.topic] += 1
            log.warning(
                "skipping a malformed message at %s[%d] offset %d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            return None

    def _request(self, batch: Batch, record: Record, state: StreamState) -> None:
        if state.request_digest != NO_REQUEST:
            self.stats.duplicates += 1  # the first message under an id is the request
            return
        value = record.value or b""
        rid = state.request_id
        state.request_digest = request_digest(rid, value)
        batch.streams[rid] = state
        batch.requests.append(
            RequestRecord(rid, value, state.request_digest, record.partition, record.offset)
        )

    def _event(self, batch: Batch, record: Record, event: Event, state: StreamState) -> None:
        # The readers' one rule (schemas.fencing), fed this stream's persisted state.
        view = StreamView(state.next_seq)
        view.attempt = state.attempt
        accepted = view.accept(event)
        if view.attempt != state.attempt:
            state.attempt = view.attempt
            batch.streams[state.request_id] = state
        if not accepted:
            if event.attempt < state.attempt:
                self.stats.fenced += 1
            elif event.seq < state.next_seq:
                self.stats.duplicates += 1
            else:
                self.stats.gaps += 1
                if state.request_id not in self._gap_reported:  # once, not once an event
                    self._gap_reported[state.request_id] = None
                    if len(self._gap_reported) > _GAP_REPORTS_KEPT:
                        self._gap_reported.popitem(last=False)
                    log.warning(
                        "request %s: seq %d at %s[%d] offset %d, expected seq %d; its later "
                        "events are not stored (counted as gaps)",
                        state.request_id, event.seq, record.topic, record.partition,
                        record.offset, state.next_seq,
                    )  # fmt: skip
            return
        value = record.value or b""
        state.head = event_hash(state.head, state.request_id, event.seq, value)
        state.next_seq = view.next_seq
        batch.streams[state.request_id] = state
        batch.events.append(
            EventRecord(
                state.request_id, event.seq, event.attempt, event.type, value, state.head,
                record.partition, record.offset,
            )
        )  # fmt: skip
