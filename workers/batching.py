"""Continuous batching: iteration-level scheduling, as in Orca and vLLM.

Sequences join and leave the running batch at every step. One iteration of the
scheduler is

    1. admit waiting sequences, first come first served, while the caps allow
       (``max_batch`` sequences, ``max_batch_tokens`` tokens of KV cache);
    2. on the compute thread (`compute`): free the rows of sequences that
       finished or were released; then one forward pass for everyone: a token for
       each decoding sequence and, up to ``prefill_chunk`` tokens, the next chunk
       of each admitted prompt (a long prompt is prefilled over several steps, so
       it delays everyone's next token by a chunk, not by the whole prompt);
    3. deliver each sampled token to its sequence's queue.

The step's tokens are packed into one flat input, so prefilling a newcomer costs
its tokens' share of a forward pass, not a pass of its own (every pass reads all
the weights). Each sequence's keys and values live in a row of `KVRows`, written
in place; `attention.packed_attention` keeps the sequences apart. A sequence that
joins takes a row freed by one that left, so steady churn copies no cache.

Admission reserves a sequence's whole budget (prompt + every token it may
generate), so a sequence once admitted always runs to its end: nothing is ever
preempted or recomputed. Since every row is as long as the longest, the budgets
are counted as the cache lays them out: sequences times the longest budget of them
stays within ``max_batch_tokens``, which so bounds the cache's memory. A sequence
larger than the token cap is admitted alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import compute
from .attention import ATTENTION, KVRows, Packing, Prefill

log = logging.getLogger(__name__)

# A sequence's sampler: (logits, logprobs) -> (token, logprob). None is greedy: the
# greedy sequences of a step are picked together, in one op and one device sync.
Sample = Callable[[torch.Tensor, torch.Tensor], tuple[int, float]]


class EngineStopped(RuntimeError):
    """The scheduler has stopped; no sequence can be generated any more."""


@dataclass(eq=False)
class Sequence:
    """One request's tokens as the scheduler sees them. The engine reads sampled
    tokens with `next()` and calls `Scheduler.release` when it is done."""

    ids: list[int]  # prefilled: the prompt and any tokens already published
    sample: Sample | None  # None: greedy
    max_new: int  # tokens to generate at most
    stop_ids: frozenset[int]  # after one of these, generating further is pointless
    tokens: asyncio.Queue[tuple[int, float] | BaseException] = field(default_factory=asyncio.Queue)
    cached: int = 0  # tokens in its row of the KV cache
    generated: int = 0
    last: int = -1  # the token the next decode step feeds
    sampled: tuple[int, float] | None = None  # by the last iteration, not yet delivered
    row: int | None = None  # its row of the KV cache, once its prefill has begun
    failure: BaseException | None = None  # its sampler's, by the last iteration
    done: bool = False  # no more tokens will be generated for it

    @property
    def prefilled(self) -> int:
        return min(self.cached, len(self.ids))

    @property
    def budget(self) -> int:
        return len(self.ids) + self.max_new

    async def next(self) -> tuple[int, float]:
        item = await self.tokens.get()
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass
class SchedulerStats:
    """Counts since the scheduler started (the worker's metrics read them)."""

    steps: int = 0  # forward passes for everyone (a failed one included)
    step_seconds: float = 0.0
    failed_steps: int = 0  # forward passes that raised (each then run one sequence at a time)
    prompt_tokens: int = 0  # prefilled
    generated_tokens: int = 0  # sampled and delivered


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
        # Attention over packed steps (attention.py); plain SDPA for anyone else.
        model.set_attn_implementation(ATTENTION)
        self._cache = KVRows(model.config, dtype=model.dtype, device=device)
        self._rows = _Rows(self._cache)
        log.info(
            "batching up to %d sequences; KV cache up to %d positions, %.2f GB "
            "(TOKENBUS_MAX_BATCH_TOKENS; growing by doubling can take up to twice that)",
            max_batch,
            max_batch_tokens,
            max_batch_tokens * self._cache.bytes_per_position / 1e9,
        )
        self._wake = asyncio.Event()
        self._stopped = False
        self.stats = SchedulerStats()

    @property
    def in_flight(self) -> int:
        """Sequences admitted and not done."""
        return sum(not s.done for s in self._admitted())

    @property
    def waiting(self) -> int:
        """Sequences submitted and not yet admitted."""
        return len(self._waiting)

    @property
    def reserved_positions(self) -> int:
        """KV cache positions the sequences in flight may fill, as rows lay them out."""
        budgets = [s.budget for s in self._admitted() if not s.done]
        return len(budgets) * max(budgets, default=0)

    @property
    def allocated_positions(self) -> int:
        """KV cache positions allocated now: rows times capacity."""
        return self._cache.rows * self._cache.capacity

    def _admitted(self) -> list[Sequence]:
        # A prompt being prefilled is in both lists once it has a row.
        return list(dict.fromkeys([*self._prefilling, *self._rows.sequences]))

    def submit(
        self, ids: list[int], sample: Sample | None, *, max_new: int, stop_ids: frozenset[int]
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
        """Schedule until cancelled. A sequence whose step fails is failed, not the
        scheduler, nor the sequences that shared the step with it."""
        try:
            while True:
                self._drop_done()
                self._admit()
                if not self._admitted():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._step()
                self._deliver()
        finally:
            self._stopped = True
            self._fail_all(EngineStopped("the engine stopped"))

    async def _step(self) -> None:
        """One forward pass for everyone. If it raises, each sequence is stepped alone,
        and only those that fail alone are failed: one request's crash is not its
        batch mates'. A failed pass changed nothing a retry does not write again (its
        keys and values go where the retry writes them, and counts move only after
        the pass)."""
        started = time.perf_counter()
        try:
            await compute.run(self._iterate)
            return
        except Exception:
            log.exception("a forward pass failed; stepping its sequences one at a time")
            self.stats.failed_steps += 1
        finally:
            self.stats.steps += 1
            self.stats.step_seconds += time.perf_counter() - started
        survived = False
        for sequence in self._admitted():
            if sequence.done:
                continue
            try:
                await compute.run(self._iterate, sequence)
                survived = True
            except Exception as exc:
                log.exception("a sequence failed its step alone too; failing it")
                sequence.done = True
                sequence.tokens.put_nowait(exc)
        if not survived:
            # Whatever failed may lie in the rows' bookkeeping: start it afresh.
            self._rows = _Rows(self._cache)

    # -- the asyncio side: runs only while no forward pass is in flight ----------

    def _drop_done(self) -> None:
        self._prefilling = [s for s in self._prefilling if not s.done]

    def _admit(self) -> None:
        running = [s.budget for s in self._admitted() if not s.done]
        count, longest = len(running), max(running, default=0)
        while self._waiting and count < self.max_batch:
            head = self._waiting[0]
            # Rows as long as the longest (KVRows): the cache holds count * longest.
            if count and (count + 1) * max(longest, head.budget) > self.max_batch_tokens:
                break  # first come first served: nobody overtakes the head
            self._prefilling.append(self._waiting.popleft())
            count, longest = count + 1, max(longest, head.budget)

    def _deliver(self) -> None:
        for sequence in self._admitted():
            token, sequence.sampled = sequence.sampled, None
            if sequence.failure is not None:
                sequence.done = True
                sequence.tokens.put_nowait(sequence.failure)
                continue
            if token is None:
                continue
            sequence.tokens.put_nowait(token)
            sequence.generated += 1
            self.stats.generated_tokens += 1
            if sequence.generated >= sequence.max_new or token[0] in sequence.stop_ids:
                sequence.done = True
        self._prefilling = [s for s in self._prefilling if s.prefilled < len(s.ids)]

    def _fail_all(self, error: BaseException) -> None:
        """Fail the sequences in flight and the waiting ones."""
        for sequence in self._admitted() + list(self._waiting):
            if not sequence.done:
                sequence.done = True
                sequence.tokens.put_nowait(error)
        self._waiting.clear()
        self._prefilling = []
        self._rows = _Rows(self._cache)

    # -- the compute thread's side ------------------------------------------------

    @torch.inference_mode()  # the cache's tensors are inference tensors: change them only here
    def _iterate(self, only: Sequence | None = None) -> None:
        """One step of every sequence in flight, or of ``only``."""
        self._rows.leave()
        decoding = [s for s in self._rows.sequences if s.cached >= len(s.ids) and only in (None, s)]
        chunks, budget = [], self.prefill_chunk
        for sequence in (s for s in self._prefilling if only in (None, s)):
            if budget <= 0:
                break
            if sequence.row is None:
                self._rows.take(sequence)
            size = min(budget, len(sequence.ids) - sequence.cached)
            chunks.append((sequence, size))
            budget -= size
        prefills, start = [], len(decoding)
        for sequence, size in chunks:
            prefills.append(Prefill(_row(sequence), start, sequence.cached, size))
            start += size
        ids = [s.last for s in decoding]
        for sequence, size in chunks:
            ids += sequence.ids[sequence.cached : sequence.cached + size]
        if not ids:
            return  # everyone left
        columns = [s.cached + 1 for s in decoding] + [s.cached + size for s, size in chunks]
        self._cache.reserve(len(self._rows.slots), max(columns))
        packing = Packing.build(
            self._cache, [(_row(s), s.cached) for s in decoding], prefills, self._device
        )
        # Logits only where a token is sampled: each decoded token, and the last
        # token of each prompt whose prefill ends in this step.
        ending = [
            (s, p)
            for (s, size), p in zip(chunks, prefills, strict=True)
            if s.cached + size == len(s.ids)
        ]
        keep = list(range(len(decoding))) + [p.start + p.length - 1 for _, p in ending]
        logits = self._model(
            input_ids=torch.tensor([ids], device=self._device),
            position_ids=packing.columns.unsqueeze(0),
            use_cache=False,
            logits_to_keep=torch.tensor(keep, device=self._device),
            packing=packing,
        ).logits[0]
        for sequence in decoding:
            sequence.cached += 1
        for sequence, size in chunks:
            sequence.cached += size
            self.stats.prompt_tokens += size
        _sample(decoding + [s for s, _ in ending], logits)


def _row(sequence: Sequence) -> int:
    assert sequence.row is not None, "a sequence in the step holds a row"
    return sequence.row


def _sample(sequences: list[Sequence], logits: torch.Tensor) -> None:
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


class _Rows:
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
