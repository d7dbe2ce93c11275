"""The continuously batched engine with the real SmolLM2: what it generates for a
sequence does not depend on which others share the batch, or when they come and go."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas import FinishReason, GenerationRequest, uuid7
from workers import GenerationEngine, LoadedModel
from workers.batching import laid_out, size_class
from workers.engine import Step
from workers.sequence import Sequence

from .conftest import generate_alone

PROMPTS = [
    "Hi",
    "Write a long story about a dragon who loves tea and lives in the mountains above a "
    "small village, where the villagers bring it cakes every spring.",
    "1 2 3 4 5",
    "What is the capital of France? Answer:",
    "The quick brown fox",
    "Les fleurs du jardin sont",
    "def fibonacci(n):",
    "Once upon a time",
]


def request(prompt: str, max_tokens: int, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid7(),
        prompt=prompt,
        submitted_at=datetime.now(UTC),
        sampling={"max_tokens": max_tokens, "temperature": 0, **sampling},
    )


def plain_generate(model: LoadedModel, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' own generate, one sequence alone, up to its end-of-sequence."""
    tokens = generate_alone(model, ids, max_tokens)
    eos = model.tokenizer.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


async def steps_of(
    engine: GenerationEngine, req: GenerationRequest, started: asyncio.Event | None = None
) -> list[Step]:
    steps = []
    async for step in engine.generate(req, engine.prompt_ids(req)):
        steps.append(step)
        if started is not None:
            started.set()
    return steps


def token_ids(steps: list[Step]) -> list[int]:
    return [token for step in steps for token in step.token_ids]


async def test_greedy_output_equals_plain_generate_while_sequences_come_and_go(
    smollm: LoadedModel,
) -> None:
    # A small prefill chunk, so the long prompt is prefilled over several steps
    # while the others decode; each sequence arrives once the previous one has
    # produced a token, and they have different lengths, so they also leave apart.
    requests = [request(p, max_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    async with GenerationEngine(smollm, prefill_chunk=8) as engine:
        tasks = []
        for req in requests:
            started = asyncio.Event()
            tasks.append(asyncio.create_task(steps_of(engine, req, started)))
            await started.wait()
        results = await asyncio.gather(*tasks)

    for req, steps in zip(requests, results, strict=True):
        expected = plain_generate(smollm, engine.prompt_ids(req), req.sampling.max_tokens)
        assert token_ids(steps) == expected, req.prompt
        assert steps[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


async def test_prompts_prefilled_together_generate_what_each_does_alone(
    smollm: LoadedModel,
) -> None:
    # Arriving at once, the prompts (of different lengths) are prefilled in one
    # packed pass, then decoded together.
    requests = [request(p, max_tokens=12) for p in PROMPTS]
    async with GenerationEngine(smollm) as engine:
        results = await asyncio.gather(*(steps_of(engine, r) for r in requests))
    for req, steps in zip(requests, results, strict=True):
        expected = plain_generate(smollm, engine.prompt_ids(req), 12)
        assert token_ids(steps) == expected, req.prompt


async def test_a_newcomer_is_prefilled_in_the_same_forward_pass_as_the_decoding(
    smollm: LoadedModel,
) -> None:
    first, second = request(PROMPTS[1], max_tokens=24), request(PROMPTS[3], max_tokens=8)
    async with GenerationEngine(smollm, ignore_eos=True) as engine:
        model, steps = engine.scheduler._model, []

        def recording(**inputs: Any) -> Any:
            steps.append(inputs["input_ids"].shape[1])
            return model(**inputs)

        engine.scheduler._model = recording
        started = asyncio.Event()
        running = asyncio.create_task(steps_of(engine, first, started))
        await started.wait()
        joined = await steps_of(engine, second)
        alone = await running
    second_prompt = len(engine.prompt_ids(second))
    # One token of the decoding sequence and the newcomer's whole prompt, packed:
    # no step of the newcomer's prompt alone.
    assert 1 + second_prompt in steps
    assert second_prompt not in steps
    for req, result in [(first, alone), (second, joined)]:
        expected = plain_generate(smollm, engine.prompt_ids(req), req.sampling.max_tokens)
        assert token_ids(result)[: len(expected)] == expected


async def test_rows_freed_by_finished_sequences_are_reused_without_a_trace(
    smollm: LoadedModel,
) -> None:
    # Four rows for eight requests of different lengths: newcomers take over the
    # rows (and cache) of sequences that ended, while the others go on decoding.
    requests = [request(p, max_tokens=3 + (5 * i) % 14) for i, p in enumerate(PROMPTS)]
    async with GenerationEngine(smollm, max_batch=4, ignore_eos=True) as engine:
        results = await asyncio.gather(*(steps_of(engine, r) for r in requests))
    for req, steps in zip(requests, results, strict=True):
        expected = plain_generate(smollm, engine.prompt_ids(req), req.sampling.max_tokens)
        assert token_ids(steps)[: len(expected)] == expected, req.prompt


async def test_a_seeded_request_samples_the_same_alone_and_in_a_batch(
    smollm: LoadedModel,
) -> None:
    seeded = request("Tell me about the moon.", max_tokens=16, temperature=0.9, seed=1234)
    async with GenerationEngine(smollm) as engine:
        alone = await steps_of(engine, seeded)
        others = [request(p, max_tokens=12, temperature=1.0) for p in PROMPTS]
        together = await asyncio.gather(
            steps_of(engine, seeded), *(steps_of(engine, r) for r in others)
        )
    assert token_ids(alone) == token_ids(together[0])
    assert len(token_ids(alone)) >= 8  # a real sample, not an early end-of-sequence


@pytest.mark.parametrize(
    ("caps", "most"),
    [({"max_batch": 3}, 3), ({"max_batch_tokens": 2 * 40}, 2)],
    ids=["sequences", "tokens"],
)
async def test_the_batch_never_exceeds_its_caps(
    smollm: LoadedModel, caps: dict[str, int], most: int
) -> None:
    # Every request reserves prompt (~5-8 tokens) + 30 tokens, so two fit in 80.
    requests = [request(p, max_tokens=30) for p in PROMPTS[2:8]]
    async with GenerationEngine(smollm, ignore_eos=True, **caps) as engine:
        seen: list[int] = []

        async def run(req: GenerationRequest) -> list[Step]:
            steps = []
            async for step in engine.generate(req, engine.prompt_ids(req)):
                seen.append(engine.scheduler.in_flight)
                steps.append(step)
            return steps

        results = await asyncio.gather(*(run(r) for r in requests))
    assert max(seen) == most
    assert all(len(token_ids(steps)) == 30 for steps in results)


async def test_the_token_cap_counts_every_row_as_long_as_the_longest_of_its_class(
    smollm: LoadedModel,
) -> None:
    # One long budget (prompt ~30 + 60) among short ones (~10 + 5), all of one size
    # class: counted as the rows are laid out, two fit in 200 positions while the
    # long one runs; summing budgets would have let in seven.
    long = request(PROMPTS[1], max_tokens=60)
    short = [request(p, max_tokens=5) for p in PROMPTS[2:8]]
    async with GenerationEngine(smollm, ignore_eos=True, max_batch_tokens=200) as engine:
        longest = budget_of(engine, long)
        alongside, _, results = await beside_a_long_one(engine, long, short)
    assert 200 // longest == 2
    assert max(alongside) == 2
    assert all(len(token_ids(steps)) == 5 for steps in results)


LONG_PROMPT = PROMPTS[1] * 10  # ~300 tokens: with its output, a size class above the others'


async def test_sequences_of_two_size_classes_decode_in_one_pass_as_each_does_alone(
    smollm: LoadedModel,
) -> None:
    long = request(LONG_PROMPT, max_tokens=12)
    short = [request(p, max_tokens=12) for p in PROMPTS[2:6]]
    async with GenerationEngine(smollm, ignore_eos=True) as engine:
        assert size_class(budget_of(engine, long)) == 512
        assert {size_class(budget_of(engine, r)) for r in short} == {256}
        model, steps = engine.scheduler._model, []

        def recording(*args: Any, **kwargs: Any) -> Any:
            steps.append(kwargs["input_ids"].shape[1])
            return model(*args, **kwargs)

        engine.scheduler._model = recording
        results = await asyncio.gather(*(steps_of(engine, r) for r in [long, *short]))
    # Once everyone has been prefilled, each step decodes all five in one pass.
    assert steps.count(5) == 11  # once all five are prefilled: 11 more tokens each
    for req, result in zip([long, *short], results, strict=True):
        expected = plain_generate(smollm, engine.prompt_ids(req), 12)
        assert token_ids(result)[: len(expected)] == expected, str(req.prompt)[:20]


async def test_a_prompt_longer_than_a_chunk_alone_is_prefilled_over_several_steps(
    smollm: LoadedModel,
) -> None:
    # Its first steps sample nothing (regression: they used to fail the request).
    long = request(LONG_PROMPT, max_tokens=8)
    async with GenerationEngine(smollm, prefill_chunk=64) as engine:
        assert len(engine.prompt_ids(long)) > 3 * 64
        result = await steps_of(engine, long)
    assert token_ids(result) == plain_generate(smollm, engine.prompt_ids(long), 8)


def budget_of(engine: GenerationEngine, req: GenerationRequest) -> int:
    return len(engine.prompt_ids(req)) + req.sampling.max_tokens


async def beside_a_long_one(
    engine: GenerationEngine, long: GenerationRequest, short: list[GenerationRequest]
) -> tuple[list[int], list[int], list[list[Step]]]:
    """Run ``long``, then ``short`` once it has begun. Returns the sequences in flight
    and the KV positions reserved, seen at each short step while the long one ran,
    and the short requests' steps."""
    scheduler = engine.scheduler
    alongside: list[int] = []
    reserved: list[int] = []

    async def run(req: GenerationRequest) -> list[Step]:
        steps = []
        async for step in engine.generate(req, engine.prompt_ids(req)):
            if not first.done():
                alongside.append(scheduler.in_flight)
                reserved.append(scheduler.reserved_positions)
            steps.append(step)
        return steps

    started = asyncio.Event()
    first = asyncio.create_task(steps_of(engine, long, started))
    await started.wait()
    results = await asyncio.gather(*(run(r) for r in short))
    await first
    return alongside, reserved, results


async def test_short_sequences_beside_a_long_one_are_counted_in_their_own_class(
    smollm: LoadedModel,
) -> None:
    # A long budget (~300 + 40, class 512) and short ones (~5 + 5, class 256): with a
    # cap of the long one's budget plus four short ones, four run beside it. Were
    # every row as long as the longest, none would.
    long = request(LONG_PROMPT, max_tokens=40)
    short = [request(PROMPTS[2], max_tokens=5) for _ in range(6)]
    probe = GenerationEngine(smollm)
    longest, each = budget_of(probe, long), budget_of(probe, short[0])
    cap = longest + 4 * each
    assert cap // longest == 1
    async with GenerationEngine(smollm, ignore_eos=True, max_batch_tokens=cap) as engine:
        alongside, reserved, results = await beside_a_long_one(engine, long, short)
    assert max(reserved) <= cap
    assert max(alongside) == 1 + 4
    assert all(len(token_ids(steps)) == 5 for steps in results)


async def test_a_sequence_that_stops_early_leaves_the_others_unchanged(
    smollm: LoadedModel,
) -> None:
    requests = [request(p, max_tokens=20) for p in PROMPTS[:4]]
    cancelled = request(PROMPTS[4], max_tokens=200)
    async with GenerationEngine(smollm, ignore_eos=True) as engine:
        produced = 0

        def stop_after_five() -> bool:
            return produced >= 5

        async def run_cancelled() -> list[Step]:
            nonlocal produced
            steps = []
            prompt = engine.prompt_ids(cancelled)
            async for step in engine.generate(cancelled, prompt, should_stop=stop_after_five):
                produced += len(step.token_ids)
                steps.append(step)
            return steps

        stopped, *results = await asyncio.gather(
            run_cancelled(), *(steps_of(engine, r) for r in requests)
        )
        assert engine.scheduler.in_flight == 0
    assert stopped[-1].finish_reason == FinishReason.CANCELLED
    assert len(token_ids(stopped)) == 5
    for req, steps in zip(requests, results, strict=True):
        tokens = token_ids(steps)
        assert len(tokens) == 20
        expected = plain_generate(smollm, engine.prompt_ids(req), 20)
        assert tokens[: len(expected)] == expected


async def test_resumed_tokens_are_prefilled_not_generated_again(smollm: LoadedModel) -> None:
    req = request("Write one sentence about rivers.", max_tokens=16)
    async with GenerationEngine(smollm) as engine:
        ids = engine.prompt_ids(req)
        whole = token_ids(await steps_of(engine, req))
        steps = [s async for s in engine.generate(req, ids, resumed=whole[:7])]
    assert whole[:7] + token_ids(steps) == whole


async def test_a_step_that_fails_fails_only_the_sequences_that_fail_alone(
    smollm: LoadedModel,
) -> None:
    good = [request(p, max_tokens=12) for p in PROMPTS[2:5]]
    bad = request("Zebras juggle xylophones", max_tokens=12)
    async with GenerationEngine(smollm) as engine:
        model, marker = engine.scheduler._model, engine.prompt_ids(bad)[-1]
        assert all(marker not in engine.prompt_ids(r) for r in good)
        passes: list[int] = []

        def fails_with_the_marker(**inputs: Any) -> Any:
            passes.append(inputs["input_ids"].shape[1])
            if marker in inputs["input_ids"][0].tolist():
                raise RuntimeError("injected failure")
            return model(**inputs)

        engine.scheduler._model = fails_with_the_marker
        results = await asyncio.gather(
            *(steps_of(engine, r) for r in [*good, bad]), return_exceptions=True
        )
        after = await steps_of(engine, request("Hi there", max_tokens=10))  # goes on
        assert engine.scheduler.in_flight == 0
    *fine, failed = results
    assert isinstance(failed, RuntimeError) and "injected failure" in str(failed)
    # The batch mates went on as if the bad one had never been there.
    for req, steps in zip(good, fine, strict=True):
        assert not isinstance(steps, BaseException)
        assert token_ids(steps) == plain_generate(smollm, engine.prompt_ids(req), 12)
    assert after[-1].finish_reason is not None
    assert sum(len(engine.prompt_ids(r)) for r in [*good, bad]) in passes  # packed first


async def test_a_sampler_that_fails_fails_only_its_sequence(smollm: LoadedModel) -> None:
    good, bad = request(PROMPTS[3], max_tokens=8), request(PROMPTS[4], max_tokens=8)
    async with GenerationEngine(smollm) as engine:
        real = engine.scheduler.submit

        def submit(ids: list[int], sample: Any, **kwargs: Any) -> Any:
            if ids == engine.prompt_ids(bad):

                def sample(logits: Any, logprobs: Any) -> Any:
                    raise ValueError("injected sampler failure")

            return real(ids, sample, **kwargs)

        engine.scheduler.submit = submit  # type: ignore[method-assign]
        done, failed = await asyncio.gather(
            steps_of(engine, good), steps_of(engine, bad), return_exceptions=True
        )
    assert isinstance(failed, ValueError)
    assert not isinstance(done, BaseException)
    assert token_ids(done) == plain_generate(smollm, engine.prompt_ids(good), 8)


def test_size_classes_are_powers_of_two_from_256() -> None:
    assert [size_class(b) for b in (1, 256, 257, 512, 513, 5000)] == [
        256,
        256,
        512,
        512,
        1024,
        8192,
    ]


def test_beside_an_8k_budget_the_default_cap_holds_31_ordinary_sequences() -> None:
    # The figure in docs/measured.md: one 8,192-token budget and 31 of 300 tokens (prompt 44 +
    # max_tokens 256) take 8,192 + 31 x 300 positions, within the default 32,768;
    # with every row as long as the longest, 32,768 // 8,192 = 4 sequences in all.
    def of(prompt: int, max_new: int) -> Sequence:
        return Sequence([0] * prompt, None, max_new, frozenset())

    batch = [of(8192 - 256, 256)] + [of(44, 256) for _ in range(31)]
    assert laid_out(batch) == 8192 + 31 * 300 <= 32_768
    assert laid_out([*batch, of(8192 - 256, 256)]) == 2 * 8192 + 31 * 300
