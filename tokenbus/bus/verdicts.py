"""Following the guard's verdicts: every partition of ``tokenbus.verdicts``, read
from ``lookback_s`` ago on, folded per request by the fencing rule of
`schemas.verdicts` (`VerdictView`).

Workers read it to stop a flagged stream; a strict relay reads it to deliver an
event only once the guard has judged it:

    tail = VerdictTail(kafka)            # then run() in a task
    tail.watermark(request_id)           # -> the seq judged through, -1 if none
    await tail.wait_judged(request_id, seq, deadline=loop_time)  # -> VerdictView
    tail.view(request_id)                # -> VerdictView | None (violations, final)

`wait_judged` raises `GuardTimeout` once ``deadline`` (``loop.time()`` clock)
passes: the guard is down or behind, and a strict stream fails closed. Each wait's
length goes to ``on_wait`` (seconds; 0 when the event was judged already): a strict
relay passes a histogram's ``observe``, strict mode's added delivery delay.

The tail holds what it read since it started (``lookback_s`` before), for at most
``max_requests`` requests. A request older than that, or one whose view was dropped
to keep to ``max_requests``, may have verdicts on the log that the tail has not
(a stream replayed long after, or one whose early verdicts, with its violations,
lie before the lookback). ``wait_judged`` then reads the request's verdicts back
from the log (`LogReader.verdicts`: its partition, from its id's time on) before
it waits, once per request at a time; the view read back replaces the tail's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass

from aiokafka.errors import KafkaError

from schemas import MalformedMessage, Verdict, VerdictView, decode_verdict, uuid7_unix_ms
from schemas.ids import is_uuid7

from .log import LogReader
from .settings import KafkaSettings
from .tail import follow

log = logging.getLogger(__name__)


class GuardTimeout(TimeoutError):
    """The guard had not judged the event by the deadline (it is down or behind)."""


@dataclass(eq=False)
class _ReadBack:
    """One read of a request's verdicts from the log, shared by those who wait on it."""

    task: asyncio.Task[None]
    meanwhile: list[Verdict]  # what run() read of the request during it
    waiters: int = 0


class VerdictTail:
    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        lookback_s: float = 3600,
        max_requests: int = 100_000,
        log_reader: LogReader | None = None,
        on_verdict: Callable[[Verdict, bool], object] = lambda verdict, accepted: None,
        on_wait: Callable[[float], object] = lambda seconds: None,
    ) -> None:
        self._kafka = kafka
        self._lookback_ms = int(lookback_s * 1000)
        self._max_requests = max_requests
        self._on_verdict = on_verdict  # (verdict, accepted by the fencing rule)
        self._on_wait = on_wait
        self._views: OrderedDict[uuid.UUID, VerdictView] = OrderedDict()
        self._changed: dict[uuid.UUID, asyncio.Event] = {}  # set at the next verdict
        self._waiting: dict[uuid.UUID, int] = {}
        self.caught_up = asyncio.Event()  # every verdict written before run() is read
        self.malformed = 0
        self.fenced = 0
        # Reading a request's verdicts back from the log (see the module's docstring).
        self._log_reader = log_reader  # made on first use: a worker's tail never reads back
        self._since_ms: int | None = None  # where run() began reading; None: not yet
        self._evicted_ms = -1  # the latest request time among the views dropped
        self._whole: set[uuid.UUID] = set()  # views read back: all the log had (in _views)
        self._reads: dict[uuid.UUID, _ReadBack] = {}  # reads back under way
        self.read_back = 0  # reads of a request's verdicts back from the log (a metric)

    @property
    def _log(self) -> LogReader:
        if self._log_reader is None:
            self._log_reader = LogReader(kafka=self._kafka)
        return self._log_reader

    def view(self, request_id: uuid.UUID) -> VerdictView | None:
        return self._views.get(request_id)

    def watermark(self, request_id: uuid.UUID) -> int:
        """The seq the guard has judged the stream through; -1 if nothing yet."""
        view = self._views.get(request_id)
        return -1 if view is None else view.judged_through

    async def wait_judged(self, request_id: uuid.UUID, seq: int, *, deadline: float) -> VerdictView:
        """The request's view once its watermark is at ``seq`` or past it; raises
        `GuardTimeout` at ``deadline`` (the event loop's clock). A request whose
        verdicts may lie beyond what the tail holds is read back from the log first."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        if self._may_lack(request_id):
            try:
                async with asyncio.timeout_at(deadline):
                    await self._read_back(request_id)
            except TimeoutError:
                raise GuardTimeout(
                    f"reading the verdicts on {request_id} back from the log took past "
                    f"the deadline, before event {seq} was known to be judged"
                ) from None
        while True:
            view = self._views.get(request_id)
            if view is not None and view.judged(seq):
                self._on_wait(loop.time() - began)
                return view
            changed = self._changed.setdefault(request_id, asyncio.Event())
            self._waiting[request_id] = self._waiting.get(request_id, 0) + 1
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError:
                raise GuardTimeout(
                    f"the guard has not judged event {seq} of {request_id} in time"
                ) from None
            finally:
                self._waiting[request_id] -= 1
                if not self._waiting[request_id]:
                    del self._waiting[request_id]
                    if self._changed.get(request_id) is changed:
                        del self._changed[request_id]  # no one waits on it now

    def add(self, verdict: Verdict) -> bool:
        """Fold one verdict in (what run() does with each it reads); False if fenced."""
        request_id = verdict.request_id
        view = self._views.get(request_id)
        if view is None:
            view = self._views[request_id] = VerdictView()
            self._evict()
        else:
            self._views.move_to_end(request_id)
        accepted = view.accept(verdict)
        if not accepted:
            self.fenced += 1
            log.warning("ignoring a verdict on %s from stale guard %s (epoch %d < %d)",
                        request_id, verdict.guard, verdict.epoch, view.epoch)  # fmt: skip
        read = self._reads.get(request_id)
        if read is not None:
            read.meanwhile.append(verdict)  # it may have passed this one's offset already
        self._on_verdict(verdict, accepted)
        self._changed_now(request_id)
        return accepted

    async def run(self) -> None:
        self._since_ms = int(time.time() * 1000) - self._lookback_ms
        await follow(
            self._kafka,
            self._kafka.topics.verdicts,
            self._read,
            since_ms=self._since_ms,
            caught_up=self.caught_up,
            fetch_max_wait_ms=20,
            poll_timeout_ms=200,
        )

    def _read(self, value: bytes | None, offset: int) -> None:
        try:
            verdict = decode_verdict(value)
        except MalformedMessage as exc:
            self.malformed += 1
            log.warning("skipping malformed verdict at offset %d: %s", offset, exc)
            return
        self.add(verdict)

    def _changed_now(self, request_id: uuid.UUID) -> None:
        changed = self._changed.pop(request_id, None)
        if changed is not None:
            changed.set()

    def _evict(self) -> None:
        while len(self._views) > self._max_requests:
            request_id, _ = self._views.popitem(last=False)
            self._whole.discard(request_id)
            if is_uuid7(request_id):
                self._evicted_ms = max(self._evicted_ms, uuid7_unix_ms(request_id))

    # -- reading a request's verdicts back from the log ------------------------------

    def _may_lack(self, request_id: uuid.UUID) -> bool:
        """Whether the log may hold verdicts on the request that the tail has not:
        the request is older than where run() began reading (give or take the clocks'
        skew), or not younger than a view dropped to keep to ``max_requests``. (A
        request id that is not a UUIDv7 does not say when it was submitted: the
        tail's view is all there is.)"""
        if self._since_ms is None or request_id in self._whole or not is_uuid7(request_id):
            return False
        submitted = uuid7_unix_ms(request_id)
        return submitted - self._log.clock_skew_ms < self._since_ms or submitted <= self._evicted_ms

    async def _read_back(self, request_id: uuid.UUID) -> None:
        """Read the request's verdicts back from the log, or wait for the read under
        way. The last waiter to leave (its deadline passed, its subscriber hung up)
        cancels the read; the read's consumer is stopped all the same (`LogReader`)."""
        read = self._reads.get(request_id)
        if read is None:
            meanwhile: list[Verdict] = []
            task = asyncio.create_task(
                self._read_from_log(request_id, meanwhile), name=f"verdicts-of-{request_id}"
            )
            read = self._reads[request_id] = _ReadBack(task, meanwhile)
            task.add_done_callback(lambda _: self._read_done(request_id, read))
        task = read.task
        read.waiters += 1
        try:
            await asyncio.shield(task)
        finally:
            read.waiters -= 1
            if not read.waiters and not task.done():
                task.cancel()
                self._read_done(request_id, read)  # a new waiter starts a new read

    def _read_done(self, request_id: uuid.UUID, read: _ReadBack) -> None:
        if self._reads.get(request_id) is read:
            del self._reads[request_id]

    async def _read_from_log(self, request_id: uuid.UUID, meanwhile: list[Verdict]) -> None:
        """Fold the request's verdicts, as the log holds them from its id's time on,
        into a view of their own (the rule is applied in log order, so the tail's view
        cannot be patched with the earlier ones), then what run() read of the request
        meanwhile, and put that view in place of the tail's."""
        self.read_back += 1
        view = VerdictView()
        found = False
        try:
            async with aclosing(self._log.verdicts(request_id)) as verdicts:
                async for verdict in verdicts:
                    found = True
                    view.accept(verdict)
                    if view.final:
                        break  # no verdict follows a final one
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning(
                "could not read the verdicts on %s back from the log (%r): waiting for the "
                "tail to read them (a strict stream fails closed at its deadline); check "
                "the broker at %s",
                request_id, exc, self._kafka.bootstrap,
            )  # fmt: skip
            return
        if not found:
            return  # nothing on the log: the tail's wait, and its deadline, decide
        for verdict in meanwhile:
            view.accept(verdict)  # again, if the read saw it too: the rule makes that a no-op
        self._views[request_id] = view
        self._views.move_to_end(request_id)
        self._whole.add(request_id)
        self._evict()
        self._changed_now(request_id)
