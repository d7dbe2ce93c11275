"""The Kafka side of a model worker.

Two tasks share one consumer in the ``tokenbus-workers`` group:

    cancels      every Cancel on tokenbus.control (see control.py)
    verdicts     every guard verdict on tokenbus.verdicts (tokenbus.bus.verdicts):
                 a moderated stream the guard flags stops within a decode step
                 and ends `finished` with finish_reason content_filter
    fetch loop   getmany() on tokenbus.requests -> decode -> bounded queue
                 (partitions paused while the queue is full, so polling never
                 stops and a long generation never triggers a rebalance)
    serve loop   queue -> one task per request, up to max_batch at once ->
                 engine (continuous batching) -> EventStream -> tokenbus.tokens,
                 then commit up to the lowest unfinished offset

A rebalance stops only the requests whose partitions move to another member
(membership.py and ownership.py; the group's assignor keeps partitions where they
are, see assignor.py); the others generate on through it. A request that an earlier
try began (of a worker that died or froze, or a crash here) is taken over where its
stream stands (takeover.py).

A request that cannot be served (malformed, unknown model, prompt too long, a
crash while generating) ends in a `failed` event; the worker goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord

from schemas import (
    ContentFilter,
    ErrorCode,
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    MalformedMessage,
    ModerationMode,
    Timings,
    Usage,
    decode_request,
    encode,
    is_terminal,
    message_key,
)
from schemas.requests import ANY_MODEL
from tokenbus.bus.kafka import start_producer, stop_all
from tokenbus.bus.log import LogReader
from tokenbus.bus.settings import KafkaSettings, WorkerSettings
from tokenbus.bus.verdicts import VerdictTail

from .control import CancelWatcher
from .engine import GenerationEngine, PromptError
from .membership import group_consumer
from .metrics import UNKNOWN_MODEL, RequestMetrics
from .models import LoadedModel
from .offsets import OffsetTracker
from .ownership import Ownership
from .publisher import EventStream
from .takeover import Published, Takeover, steps_after

log = logging.getLogger(__name__)


class GenerationCrashed(Exception):
    """Generating a request raised; it is tried again under a new attempt, up to
    ``max_attempts`` attempts in all (counted in the log)."""


@dataclass(frozen=True, slots=True)
class Job:
    request: GenerationRequest
    tp: TopicPartition
    term: int  # of this worker's ownership of tp (ownership.py)
    offset: int


class Worker:
    def __init__(
        self, *, kafka: KafkaSettings, settings: WorkerSettings, model: LoadedModel
    ) -> None:
        self._kafka = kafka
        self._settings = settings
        self._model = model
        self._engine = GenerationEngine(
            model,
            max_batch=settings.max_batch,
            max_batch_tokens=settings.max_batch_tokens,
            prefill_chunk=settings.prefill_chunk,
        )
        self._names = {model.name, ANY_MODEL}
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._offsets = OffsetTracker()
        self._cancels = CancelWatcher(kafka)
        # Verdicts rather than a Cancel from the guard: the verdict is the audited
        # record of why a stream was cut, one message that cannot disagree with a
        # second one, and the fencing of a stale guard applies to it (VerdictView).
        self._verdicts = VerdictTail(kafka)
        self._takeover = Takeover(LogReader(kafka=kafka))
        self._ownership = Ownership()
        self.ready = asyncio.Event()  # set once the consumer has its partitions
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.metrics = RequestMetrics()  # served by `tokenbus worker` with the engine's

    @property
    def worker_id(self) -> str:
        return self._settings.worker_id

    @property
    def engine(self) -> GenerationEngine:
        return self._engine

    @property
    def partitions(self) -> set[TopicPartition]:
        """The partitions of tokenbus.requests this worker holds (in a rebalance:
        those it held when the rebalance began, until it learns its new assignment)."""
        return self._ownership.partitions

    async def run(self) -> None:
        """Serve until cancelled."""
        topics = self._kafka.topics
        # The producer starts inside the try that stops the consumer: a consumer made
        # and dropped unstopped (the producer's start failing) warns when collected.
        self._consumer = group_consumer(self._kafka, self._settings, self._ownership, self._offsets)
        self._producer = None
        try:
            self._producer = await start_producer(self._kafka)
            await self._consumer.start()
            log.info(
                "worker %s serving %s on %s", self.worker_id, self._model.name, topics.requests
            )
            async with self._engine, asyncio.TaskGroup() as tasks:
                tasks.create_task(self._cancels.run())
                tasks.create_task(self._verdicts.run())
                tasks.create_task(self._fetch_loop(self._consumer))
                tasks.create_task(self._serve_loop(self._consumer, self._producer))
        finally:
            await stop_all(self._consumer, self._producer)

    # -- fetching ---------------------------------------------------------------

    async def _fetch_loop(self, consumer: AIOKafkaConsumer) -> None:
        capacity = self._settings.max_queued
        while True:
            room = capacity - self._queue.qsize()
            assigned = consumer.assignment()
            if room <= 0:
                consumer.pause(*assigned)
            else:
                consumer.resume(*assigned)
            batches = await consumer.getmany(timeout_ms=200, max_records=max(room, 1))
            if assigned and self._cancels.caught_up.is_set() and self._verdicts.caught_up.is_set():
                self.ready.set()
            for tp, records in batches.items():
                for record in records:
                    await self._accept(tp, record)
            await self.metrics.lag.measure(consumer, self._offsets.committable)

    async def _accept(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        term = self._ownership.term(tp)
        if term is None or self._offsets.seen(tp, record.offset):
            # Fetched again after a rebalance that left tp here: in flight, or done
            # and committed by the next commit of tp.
            return
        self._offsets.received(tp, record.offset)
        try:
            request = decode_request(record.value)
        except MalformedMessage as exc:
            await self._reject(tp, term, record, exc)
            return
        self._queue.put_nowait(Job(request, tp, term, record.offset))

    async def _reject(
        self,
        tp: TopicPartition,
        term: int,
        record: ConsumerRecord[bytes, bytes],
        error: MalformedMessage,
    ) -> None:
        """A message that is not a valid request: answer on its stream if its key names
        one; either way copy it to the dead-letter topic, report it, and move on."""
        log.warning("skipping malformed request at %s@%d: %s", tp, record.offset, error)
        request_id = _request_id_from_key(record.key)
        if request_id is not None:
            assert self._producer is not None
            stream = EventStream(
                self._producer, self._kafka.topics.tokens, request_id, self.worker_id
            )
            await stream.failed(ErrorCode.INVALID_REQUEST, str(error))
        await self._dead_letter(record.key, record.value, str(error), f"{tp}@{record.offset}")
        await self._commit(tp, term, record.offset)

    async def _dead_letter(
        self, key: bytes | None, value: bytes | None, reason: str, source: str
    ) -> None:
        assert self._producer is not None
        headers = [("tokenbus-reason", reason.encode()), ("tokenbus-source", source.encode())]
        await self._producer.send_and_wait(
            self._kafka.topics.dead_letter, value, key=key, headers=headers
        )

    # -- serving ----------------------------------------------------------------

    async def _serve_loop(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        await self._cancels.caught_up.wait()  # know every earlier cancel before serving
        await self._verdicts.caught_up.wait()  # and every verdict (a flagged stream taken over)
        # As many requests in flight as the engine batches; the fetch loop keeps
        # max_queued more ready, so a finished one is replaced without a fetch.
        slots = asyncio.Semaphore(self._settings.max_batch)
        async with asyncio.TaskGroup() as tasks:
            while True:
                await slots.acquire()
                job = await self._queue.get()
                await self._ownership.settled.wait()  # whose it is may be changing
                if not self._owned(job):
                    slots.release()
                    continue  # its partition moved to another worker, which will serve it
                served = tasks.create_task(self._serve_job(job, producer))
                served.add_done_callback(lambda _: slots.release())

    async def _serve_job(self, job: Job, producer: AIOKafkaProducer) -> None:
        while self._owned(job):  # ends: every try is an attempt in the log, and they are limited
            stream = self._stream(producer, job)
            try:
                await self._serve(job, stream)
                self._observe_latency(job.request, stream)
                break
            except GenerationCrashed:
                log.exception("generation of %s crashed; trying again under a new attempt",
                              job.request.request_id)  # fmt: skip
        await self._commit(job.tp, job.term, job.offset)

    def _observe_latency(self, request: GenerationRequest, stream: EventStream) -> None:
        """End to end, if this attempt published the terminal event (see RequestMetrics)."""
        end = stream.terminal
        if end is None:
            return
        model = self._model.name if request.model in self._names else UNKNOWN_MODEL
        outcome = end.finish_reason.value if isinstance(end, FinishedEvent) else "failed"
        seconds = (end.ts - request.submitted_at).total_seconds()
        self.metrics.latency.labels(model, outcome).observe(max(seconds, 0.0))

    def _owned(self, job: Job) -> bool:
        """Whether ``job``'s partition is still this worker's, in the term it came in."""
        return self._ownership.holds(job.tp, job.term)

    def _stream(self, producer: AIOKafkaProducer, job: Job) -> EventStream:
        return EventStream(
            producer,
            self._kafka.topics.tokens,
            job.request.request_id,
            self.worker_id,
            attempt=self._takeover.attempt(),
        )

    async def _serve(self, job: Job, stream: EventStream) -> None:
        request = job.request
        picked_up = time.perf_counter()
        # Another worker may have served this request before it died or froze (its
        # offset was not committed): what the log holds decides where to go on from.
        earlier = await self._takeover.published(request.request_id)
        if earlier.finished:
            return  # an earlier attempt finished it; only the commit was missing
        stream.next_seq = len(earlier.events)
        attempts = earlier.attempts
        if attempts >= self._settings.max_attempts:
            # A poison pill: it crashed every worker that tried it (an exception, or
            # the worker itself). Stop, and keep it for a person to look at.
            message = f"gave up after {attempts} attempts at generating it; see the workers' logs"
            await stream.failed(ErrorCode.INTERNAL_ERROR, message)
            await self._dead_letter(
                message_key(request.request_id), encode(request), message, f"{job.tp}@{job.offset}"
            )
            return
        if not earlier.events and await self._answered_without_generating(request, stream):
            return
        try:
            prompt_ids = self._engine.prompt_ids(request)
        except PromptError as exc:
            code = ErrorCode.PROMPT_TOO_LONG if exc.too_long else ErrorCode.INVALID_REQUEST
            await stream.failed(code, str(exc))
            return
        try:
            claimed = await self._takeover.claim(
                stream,
                earlier,
                model=self._model.name,
                model_revision=self._model.revision,
                prompt_tokens=len(prompt_ids),
                queue_wait_ms=max(_ms_since(request.submitted_at), 0.0),
                tenant=request.tenant,
                moderation=request.moderation or ModerationMode.OFF,
            )
            if is_terminal(claimed.events[-1]):
                return
            if earlier.events:
                log.info("continuing %s after seq %d", request.request_id, claimed.events[-1].seq)
            revoked = lambda: not self._owned(job)  # noqa: E731
            await self._generate(request, prompt_ids, stream, picked_up, claimed, revoked)
        except KafkaError:
            raise  # the broker is the problem, not the request: let the worker fail
        except Exception as exc:
            raise GenerationCrashed(request.request_id) from exc

    async def _answered_without_generating(
        self, request: GenerationRequest, stream: EventStream
    ) -> bool:
        """Answer a request that is not to be generated at all; False if it is to be."""
        if request.model not in self._names:
            await stream.failed(
                ErrorCode.UNKNOWN_MODEL,
                f"this worker group serves {self._model.name!r}, not {request.model!r}",
            )
        elif self._cancels.cancelled(request.request_id):
            await _finish_unstarted(stream, FinishReason.CANCELLED)
        elif request.expired(datetime.now(UTC)):
            await _finish_unstarted(stream, FinishReason.EXPIRED)
        else:
            return False
        return True

    async def _generate(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        stream: EventStream,
        picked_up: float,
        claimed: Published,
        revoked: Callable[[], bool],
    ) -> None:
        rid = request.request_id

        def flagged() -> ContentFilter | None:
            return self._flagged(request)

        def should_stop() -> bool:
            return self._cancels.cancelled(rid) is not None or flagged() is not None

        steps = steps_after(claimed, self._engine, request, prompt_ids, should_stop)
        ttft_ms: float | None = None  # this attempt's; unknown when it took over mid-stream
        completion = len(claimed.token_ids)
        async with contextlib.aclosing(steps):  # leaving early frees its batch slot at once
            async for step in steps:
                if revoked():
                    # Our partition moved on (to a member that joined, or because we
                    # froze past the session timeout): the new owner continues this
                    # stream. Publish nothing more.
                    log.warning("stopping %s: its partition moved to another worker", rid)
                    return
                if step.token_ids or step.text:
                    if ttft_ms is None and step.token_ids:
                        ttft_ms = (time.perf_counter() - picked_up) * 1000
                    completion += len(step.token_ids)
                    await stream.token(step.text, step.token_ids, step.logprob)
                if step.finish_reason is not None:
                    reason, why = step.finish_reason, None
                    if reason is FinishReason.CANCELLED and (why := flagged()) is not None:
                        reason = FinishReason.CONTENT_FILTER
                        log.info("stopping %s: the guard flagged %s (%s) at seq %d",
                                 rid, why.category, why.policy, why.seq)  # fmt: skip
                    await stream.finished(
                        reason,
                        Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion),
                        Timings(ttft_ms=ttft_ms, total_ms=(time.perf_counter() - picked_up) * 1000),
                        content_filter=why,
                    )

    def _flagged(self, request: GenerationRequest) -> ContentFilter | None:
        """The guard's first violation in a moderated request's stream, if any."""
        if request.moderation in (None, ModerationMode.OFF):
            return None
        view = self._verdicts.view(request.request_id)
        first = view.flagged if view is not None else None
        if first is None:
            return None
        return ContentFilter(category=first.category, policy=first.policy,
                             policy_version=first.policy_version, seq=first.seq)  # fmt: skip

    async def _commit(self, tp: TopicPartition, term: int, offset: int) -> None:
        if self._offsets.finished(tp, offset) is None:
            return  # tp's term ended: its new owner commits
        while True:
            await self._ownership.settled.wait()  # a commit mid-rebalance is refused
            commit_at = self._offsets.committable(tp)  # now, so a retry never goes back
            if not self._ownership.holds(tp, term) or commit_at is None:
                return
            assert self._consumer is not None
            try:
                await self._consumer.commit({tp: commit_at})
                return
            except CommitFailedError:
                # The group began rebalancing before we knew. Commit once it has
                # settled, if tp is still ours; if not, the request is done and its
                # new owner will find that in the log.
                log.info("commit of %s at %d refused by a rebalance; again once it settles",
                         tp, commit_at)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._settings.session_timeout_ms / 1000):
                        await self._ownership.reassigned()


def _ms_since(moment: datetime) -> float:
    return (datetime.now(UTC) - moment).total_seconds() * 1000


async def _finish_unstarted(stream: EventStream, reason: FinishReason) -> None:
    """End a request that is not to be generated at all (cancelled, expired)."""
    await stream.finished(
        reason, Usage(prompt_tokens=0, completion_tokens=0), Timings(ttft_ms=None, total_ms=0.0)
    )


def _request_id_from_key(key: bytes | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(key.decode()) if key else None
    except (ValueError, UnicodeDecodeError):
        return None
