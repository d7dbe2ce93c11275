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
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from schemas import MalformedMessage, Verdict, VerdictView, decode_verdict

from .settings import KafkaSettings
from .tail import follow

log = logging.getLogger(__name__)


class GuardTimeout(TimeoutError):
    """The guard had not judged the event by the deadline (it is down or behind)."""


class VerdictTail:
    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        lookback_s: float = 3600,
        max_requests: int = 100_000,
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

    def view(self, request_id: uuid.UUID) -> VerdictView | None:
        return self._views.get(request_id)

    def watermark(self, request_id: uuid.UUID) -> int:
        """The seq the guard has judged the stream through; -1 if nothing yet."""
        view = self._views.get(request_id)
        return -1 if view is None else view.judged_through

    async def wait_judged(self, request_id: uuid.UUID, seq: int, *, deadline: float) -> VerdictView:
        """The request's view once its watermark is at ``seq`` or past it; raises
        `GuardTimeout` at ``deadline`` (the event loop's clock)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
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
        view = self._views.get(verdict.request_id)
        if view is None:
            view = self._views[verdict.request_id] = VerdictView()
            while len(self._views) > self._max_requests:
                self._views.popitem(last=False)
        else:
            self._views.move_to_end(verdict.request_id)
        accepted = view.accept(verdict)
        if not accepted:
            self.fenced += 1
            log.warning("ignoring a verdict on %s from stale guard %s (epoch %d < %d)",
                        verdict.request_id, verdict.guard, verdict.epoch, view.epoch)  # fmt: skip
        self._on_verdict(verdict, accepted)
        changed = self._changed.pop(verdict.request_id, None)
        if changed is not None:
            changed.set()
        return accepted

    async def run(self) -> None:
        await follow(
            self._kafka,
            self._kafka.topics.verdicts,
            self._read,
            since_ms=int(time.time() * 1000) - self._lookback_ms,
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
