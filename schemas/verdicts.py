"""What the guard publishes: `Verdict` on ``tokenbus.verdicts``, keyed by request id.

A verdict says of one stream "every event up to ``judged_through`` has been
judged", and carries the violations found since the guard's previous verdict on
it. A violation names the events holding the flagged text (``seq`` .. ``end_seq``)
and where the text lies in the stream's concatenated text (``span``), never the
text itself: the verdicts topic must not become a second copy of what it flags.

The guard holds back the end of the text that could still grow into a match (half
an e-mail address, the first digits of a card number): ``judged_through`` stops
before the event holding it until the text goes on or the stream ends. So an
event at or below the watermark that is not flagged is safe to deliver.

Fencing, the same rule as `schemas.fencing` for workers: each verdict carries the
``epoch`` of the guard instance that wrote it (the wall-clock ms at which it took
the stream's partition, so a later instance has a higher epoch), and a reader
applies, in log order per request:

1. a verdict whose epoch is lower than the highest seen for the request is a stale
   guard's: ignored;
2. otherwise its watermark raises the request's (a watermark never goes down: a
   new instance judging the stream again from its start says nothing about what
   an earlier one cleared) and its violations are added (each once).

`VerdictView` is that rule; the guard's readers (workers, audit, a strict relay)
all use it.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from .requests import SCHEMA_VERSION, ModerationMode


class Violation(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    seq: int = Field(ge=0)  # the first event holding the flagged text
    end_seq: int = Field(ge=0)  # the last one
    category: Annotated[str, Field(max_length=64)]  # email, phone, card, iban, api_key, deny, topic
    policy: Annotated[str, Field(max_length=128)]  # which rule of the tenant's policy
    policy_version: Annotated[str, Field(max_length=64)]
    span: tuple[int, int]  # [start, end) in the stream's text (its tokens' text, joined)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.policy, *self.span)


class Verdict(BaseModel):
    """The guard's word on one stream, as far as it has judged it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = SCHEMA_VERSION
    request_id: uuid.UUID
    guard: str  # the instance that judged
    epoch: int = Field(ge=0)  # fencing: when that instance took the stream (Unix ms)
    judged_through: int = Field(ge=-1)  # every event with seq <= this is judged; -1: none
    violations: list[Violation] = Field(default_factory=list)  # new since its last verdict
    tenant: str
    mode: ModerationMode
    policy_version: str
    final: bool = False  # the stream's terminal event is judged: no verdict follows
    ts: AwareDatetime  # when the verdict was made
    event_ts: AwareDatetime | None = None  # `ts` of the newest event it judged (latency)


class VerdictView:
    """Applies the rule to one request's verdicts, fed in log order."""

    def __init__(self) -> None:
        self.epoch = 0
        self.judged_through = -1
        self.final = False
        self.violations: list[Violation] = []
        self.mode: ModerationMode | None = None
        self._seen: set[tuple[str, int, int]] = set()

    def accept(self, verdict: Verdict) -> bool:
        """Take ``verdict`` into account; False if it is a stale guard's (fenced)."""
        if verdict.epoch < self.epoch:
            return False
        self.epoch = verdict.epoch
        self.mode = verdict.mode
        self.judged_through = max(self.judged_through, verdict.judged_through)
        self.final = self.final or verdict.final
        for violation in verdict.violations:
            if violation.key not in self._seen:
                self._seen.add(violation.key)
                self.violations.append(violation)
        return True

    @property
    def flagged(self) -> Violation | None:
        """The earliest violation (by the first event it touches), if any."""
        return min(self.violations, key=lambda v: (v.seq, v.span), default=None)

    def judged(self, seq: int) -> bool:
        return seq <= self.judged_through

    def withheld(self, seq: int) -> bool:
        """Whether a *token* event at ``seq`` holds flagged text or follows it: a strict
        reader never delivers it. (The terminal event that ends a flagged stream
        ``content_filter`` is delivered once judged.)"""
        first = self.flagged
        return first is not None and seq >= first.seq
