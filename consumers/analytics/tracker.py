"""Open requests, joined from the two topics they appear on.

A request's `GenerationRequest` (tenant, ``submitted_at``) is on
``tokenbus.requests``, its events on ``tokenbus.tokens``; the two topics are read
together, so either may come first. A request is summarised once it has both, and
then forgotten. Open requests are bounded: past ``max_open``, the one least
recently heard of is dropped (a request whose events are gone from the log, say).
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable

from schemas import GenerationRequest, StreamEvent

from .timings import RequestSummary, RequestTimings

log = logging.getLogger(__name__)


class RequestTracker:
    def __init__(self, *, max_open: int, on_dropped: Callable[[], object] = lambda: None) -> None:
        self._open: OrderedDict[uuid.UUID, RequestTimings] = OrderedDict()
        self._max_open = max_open
        self._on_dropped = on_dropped  # an event not counted: fenced, duplicate, after the end

    def __len__(self) -> int:
        return len(self._open)

    def request(self, request: GenerationRequest) -> RequestSummary | None:
        timings = self._timings(request.request_id)
        if timings.request is None:  # a redelivered request changes nothing
            timings.request = request
        return self._maybe_done(request.request_id, timings)

    def event(self, event: StreamEvent) -> RequestSummary | None:
        known = event.request_id in self._open
        timings = self._timings(event.request_id)
        if not timings.add(event):
            self._on_dropped()
            if not known:  # a stale event after its request was summarised, say
                del self._open[event.request_id]
            return None
        return self._maybe_done(event.request_id, timings)

    def _timings(self, request_id: uuid.UUID) -> RequestTimings:
        timings = self._open.get(request_id)
        if timings is None:
            timings = self._open[request_id] = RequestTimings()
            if len(self._open) > self._max_open:
                forgotten, _ = self._open.popitem(last=False)
                log.warning("forgetting request %s: more than %d open", forgotten, self._max_open)
        else:
            self._open.move_to_end(request_id)
        return timings

    def _maybe_done(self, request_id: uuid.UUID, timings: RequestTimings) -> RequestSummary | None:
        if not timings.complete:
            return None
        del self._open[request_id]
        return timings.summary()
