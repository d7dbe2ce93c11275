"""Judging one stream as it grows: its text, the policies run over it incrementally,
and the watermark.

The judge keeps the stream's text (the fencing rule of `schemas.fencing` decides
which events are part of it) and, after each batch of events, scans only what is
new since the last scan. What it may clear (``judged_through``) stops before any
text that could still grow into a match, and, when the tenant's policy has
forbidden topics, before the sentence not yet ended (the semantic check judges
whole sentences). Once the stream is flagged there is nothing left to hold back:
every later token is withheld by the violation itself, so the watermark runs on
to the end and the terminal event (``content_filter``) is judged at once.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Callable
from datetime import datetime

import regex

from schemas import (
    ModerationMode,
    StartedEvent,
    StreamEvent,
    StreamView,
    TokenEvent,
    Violation,
    is_terminal,
)

from .policies import TenantPolicy
from .recognizers import Recognizer, scan

# Lookbehinds see this far back before where a scan starts.
_CONTEXT = 64
_SENTENCE_END = regex.compile(r"[.!?\n]+(?=\s|$)")

# (sentences, topics) -> for each sentence, the closest topic's index and score
Similarity = Callable[[list[str], tuple[str, ...]], list[tuple[int, float]]]


class StreamJudge:
    def __init__(
        self,
        request_id: uuid.UUID,
        *,
        tenant: str,
        mode: ModerationMode,
        policy: TenantPolicy,
        recognizers: list[Recognizer],
        similarity: Similarity | None,
    ) -> None:
        self.request_id = request_id
        self.tenant = tenant
        self.mode = mode
        self.policy = policy
        self._recognizers = recognizers
        self._similarity = similarity if policy.topics else None
        self._view = StreamView()
        self.text = ""
        self._seqs: list[int] = []  # accepted events, in order
        self._ends: list[int] = []  # where each one's text ends in self.text
        self._judged = 0  # events judged (an index into _seqs)
        self._scanned_to = 0  # text before this is scanned and cleared
        self._sentence_from = 0
        self._reported: set[tuple[str, int, int]] = set()
        self.violations: list[Violation] = []  # every one found
        self.final = False
        self.newest_ts: datetime | None = None

    @property
    def judged_through(self) -> int:
        return self._seqs[self._judged - 1] if self._judged else -1

    @property
    def flagged(self) -> bool:
        return bool(self.violations)

    def add(self, event: StreamEvent) -> bool:
        """Take an event of the stream, in log order; False if the fencing rule
        leaves it out (a stale worker's, or a duplicate)."""
        if self.final or not self._view.accept(event):
            return False
        if isinstance(event, TokenEvent):
            self.text += event.text
        self._seqs.append(event.seq)
        self._ends.append(len(self.text))
        self.final = is_terminal(event)
        self.newest_ts = event.ts
        return True

    def judge(self) -> list[Violation]:
        """Scan what is new; returns the violations found now (also in ``violations``)."""
        found: list[Violation] = []
        if self.flagged:
            cleared = len(self.text)
        else:
            cleared = self._scan(found)
            if found:
                cleared = len(self.text)
        while self._judged < len(self._seqs) and self._ends[self._judged] <= cleared:
            self._judged += 1
        self.violations.extend(found)
        return found

    def _scan(self, found: list[Violation]) -> int:
        text = self.text
        result = scan(
            self._recognizers, text, max(self._scanned_to - _CONTEXT, 0), final=self.final
        )
        for hit in result.found:
            self._report(found, hit.recognizer.category, hit.recognizer.policy, hit.start, hit.end)
        cleared = result.open_from
        if self._similarity is not None:
            cleared = min(cleared, self._check_sentences(found))
        self._scanned_to = max(self._scanned_to, cleared)
        return cleared

    def _check_sentences(self, found: list[Violation]) -> int:
        """Run the semantic check over the sentences ended since the last; returns
        where the sentence not yet ended begins."""
        assert self._similarity is not None
        spans = []
        start = self._sentence_from
        for end in _SENTENCE_END.finditer(self.text, pos=start):
            spans.append((start, end.end()))
            start = end.end()
        if self.final and start < len(self.text):
            spans.append((start, len(self.text)))
            start = len(self.text)
        spans = [(a, b) for a, b in spans if self.text[a:b].strip()]
        topics = self.policy.topics
        scores = (
            self._similarity([self.text[a:b].strip() for a, b in spans], topics) if spans else []
        )
        for (a, b), (topic, score) in zip(spans, scores, strict=True):
            if score >= self.policy.topic_threshold:
                self._report(found, "topic", f"topics[{topic}]", a, b)
        self._sentence_from = start
        return start

    def _report(self, found: list[Violation], category: str, policy: str, a: int, b: int) -> None:
        if (policy, a, b) in self._reported:
            return
        self._reported.add((policy, a, b))
        found.append(
            Violation(
                seq=self._seq_at(a),
                end_seq=self._seq_at(b - 1),
                category=category,
                policy=policy,
                policy_version=self.policy.version,
                span=(a, b),
            )
        )

    def _seq_at(self, offset: int) -> int:
        """The event whose text holds the character at ``offset``."""
        return self._seqs[min(bisect.bisect_right(self._ends, offset), len(self._seqs) - 1)]


def describes(event: StreamEvent) -> tuple[str, ModerationMode] | None:
    """The tenant and mode a stream's first event says, if it says them."""
    if isinstance(event, StartedEvent) and event.tenant is not None:
        return event.tenant, event.moderation or ModerationMode.OFF
    return None
