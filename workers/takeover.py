"""Taking a request over: the worker's side of the fencing rule (`schemas.fencing`).

A request's offset is committed only once its terminal event is on the broker, so
a request whose worker died, froze or crashed while generating it is fetched again,
by the partition's next owner or by the same worker under a new attempt. That try
does not start afresh:

1. it reads what earlier attempts published (`Takeover.published`; the log reader
   applies the fencing rule): a terminal event means only the commit was missing,
   and as many attempts as ``max_attempts`` mean a poison pill;
2. it publishes under an attempt number higher than any before (`Takeover.attempt`);
3. it claims the request (`Takeover.claim`) and continues from exactly the stream
   its claim ends (`steps_after`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from schemas import FinishReason, GenerationRequest, StreamEvent, TokenEvent, is_terminal
from tokenbus.bus.log import LogReader

from .engine import GenerationEngine, Step
from .publisher import EventStream


@dataclass(frozen=True, slots=True)
class Published:
    """A request's stream as the log holds it: what every reader sees of it."""

    events: list[StreamEvent]

    @property
    def finished(self) -> bool:
        return bool(self.events) and is_terminal(self.events[-1])

    @property
    def attempts(self) -> int:
        """The attempts that published to it (each a try that crashed or was stopped)."""
        return len({e.attempt for e in self.events})

    @property
    def token_ids(self) -> list[int]:
        """The tokens published so far, which a try continuing the stream resumes from."""
        return [i for e in self.events if isinstance(e, TokenEvent) for i in e.token_ids]

    @property
    def only_finished_missing(self) -> bool:
        """Whether the closing text (a token event with text and no token) is out, so
        that only the `finished` event is missing."""
        tokens = [e for e in self.events if isinstance(e, TokenEvent)]
        return bool(tokens) and bool(tokens[-1].text) and not tokens[-1].token_ids


class Takeover:
    """Reads a request's log before a try at it, and claims it for the try."""

    def __init__(self, log: LogReader) -> None:
        self._log = log
        self._last_attempt = 0

    def attempt(self) -> int:
        """The attempt number of a new try: the time in milliseconds, and higher than
        this worker's last one, also for two tries within one millisecond."""
        self._last_attempt = max(time.time_ns() // 1_000_000, self._last_attempt + 1)
        return self._last_attempt

    async def published(self, request_id: uuid.UUID) -> Published:
        return Published([e async for e in self._log.events(request_id, from_seq=0)])

    async def claim(self, stream: EventStream, earlier: Published, **started: Any) -> Published:
        """Claim the request under ``stream``'s attempt and return its stream as every
        reader will see it; ``started`` are the fields of the `started` event that
        claims a request nobody has published to.

        A new request is claimed by its `started` event; one with events already, by
        an empty token. Reading the log again once the broker has the claim gives
        the stream up to and including it, with any stale event that slipped in
        before it; what the fenced-off worker writes after it, no reader accepts.
        """
        if earlier.events:
            await stream.token("", [], None)
        else:
            await stream.started(**started)
        await stream.flush()
        claimed = await self.published(stream.request_id)
        stream.next_seq = len(claimed.events)
        return claimed


def steps_after(
    claimed: Published,
    engine: GenerationEngine,
    request: GenerationRequest,
    prompt_ids: list[int],
    should_stop: Callable[[], bool],
) -> AsyncGenerator[Step]:
    """What is left to generate of a claimed stream: the engine's steps after the
    tokens published, or only `finished` if the closing text is out already."""
    if claimed.only_finished_missing:
        return _single(Step(text="", finish_reason=FinishReason.STOP))
    return engine.generate(request, prompt_ids, resumed=claimed.token_ids, should_stop=should_stop)


async def _single(step: Step) -> AsyncGenerator[Step]:
    yield step
