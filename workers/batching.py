"""Continuous batching: iteration-level scheduling, as in Orca and vLLM.

Sequences join and leave the running batch at every decode step. One iteration
of the scheduler is

    1. drop the sequences that finished or were released since the last one;
    2. admit waiting sequences, first come first served, while the caps allow
       (``max_batch`` sequences, ``max_batch_tokens`` tokens of KV cache);
    3. in a worker thread: one decode step for the whole running batch, then
       prefill chunks of admitted sequences, at most ``prefill_chunk`` prompt
       tokens per iteration. A long prompt is prefilled over several iterations,
       so it delays everyone's next token by one chunk, not by the whole prompt;
    4. deliver each sampled token to its sequence's queue; a sequence whose
       prefill completed joins the batch for the next decode step.

The running batch shares one KV cache, left-padded to a common length, with an
attention mask over the padding and explicit position ids per row. Rows are
added and removed only when membership changes; a decode step writes one column
in place (`_GrowingLayer`), where transformers' DynamicCache would copy the
whole cache with ``torch.cat`` at every step.

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

Sample = Callable[[torch.Tensor], tuple[int, float]]


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
    cache: Cache | None = None  # its own, until prefill completes and it joins the batch
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
        return len(self._prefilling) + len(self._batch.rows)

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
        self._batch.keep([s for s in self._batch.rows if not s.done])

    def _admit(self) -> None:
        reserved = sum(s.budget for s in self._prefilling) + sum(s.budget for s in self._batch.rows)
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
        joined = [s for s in self._prefilling if s.prefilled == len(s.ids)]
        self._prefilling = [s for s in self._prefilling if s.prefilled < len(s.ids)]
        for sequence in joined:
            if not sequence.done:
                self._batch.join(sequence)

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

    @torch.inference_mode()
    def _iterate(self) -> None:
        rows = self._batch.rows
        if rows:
            logits = self._model(**self._batch.decode_inputs(), use_cache=True).logits[:, -1]
            for sequence, row in zip(rows, logits, strict=True):
                sequence.sampled = sequence.sample(row)
                sequence.last = sequence.sampled[0]
            self._batch.stepped()
        budget = self.prefill_chunk
        for sequence in self._prefilling:
            if budget <= 0:
                break
            chunk = sequence.ids[sequence.prefilled : sequence.prefilled + budget]
            if sequence.cache is None:
                sequence.cache = Cache(layer_class_to_replicate=_GrowingLayer)
            out = self._model(
                input_ids=torch.tensor([chunk], device=self._device),
                past_key_values=sequence.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            sequence.prefilled += len(chunk)
            budget -= len(chunk)
            if sequence.prefilled == len(sequence.ids):
                sequence.sampled = sequence.sample(out.logits[0, -1])
                sequence.last = sequence.sampled[0]


class _Batch:
    """The running sequences and their shared, left-padded KV cache."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._empty()

    def _empty(self) -> None:
        self.rows: list[Sequence] = []
        self.cache: Cache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self._device)
        self.positions = torch.zeros((0,), dtype=torch.long, device=self._device)

    def decode_inputs(self) -> dict[str, Any]:
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self._device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return {
            "input_ids": torch.tensor([[s.last] for s in self.rows], device=self._device),
            "attention_mask": self.mask,
            "position_ids": self.positions.unsqueeze(1),
            "past_key_values": self.cache,
        }

    def stepped(self) -> None:
        self.positions = self.positions + 1

    def join(self, sequence: Sequence) -> None:
        assert sequence.cache is not None
        layers = _layers(sequence.cache)
        sequence.cache = None
        length = len(sequence.ids)
        if not self.rows:
            self.cache = Cache(layers=layers)  # type: ignore[arg-type]
            self.mask = torch.ones((1, length), dtype=torch.long, device=self._device)
        else:
            assert self.cache is not None
            width = max(self.mask.shape[1], length)
            for mine, theirs in zip(_layers(self.cache), layers, strict=True):
                mine.set(
                    *(
                        torch.cat([_pad_left(a, width), _pad_left(b, width)])
                        for a, b in zip(mine.contents(), theirs.contents(), strict=True)
                    )
                )
            row = torch.ones((1, length), dtype=self.mask.dtype, device=self._device)
            self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(row, width)])
        self.rows.append(sequence)
        self.positions = torch.cat(
            [self.positions, torch.tensor([length], dtype=torch.long, device=self._device)]
        )

    def keep(self, rows: list[Sequence]) -> None:
        if len(rows) == len(self.rows):
            return
        if not rows:
            self._empty()
            return
        index = torch.tensor([self.rows.index(s) for s in rows], device=self._device)
        mask = self.mask[index]
        # Columns that are padding in every remaining row (the departed longest
        # sequence's past) are cut, so they cost no attention from here on.
        start = int(mask.any(dim=0).nonzero()[0])
        assert self.cache is not None
        for layer in _layers(self.cache):
            keys, values = layer.contents()
            layer.set(keys[index, :, start:], values[index, :, start:])
        self.mask = mask[:, start:]
        self.positions = self.positions[index]
        self.rows = rows


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
