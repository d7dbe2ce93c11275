"""Turning generated token ids into text deltas that are safe to publish.

Two things can make the text of the newest token unsafe to send yet: it may end
in half a UTF-8 character (byte-level BPE splits them), and it may be the start
of a stop string. Both are held back until the next token settles them; the
concatenation of every delta is always exactly the final text.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into appended text (the method TGI and
    vLLM use: decode a short window and diff it against its known prefix)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character decodes as U+FFFD, as a
        full decode would show it)."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :]

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return str(self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True))


class StopMatcher:
    """Finds stop strings across token boundaries; never releases text past a stop."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Append ``text``; return what is now safe to publish."""
        if self.stopped or not self._stops:
            return "" if self.stopped else text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        hold = self._held_suffix()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending text that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if stop.startswith(self._pending[-n:]):
                    longest = n
                    break
        return longest
