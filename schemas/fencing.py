"""The fencing rule: which events of a request's log are its stream.

A worker that froze (a long GC pause, SIGSTOP, a VM migration) past its session
timeout loses its partitions; another worker takes its requests over. When the
frozen one wakes, it may publish a few more events before it learns that. Those
must not reach anyone. Every event carries the ``attempt`` of the worker that
wrote it (the time it took the request, so a later owner has a higher attempt),
and every reader (relay, audit, a worker taking over) applies one rule to a
request's events **in log order**:

1. an event whose attempt is lower than the highest attempt seen so far for the
   request is fenced: ignored;
2. otherwise the first event with the next seq is accepted; later ones with a seq
   already accepted are duplicates.

A worker that takes a request over first *claims* it: it publishes one event with
its attempt (``started``, or an empty ``token`` when continuing) and, once the
broker has it, reads the request's log again and continues from exactly what rule
1-2 accepted up to its claim. A stale event that slipped in before the claim is
part of the stream and is continued from; one after it is fenced. So every reader
sees the same stream, and it has no gap, no duplicate and no fork. The workers'
side of it, the takeover, is workers/takeover.py.

(Attempts are wall-clock milliseconds: workers' clocks must agree to within the
session timeout, which NTP gives by a wide margin.)
"""

from __future__ import annotations

from .events import StreamEvent


class StreamView:
    """Applies the rule to one request's events, fed in log order."""

    def __init__(self, next_seq: int = 0, *, anchor_on_first: bool = False) -> None:
        self.next_seq = next_seq
        self.attempt = 0
        # A reader that starts mid-stream (the relay's hub, a log whose start was
        # deleted by retention) takes the first event it sees as its starting point.
        self._anchor = anchor_on_first

    def accept(self, event: StreamEvent) -> bool:
        if event.attempt < self.attempt:
            return False  # fenced: a stale worker's event
        self.attempt = event.attempt
        if self._anchor:
            self._anchor = False
            self.next_seq = event.seq
        if event.seq != self.next_seq:
            return False
        self.next_seq += 1
        return True
