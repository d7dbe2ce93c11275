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

Sequences are grouped by budget (prompt + every token it may generate) into size
classes, powers of two from 256, and each class keeps its rows in a `KVRows` of
its own: a row is as long as the longest of its class, not of the batch, so one
long request no longer makes every short one's row as long as its own.

Admission reserves a sequence's whole budget, so a sequence once admitted always
runs to its end: nothing is ever preempted or recomputed. The budgets are counted
as the caches lay them out: the sum over classes of sequences times the longest
budget among them stays within ``max_batch_tokens``, which so bounds the caches'
memory. A sequence larger than the token cap is admitted alone.

The scheduler is here; a sequence is sequence.py, and what a step does on the
compute thread (rows, packing, sampling) is step.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from . import compute
from .attention import ATTENTION, KVRows
from .sequence import Sample, Sequence
from .step import PackedStep, Rows, sample

log = logging.getLogger(__name__)

SMALLEST_SIZE_CLASS = 256  # budgets up to this share one class, and so one cache


def size_class(budget: int) -> int:
    """The class of a sequence with this budget: the power of two that holds it
    (256 at least). Rows of one class differ in length by 2x at most."""
    return max(SMALLEST_SIZE_CLASS, 1 << (budget - 1).bit_length())


class EngineStopped(RuntimeError):
    """The scheduler has stopped; no sequence can be generated any more."""


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
        self._config, self._dtype = model.config, model.dtype
        self._device = device
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefilling: list[Sequence] = []
        # Attention over packed steps (attention.py); plain SDPA for anyone else.
        model.set_attn_implementation(ATTENTION)
        self._classes: dict[int, Rows] = {}  # size class -> its rows and their cache
        log.info(
            "batching up to %d sequences; KV cache up to %d positions, %.2f GB "
            "(TOKENBUS_MAX_BATCH_TOKENS; growing by doubling can take up to twice that)",
            max_batch,
            max_batch_tokens,
            max_batch_tokens * self._new_cache().bytes_per_position / 1e9,
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
        return laid_out(s for s in self._admitted() if not s.done)

    @property
    def allocated_positions(self) -> int:
        """KV cache positions allocated now: rows times capacity, over all classes."""
        return sum(rows.cache.rows * rows.cache.capacity for rows in self._size_classes())

    def _admitted(self) -> list[Sequence]:
        # A prompt being prefilled is in both lists once it has a row.
        held = [s for rows in self._size_classes() for s in rows.sequences]
        return list(dict.fromkeys([*self._prefilling, *held]))

    def _size_classes(self) -> list[Rows]:
        # A copy, taken at once: the compute thread adds and drops classes, and the
        # metrics read them from the event loop's thread at any time.
        return list(self._classes.values())

    def _new_cache(self) -> KVRows:
        return KVRows(self._config, dtype=self._dtype, device=self._device)

    def _rows_of(self, sequence: Sequence) -> Rows:
        size = size_class(sequence.budget)
        rows = self._classes.get(size)
        if rows is None:
            rows = self._classes[size] = Rows(self._new_cache())
        return rows

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
            self._classes = {}

    # -- the asyncio side: runs only while no forward pass is in flight ----------

    def _drop_done(self) -> None:
        self._prefilling = [s for s in self._prefilling if not s.done]

    def _admit(self) -> None:
        running = [s for s in self._admitted() if not s.done]
        while self._waiting and len(running) < self.max_batch:
            head = self._waiting[0]
            # Rows as long as the longest of their class: see laid_out.
            if running and laid_out([*running, head]) > self.max_batch_tokens:
                break  # first come first served: nobody overtakes the head
            self._prefilling.append(self._waiting.popleft())
            running.append(head)

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
        self._classes = {}

    # -- the compute thread's side ------------------------------------------------

    @torch.inference_mode()  # the cache's tensors are inference tensors: change them only here
    def _iterate(self, only: Sequence | None = None) -> None:
        """One step of every sequence in flight, or of ``only``."""
        step = self._lay_out(only)
        if step.ids:  # else everyone left
            self._run(step)

    def _lay_out(self, only: Sequence | None) -> PackedStep:
        """Free the rows of sequences that left, pick the step's prompt chunks (up to
        ``prefill_chunk`` tokens in all, in the order the prompts were admitted) and
        pack the step's tokens, class by class."""
        for size, rows in list(self._classes.items()):
            rows.leave()
            if not rows.slots and not rows.cache.rows:
                del self._classes[size]  # nobody of this size left: let its cache go
        chunks, budget = [], self.prefill_chunk
        for sequence in (s for s in self._prefilling if only in (None, s)):
            if budget <= 0:
                break
            if sequence.row is None:
                self._rows_of(sequence).take(sequence)
            size = min(budget, len(sequence.ids) - sequence.cached)
            chunks.append((sequence, size))
            budget -= size
        step = PackedStep(chunks)
        for size, rows in self._classes.items():
            decoding = [s for s in rows.sequences if s.cached >= len(s.ids) and only in (None, s)]
            prefilling = [(s, n) for s, n in chunks if size_class(s.budget) == size]
            if decoding or prefilling:
                step.add(rows, decoding, prefilling, self._device)
        return step

    def _run(self, step: PackedStep) -> None:
        """The forward pass, then what it moved on: the tokens cached and sampled."""
        # Logits only where a token is sampled: each decoded token, and the last
        # token of each prompt whose prefill ends in this step.
        logits = self._model(
            input_ids=torch.tensor([step.ids], device=self._device),
            position_ids=torch.cat([run.columns for run in step.runs]).unsqueeze(0),
            use_cache=False,
            # long: an empty list (a step of prompt chunks that all go on) is no float
            logits_to_keep=torch.tensor(step.keep, dtype=torch.long, device=self._device),
            packing=tuple(step.runs),
        ).logits[0]
        for sequence in step.decoded:
            sequence.cached += 1
        for sequence, size in step.chunks:
            sequence.cached += size
            self.stats.prompt_tokens += size
        sample(step.sampled, logits)


def laid_out(sequences: Iterable[Sequence]) -> int:
    """KV cache positions ``sequences`` take as their caches lay them out: in each
    size class, as many rows as sequences, each as long as the longest budget."""
    budgets: dict[int, list[int]] = collections.defaultdict(list)
    for sequence in sequences:
        budgets[size_class(sequence.budget)].append(sequence.budget)
    return sum(len(b) * max(b) for b in budgets.values())
