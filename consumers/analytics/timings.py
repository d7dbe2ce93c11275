"""One request's figures, from its events alone.

Every figure is a difference of two timestamps on the bus, so the analytics agree
with what anyone reading the log computes:

- queue wait: ``submitted_at`` (the request) -> ``started.ts`` (pickup);
- TTFT from submission: ``submitted_at`` -> the first token event with token ids;
- TTFT from pickup: ``started.ts`` -> that same token event;
- inter-token latency: the gaps between consecutive token events with token ids
  (empty ones only carry held-back text or a takeover's claim);
- tokens/s: completion tokens / (terminal ``ts`` - ``started.ts``), generation
  throughput from pickup to the end.

Events are fed through the fencing rule (`schemas.StreamView`) in log order, so a
stale worker's events never count. The request itself comes from another topic
and may arrive before or after its events: a `RequestTimings` is complete once it
has both the request and the terminal event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from schemas import (
    FailedEvent,
    FinishedEvent,
    GenerationRequest,
    StartedEvent,
    StreamEvent,
    StreamView,
    TokenEvent,
)

FAILED = "failed"  # the outcome of a stream that ended with a `failed` event


@dataclass(frozen=True, slots=True)
class RequestSummary:
    """What one finished request contributes to the analytics (times in seconds)."""

    tenant: str
    model: str  # what the worker served; without a `started` event, what was asked for
    model_served: bool  # whether `model` is a worker's (a `started` event's) or the client's
    outcome: str  # a finish reason, or "failed"
    ended_at: datetime  # the terminal event's ts: the window the request counts in
    completion_tokens: int
    queue_wait_s: float | None
    ttft_submission_s: float | None
    ttft_pickup_s: float | None
    inter_token_s: tuple[float, ...]
    tokens_per_s: float | None


@dataclass(slots=True)
class RequestTimings:
    """Collects one request's accepted events until it can be summarised."""

    view: StreamView = field(default_factory=StreamView)
    request: GenerationRequest | None = None
    started: StartedEvent | None = None
    first_token_at: datetime | None = None
    last_token_at: datetime | None = None
    inter_token_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    terminal: FinishedEvent | FailedEvent | None = None

    def add(self, event: StreamEvent) -> bool:
        """Take an event in log order; False when fencing (or a duplicate) drops it."""
        if self.terminal is not None or not self.view.accept(event):
            return False
        if isinstance(event, StartedEvent):
            self.started = self.started or event  # a takeover's claim is not a new pickup
        elif isinstance(event, TokenEvent) and event.token_ids:
            if self.last_token_at is not None:
                self.inter_token_s.append(_seconds(self.last_token_at, event.ts))
            self.first_token_at = self.first_token_at or event.ts
            self.last_token_at = event.ts
            self.completion_tokens += len(event.token_ids)
        elif isinstance(event, FinishedEvent | FailedEvent):
            self.terminal = event
        return True

    @property
    def complete(self) -> bool:
        return self.request is not None and self.terminal is not None

    def summary(self) -> RequestSummary:
        request, terminal, started = self.request, self.terminal, self.started
        if request is None or terminal is None:
            raise ValueError("a request is summarised once it has its request and its end")
        submitted = request.submitted_at
        first = self.first_token_at
        return RequestSummary(
            tenant=request.tenant,
            model=started.model if started is not None else request.model,
            model_served=started is not None,
            outcome=terminal.finish_reason if isinstance(terminal, FinishedEvent) else FAILED,
            ended_at=terminal.ts,
            completion_tokens=self.completion_tokens,
            queue_wait_s=_seconds(submitted, started.ts) if started else None,
            ttft_submission_s=_seconds(submitted, first) if first else None,
            ttft_pickup_s=_seconds(started.ts, first) if started and first else None,
            inter_token_s=tuple(self.inter_token_s),
            tokens_per_s=_rate(self.completion_tokens, started, terminal.ts),
        )


def _seconds(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


def _rate(tokens: int, started: StartedEvent | None, ended: datetime) -> float | None:
    if started is None or tokens == 0:
        return None
    elapsed = _seconds(started.ts, ended)
    return tokens / elapsed if elapsed > 0 else None
