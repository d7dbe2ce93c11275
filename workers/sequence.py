"""One request's tokens as the scheduler (batching.py) sees them.

Its size class is not a property of its own: `batching.size_class` computes it
from the budget, in the module that holds the smallest class (which a benchmark
changes there) and imports this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# A sequence's sampler: (logits, logprobs) -> (token, logprob). None is greedy: the
# greedy sequences of a step are picked together, in one op and one device sync.
Sample = Callable[[torch.Tensor, torch.Tensor], tuple[int, float]]


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
    row: int | None = None  # its row of its class's cache, once its prefill has begun
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
