"""Continuous batching: iteration-level scheduling, as in Orca and vLLM.

Sequences join and leave the running batch at every decode step. One iteration
of the scheduler is

    1. admit waiting sequences, first come first served, while the caps allow
       (``max_batch`` sequences, ``max_batch_tokens`` tokens of KV cache);
    2. in a worker thread: free the rows of sequences that finished or were
       released; one decode step for the whole running batch; then prefill
       admitted prompts, at most ``prefill_chunk`` tokens per iteration (a long
       prompt is prefilled over several iterations, so it delays everyone's next
       token by one chunk, not by the whole prompt); prefilled sequences join
       the batch for the next decode step;
    3. deliver each sampled token to its sequence's queue.

The running batch shares one KV cache, left-padded to a common length, with an
attention mask over the padding and explicit position ids per row. A decode step
writes one column in place (`_GrowingLayer`), where transformers' DynamicCache
would copy the whole cache with ``torch.cat`` at every step; a sequence that
joins is written into a row freed by one that left (`_Batch`), so steady churn
does not copy the batch's cache either. Prompts that arrive together are
prefilled together, in one left-padded pass: every forward pass reads all the
weights once, whatever its batch.

Admission reserves a sequence's whole budget (prompt + every token it may
generate), so a sequence once admitted always runs to its end: nothing is ever
preempted or recomputed. A sequence larger than the token cap is admitted alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

log = logging.getLogger(__name__)

Sample = Callable[[torch.Tensor, torch.Tensor], tuple[int, float]]  # logits, logprobs


class EngineStopped(RuntimeError):
    """The scheduler has stopped; no sequence can be generated any more."""


@dataclass(eq=False)
class Sequence:
    """One request's tokens as the scheduler sees them. The engine reads sampled
    tokens with `next()` and calls `Scheduler.release` when it is done."""

    ids: list[int]  # prefilled: the prompt and any tokens already published
    sample: Sample
    max_new: int  # tokens to generate at most
    stop_ids: frozenset[int]  # after one of these, generating further is pointless
    tokens: asyncio.Queue[tuple[int, float] | BaseException] = field(default_factory=asyncio.Queue)
    prefilled: int = 0
    generated: int = 0
    last: int = -1  # the token the next decode step feeds
    sampled: tuple[int, float] | None = None  # by the last iteration, not yet delivered
    cache: Cache | None = None  # a long prompt's own, while it is prefilled chunk by chunk
    done: bool = False  # no more tokens will be generated for it

    @property
    def budget(self) -> int:
        return len(self.ids) + self.max_new

    async def next(self) -> tuple[int, float]:
        item = await self.tokens.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Scheduler:
    def __init__(
        self,
        model: Any,
        device: torch.device,
        *,
        max_batch: int = 32,
        max_batch_tokens: int = 32_768,
        prefill_chunk: int = 256,
    ) -> None:
        self._model = model
        self._device = device
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefilling: list[Sequence] = []
        self._batch = _Batch(device)
        self._wake = asyncio.Event()
        self._stopped = False

    @property
    def in_flight(self) -> int:
        """Sequences admitted and not done."""
        return sum(not s.done for s in [*self._prefilling, *self._batch.rows])

    def submit(
        self, ids: list[int], sample: Sample, *, max_new: int, stop_ids: frozenset[int]
    ) -> Sequence:
        if self._stopped:
            raise EngineStopped("the engine has stopped")
        if not ids or max_new < 1:
            raise ValueError("a sequence needs at least one prompt token and one to generate")
        sequence = Sequence(list(ids), sample, max_new, stop_ids)
        self._waiting.append(sequence)
        self._wake.set()
        return sequence

    def release(self, sequence: Sequence) -> None:
        """The engine needs no more tokens of ``sequence`` (finished, stopped, cancelled)."""
        sequence.done = True
        if sequence in self._waiting:
            self._waiting.remove(sequence)
        self._wake.set()

    async def run(self) -> None:
        """Schedule until cancelled. A failed forward pass fails the sequences in it,
        not the scheduler."""
        try:
            while True:
                self._drop_done()
                self._admit()
                if not self._prefilling and not self._batch.rows:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                try:
                    await asyncio.to_thread(self._iterate)
                except Exception as exc:
                    log.exception("a forward pass failed; failing the sequences in it")
                    self._fail(exc, waiting=False)
                    continue
                self._deliver()
        finally:
            self._stopped = True
            self._fail(EngineStopped("the engine stopped"), waiting=True)

    # -- the asyncio side: runs only while no forward pass is in flight ----------

    def _drop_done(self) -> None:
        self._prefilling = [s for s in self._prefilling if not s.done]

    def _admit(self) -> None:
        reserved = sum(s.budget for s in [*self._prefilling, *self._batch.rows] if not s.done)
        while self._waiting and self.in_flight < self.max_batch:
            head = self._waiting[0]
            if self.in_flight and reserved + head.budget > self.max_batch_tokens:
                break  # first come first served: nobody overtakes the head
            self._prefilling.append(self._waiting.popleft())
            reserved += head.budget

    def _deliver(self) -> None:
        for sequence in [*self._batch.rows, *self._prefilling]:
            token, sequence.sampled = sequence.sampled, None
            if token is None:
                continue
            sequence.tokens.put_nowait(token)
            sequence.generated += 1
            if sequence.generated >= sequence.max_new or token[0] in sequence.stop_ids:
                sequence.done = True
        self._prefilling = [s for s in self._prefilling if s.prefilled < len(s.ids)]

    def _fail(self, error: BaseException, *, waiting: bool) -> None:
        """Fail the sequences in flight, and the waiting ones too if ``waiting``."""
        failed = [*self._prefilling, *self._batch.rows]
        if waiting:
            failed += self._waiting
            self._waiting.clear()
        for sequence in failed:
            sequence.done = True
            sequence.tokens.put_nowait(error)
        self._prefilling = []
        self._batch = _Batch(self._device)

    # -- the worker thread's side ------------------------------------------------

    @torch.inference_mode()  # the batch's tensors are inference tensors: change them only here
    def _iterate(self) -> None:
        self._batch.leave()
        live = self._batch.live()
        if live:
            logits = self._model(**self._batch.decode_inputs(), use_cache=True).logits[:, -1]
            _sample(self._batch.rows, logits[live])
            self._batch.stepped()
        # Prompts that fit the step's budget whole are prefilled together, in one
        # left-padded forward pass (every pass reads all the weights once); a longer
        # one is prefilled alone, a chunk per step.
        budget, together, prefilled = self.prefill_chunk, [], []
        for sequence in self._prefilling:
            remaining = len(sequence.ids) - sequence.prefilled
            if budget <= 0:
                break
            if sequence.cache is None and remaining <= budget:
                together.append(sequence)
            else:
                prefilled += self._prefill_chunk(sequence, min(budget, remaining))
            budget -= remaining
        if together:
            prefilled.append(self._prefill_together(together))
        # Rows already done (a first token that ended them) leave at the next step.
        for group in prefilled:
            self._batch.join(group)

    def _prefill_chunk(self, sequence: Sequence, size: int) -> list[_Group]:
        if sequence.cache is None:
            sequence.cache = Cache(layer_class_to_replicate=_GrowingLayer)
        chunk = sequence.ids[sequence.prefilled : sequence.prefilled + size]
        out = self._model(
            input_ids=torch.tensor([chunk], device=self._device),
            past_key_values=sequence.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        sequence.prefilled += size
        if sequence.prefilled < len(sequence.ids):
            return []
        _sample([sequence], out.logits[:, -1])
        mask = torch.ones((1, len(sequence.ids)), dtype=torch.long, device=self._device)
        group, sequence.cache = _Group([sequence], sequence.cache, mask), None
        return [group]

    def _prefill_together(self, sequences: list[Sequence]) -> _Group:
        width = max(len(s.ids) for s in sequences)
        ids = torch.tensor(
            [[0] * (width - len(s.ids)) + s.ids for s in sequences], device=self._device
        )
        mask = torch.tensor(
            [[0] * (width - len(s.ids)) + [1] * len(s.ids) for s in sequences],
            device=self._device,
        )
        cache = Cache(layer_class_to_replicate=_GrowingLayer)
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        _sample(sequences, out.logits[:, -1])
        for sequence in sequences:
            sequence.prefilled = len(sequence.ids)
        return _Group(sequences, cache, mask)


def _sample(sequences: list[Sequence], logits: torch.Tensor) -> None:
    """Each sequence's next token from its row of ``logits``, by its own sampler."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # one op for the whole batch
    for sequence, row, row_logprobs in zip(sequences, logits, logprobs, strict=True):
        sequence.sampled = sequence.sample(row, row_logprobs)
        sequence.last = sequence.sampled[0]


@dataclass(frozen=True, slots=True)
class _Group:
    """Sequences prefilled together: their cache rows and attention mask."""

    rows: list[Sequence]
    cache: Cache
    mask: torch.Tensor


class _Batch:
    """The running sequences and their shared, left-padded KV cache, a row each.

    A sequence that ends frees its row, and a joining one is written into a free
    row where it fits, so steady churn copies only the newcomers' cache, not the
    batch's. Free rows still ride along in the decode step (a row's worth of
    compute, less than a copy of the cache); the cache is compacted, free rows
    dropped and all-padding columns cut, once a quarter of its rows or half its
    columns are waste (measured: waiting for half the rows to be free made the
    draining batch at the end of a burst carry dead rows for ~100 steps).
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._empty()

    def _empty(self) -> None:
        self.slots: list[Sequence | None] = []
        self.cache: Cache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self._device)
        self.positions = torch.zeros((0,), dtype=torch.long, device=self._device)

    @property
    def rows(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def live(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def decode_inputs(self) -> dict[str, Any]:
        ones = torch.ones((len(self.slots), 1), dtype=self.mask.dtype, device=self._device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        last = [[s.last if s is not None else 0] for s in self.slots]
        return {
            "input_ids": torch.tensor(last, device=self._device),
            "attention_mask": self.mask,
            "position_ids": self.positions.unsqueeze(1),
            "past_key_values": self.cache,
        }

    def stepped(self) -> None:
        self.positions = self.positions + 1

    def leave(self) -> None:
        """Free the rows of sequences that are done."""
        for i, sequence in enumerate(self.slots):
            if sequence is not None and sequence.done:
                self.slots[i] = None
                self.mask[i] = 0
                self.positions[i] = 0
        live = self.live()
        if not live:
            self._empty()
            return
        # Columns that are padding in every live row: the past of departed sequences.
        start = int(self.mask[live].any(dim=0).nonzero()[0])
        if 4 * (len(self.slots) - len(live)) >= len(self.slots) or 2 * start >= self.mask.shape[1]:
            index = torch.tensor(live, device=self._device)
            assert self.cache is not None
            for layer in _layers(self.cache):
                keys, values = layer.contents()
                layer.set(keys[index, :, start:], values[index, :, start:])
            self.mask = self.mask[index, start:]
            self.positions = self.positions[index]
            self.slots = [self.slots[i] for i in live]

    def join(self, group: _Group) -> None:
        lengths = torch.tensor([len(s.ids) for s in group.rows], device=self._device)
        if not self.slots:
            self.cache = group.cache
            self.mask, self.positions, self.slots = group.mask, lengths, list(group.rows)
            return
        assert self.cache is not None
        width, theirs = self.mask.shape[1], group.mask.shape[1]
        free = [i for i, s in enumerate(self.slots) if s is None]
        placed = min(len(free), len(group.rows)) if theirs <= width else 0
        if placed:  # into free rows, right-aligned like every row
            index = torch.tensor(free[:placed], device=self._device)
            for mine, new in zip(_layers(self.cache), _layers(group.cache), strict=True):
                for old, added in zip(mine.contents(), new.contents(), strict=True):
                    old[index, :, : width - theirs] = 0
                    old[index, :, width - theirs :] = added[:placed]
            self.mask[index] = _pad_left(group.mask[:placed], width)
            self.positions[index] = lengths[:placed]
            for slot, sequence in zip(free, group.rows[:placed], strict=False):
                self.slots[slot] = sequence
        if placed == len(group.rows):
            return
        width = max(width, theirs)  # the rest: new rows at the bottom
        for mine, new in zip(_layers(self.cache), _layers(group.cache), strict=True):
            mine.set(
                *(
                    torch.cat([_pad_left(old, width), _pad_left(added[placed:], width)])
                    for old, added in zip(mine.contents(), new.contents(), strict=True)
                )
            )
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(group.mask[placed:], width)])
        self.positions = torch.cat([self.positions, lengths[placed:]])
        self.slots += group.rows[placed:]


class _GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # transformers is untyped here
    """A KV cache layer that appends into spare room instead of concatenating:
    transformers' DynamicLayer copies the whole layer on every decode step."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.set(key_states, value_states)
            return self.contents()
        keys, values = self.contents()
        used, added = keys.shape[-2], key_states.shape[-2]
        if used + added > self._room_k.shape[-2]:
            self.set(keys, values, room=max(used + added, 2 * used) - used)
        self._room_k[..., used : used + added, :] = key_states
        self._room_v[..., used : used + added, :] = value_states
        self.keys = self._room_k[..., : used + added, :]
        self.values = self._room_v[..., : used + added, :]
        return self.contents()

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None, "an empty cache layer"
        return self.keys, self.values

    def set(self, keys: torch.Tensor, values: torch.Tensor, *, room: int = 64) -> None:
        """Replace the contents, with ``room`` spare positions to grow into."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        shape = (*keys.shape[:-2], keys.shape[-2] + room, keys.shape[-1])
        self._room_k = keys.new_empty(shape)
        self._room_v = values.new_empty(shape)
        used = keys.shape[-2]
        self._room_k[..., :used, :] = keys
        self._room_v[..., :used, :] = values
        self.keys = self._room_k[..., :used, :]
        self.values = self._room_v[..., :used, :]


def _layers(cache: Cache) -> list[_GrowingLayer]:
    return cache.layers  # type: ignore[return-value]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence dimension (-2 for KV tensors [B, H, L, D], -1 for masks) with
    zeros on the left up to ``width``."""
    dim = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
