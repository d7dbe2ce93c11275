"""The generation engine: prompt -> token steps, with per-request sampling, stop
strings and incremental detokenization.

Every `generate()` call is one sequence in a continuously batched scheduler
(`batching.py`): it joins the running batch when admitted and leaves it when it
ends, while the others go on. Forward passes run on the compute thread, so the
event loop keeps publishing and polling while the model computes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import torch

from schemas import FinishReason, GenerationRequest, SamplingParams
from tokenbus.bus.tasks import cancel_and_wait

from .batching import Scheduler
from .models import LoadedModel
from .text import IncrementalDetokenizer, StopMatcher


class PromptError(ValueError):
    """The request cannot be turned into a prompt for this model."""

    def __init__(self, message: str, *, too_long: bool = False) -> None:
        super().__init__(message)
        self.too_long = too_long


@dataclass(frozen=True, slots=True)
class Step:
    """One published unit: a token (or, at the end, held-back text) and, on the
    last step, why generation ended."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprob: float | None = None
    finish_reason: FinishReason | None = None


class Sampler:
    """Temperature (> 0), top-k, top-p. A seeded request draws from its own
    generator, so it is reproducible. Greedy requests (temperature 0) have none:
    the scheduler picks their tokens, all in one op."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self._params = params
        self._generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self._generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, logprobs: torch.Tensor) -> tuple[int, float]:
        p = self._params
        scores = logits.float() / p.temperature
        if p.top_k is not None and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # drop a token once the ones before it already cover top_p (keep the first)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self._generator))
        return token, float(logprobs[token])


class GenerationEngine:
    """Generates for many requests at once; run it with ``async with engine:``.

    ``max_batch`` sequences and ``max_batch_tokens`` tokens of KV cache at most;
    prompts are prefilled ``prefill_chunk`` tokens per scheduler iteration.
    ``ignore_eos`` is for benchmarks that need outputs of a chosen length.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch: int = 32,
        max_batch_tokens: int = 32_768,
        prefill_chunk: int = 256,
        ignore_eos: bool = False,
    ) -> None:
        self.loaded = loaded
        self._tokenizer = loaded.tokenizer
        self._eos = frozenset() if ignore_eos else _eos_ids(loaded)
        self.scheduler = Scheduler(
            loaded.model,
            loaded.device,
            max_batch=max_batch,
            max_batch_tokens=max_batch_tokens,
            prefill_chunk=prefill_chunk,
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> GenerationEngine:
        self._task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        await cancel_and_wait(self._task)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        tokenizer = self._tokenizer
        if request.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise PromptError(f"model {self.loaded.name} has no chat template; send 'prompt'")
            text = tokenizer.apply_chat_template(
                [m.model_dump() for m in request.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(request.prompt)["input_ids"]
        needed = len(ids) + request.sampling.max_tokens
        if needed > self.loaded.max_context:
            raise PromptError(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.sampling.max_tokens}) exceeds "
                f"the model's context of {self.loaded.max_context} tokens",
                too_long=True,
            )
        return list(ids)

    async def generate(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        *,
        resumed: list[int] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> AsyncGenerator[Step]:
        """Yield a step per generated token; the last step carries finish_reason.

        The end-of-sequence token is not yielded (it is not part of the text).
        Text held back at the end (half a character, a possible stop prefix that
        never completed) comes in a final step with no token ids.

        ``resumed``: token ids another worker already published for this request.
        They are prefilled with the prompt and never sampled again; replaying them
        through the detokenizer and stop matcher restores exactly the text state
        they left, so the next step continues the stream where it stopped.
        """
        params = request.sampling
        detokenizer = IncrementalDetokenizer(self._tokenizer)
        stops = StopMatcher(params.stop)
        resumed = resumed or []
        for token in resumed:
            stops.feed(detokenizer.push(token))  # already published: rebuild state only
        if stops.stopped or len(resumed) >= params.max_tokens:
            reason = FinishReason.STOP if stops.stopped else FinishReason.LENGTH
            yield Step(text=stops.feed(detokenizer.flush()) + stops.flush(), finish_reason=reason)
            return

        sequence = self.scheduler.submit(
            prompt_ids + resumed,
            Sampler(params, self.loaded.device) if params.temperature > 0 else None,
            max_new=params.max_tokens - len(resumed),
            stop_ids=self._eos,
        )
        try:
            for produced in range(len(resumed) + 1, params.max_tokens + 1):
                if should_stop():
                    yield Step(text=stops.flush(), finish_reason=FinishReason.CANCELLED)
                    return
                token, logprob = await sequence.next()
                if token in self._eos:
                    yield Step(
                        text=stops.feed(detokenizer.flush()) + stops.flush(),
                        finish_reason=FinishReason.STOP,
                    )
                    return
                text = stops.feed(detokenizer.push(token))
                if stops.stopped:
                    yield Step(text, [token], logprob, FinishReason.STOP)
                    return
                if produced == params.max_tokens:
                    tail = stops.feed(detokenizer.flush()) + stops.flush()
                    yield Step(text + tail, [token], logprob, FinishReason.LENGTH)
                    return
                yield Step(text, [token], logprob)
        finally:
            self.scheduler.release(sequence)


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    configured = loaded.model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return frozenset(ids)
