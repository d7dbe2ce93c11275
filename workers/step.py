"""One step of the batch, on the compute thread: the rows of the KV caches that
its sequences hold, its tokens packed into one input, and the tokens sampled from
its logits. The scheduler (batching.py) lays a step out and runs it; the packed
attention that keeps its sequences apart is attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import KVRows, Packing, Prefill
from .sequence import Sequence


class Rows:
    """Which sequence holds which row of the KV cache.

    A sequence that ends frees its row, and the next one to begin its prefill
    takes it over, so churn copies nothing. Free rows still ride along in the
    decode attention (a row's worth of reads); once half the rows are free, the
    live ones are moved to the front and the storage shrinks to fit.
    """

    def __init__(self, cache: KVRows) -> None:
        self.cache = cache
        self.slots: list[Sequence | None] = []

    @property
    def sequences(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def take(self, sequence: Sequence) -> None:
        free = [i for i, s in enumerate(self.slots) if s is None]
        sequence.row = free[0] if free else len(self.slots)
        if not free:
            self.slots.append(None)
        self.slots[sequence.row] = sequence

    def leave(self) -> None:
        """Free the rows of sequences that are done."""
        for i, sequence in enumerate(self.slots):
            if sequence is not None and sequence.done:
                self.slots[i] = sequence.row = None
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
        live = self.sequences
        # Half the rows free: the live ones move to the front and the storage is cut
        # to fit them (with nobody left, it is let go).
        if 2 * len(live) <= len(self.slots) and (live or self.cache.rows):
            self.cache.compact([_row(s) for s in live], max((s.cached for s in live), default=0))
            self.slots = list(live)
            for row, sequence in enumerate(live):
                sequence.row = row


@dataclass
class PackedStep:
    """The input of one forward pass, laid out cache by cache: each class's decoding
    tokens, then its prefill chunks (see attention.Packing)."""

    chunks: list[tuple[Sequence, int]]  # this step's prompt chunks: (sequence, tokens)
    ids: list[int] = field(default_factory=list)
    runs: list[Packing] = field(default_factory=list)
    decoded: list[Sequence] = field(default_factory=list)
    sampled: list[Sequence] = field(default_factory=list)  # whose token each kept logit row samples
    keep: list[int] = field(default_factory=list)  # the tokens whose logits are kept

    def add(
        self,
        rows: Rows,
        decoding: list[Sequence],
        prefilling: list[tuple[Sequence, int]],
        device: torch.device,
    ) -> None:
        """Lay out one class's tokens: a token for each of its decoding sequences, then
        its prompt chunks, and make room for them in its cache."""
        start = len(self.ids)
        self.keep += range(start, start + len(decoding))
        self.decoded += decoding
        self.sampled += decoding
        self.ids += [s.last for s in decoding]
        prefills = []
        for sequence, n in prefilling:
            prefills.append(Prefill(_row(sequence), len(self.ids) - start, sequence.cached, n))
            self.ids += sequence.ids[sequence.cached : sequence.cached + n]
            if sequence.cached + n == len(sequence.ids):
                # Its prefill ends in this step: its last token's logits sample.
                self.keep.append(len(self.ids) - 1)
                self.sampled.append(sequence)
        columns = [s.cached + 1 for s in decoding] + [s.cached + n for s, n in prefilling]
        rows.cache.reserve(len(rows.slots), max(columns))
        self.runs.append(
            Packing.build(
                rows.cache,
                [(_row(s), s.cached) for s in decoding],
                prefills,
                device,
                start=start,
            )
        )


def sample(sequences: list[Sequence], logits: torch.Tensor) -> None:
    """Each sequence's next token from its row of ``logits``: the greedy ones all at
    once, the others by their own samplers."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # one op for the whole batch
    greedy = [i for i, s in enumerate(sequences) if s.sample is None]
    if greedy:
        rows = torch.tensor(greedy, device=logits.device)
        # From the logits, as generate does: their log-softmax can round two into a tie.
        tokens = logits[rows].float().argmax(dim=-1)
        chosen = logprobs[rows].gather(1, tokens.unsqueeze(1)).squeeze(1)
        for i, token, logprob in zip(greedy, tokens.tolist(), chosen.tolist(), strict=True):
            sequences[i].sampled = (token, logprob)
            sequences[i].last = token
    for sequence, row, row_logprobs in zip(sequences, logits, logprobs, strict=True):
        if sequence.sample is None:
            continue
        try:
            sequence.sampled = sequence.sample(row, row_logprobs)
        except Exception as exc:  # noqa: BLE001  # its own failure, delivered as its end
            sequence.failure = exc
            continue
        sequence.last = sequence.sampled[0]


def _row(sequence: Sequence) -> int:
    assert sequence.row is not None, "a sequence in the step holds a row"
    return sequence.row
