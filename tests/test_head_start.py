"""The model starts on a request before its claim is back (`workers.takeover.HeadStart`):
kept, it gives exactly the tokens a generation begun after the claim would; dropped
(the claim found tokens published already), it gives its place in the batch back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

from schemas import GenerationRequest, SamplingParams, StartedEvent, TokenEvent, uuid7
from workers import GenerationEngine, LoadedModel
from workers.engine import Step
from workers.takeover import HeadStart, Published, steps_after

from .conftest import eventually


def greeting(max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid7(),
        messages=[{"role": "user", "content": "Say hello."}],  # type: ignore[list-item]
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
        submitted_at=datetime.now(UTC),
    )


def claimed(request: GenerationRequest, token_ids: list[list[int]]) -> Published:
    """The stream as a claim finds it: `started`, then a token event per entry."""
    now = datetime.now(UTC)
    base = {"request_id": request.request_id, "worker": "w", "attempt": 1, "ts": now}
    events: list[StartedEvent | TokenEvent] = [
        StartedEvent(**base, seq=0, model="m", model_revision="r", prompt_tokens=1,
                     queue_wait_ms=0),
    ]  # fmt: skip
    for seq, ids in enumerate(token_ids, start=1):
        events.append(TokenEvent(**base, seq=seq, text="x", token_ids=ids))
    return Published(list(events))


async def tokens_of(steps: AsyncIterator[Step]) -> list[int]:
    return [i async for step in steps for i in step.token_ids]


def never() -> bool:
    return False


async def test_a_kept_head_start_gives_the_tokens_of_a_generation_begun_after_the_claim(
    smollm: LoadedModel,
) -> None:
    request = greeting(max_tokens=32)
    async with GenerationEngine(smollm) as engine:
        ids = engine.prompt_ids(request)
        after_claim = await tokens_of(engine.generate(request, ids))
        head_start = HeadStart(engine.generate(request, ids))
        await eventually(lambda: engine.scheduler.in_flight == 1, within=60)  # begun early
        steps = steps_after(claimed(request, []), engine, request, ids, never, head_start)
        assert await tokens_of(steps) == after_claim
        assert engine.scheduler.in_flight == 0 and engine.scheduler.waiting == 0


async def test_a_claim_that_finds_tokens_continues_from_them_and_not_from_the_head_start(
    smollm: LoadedModel,
) -> None:
    request = greeting()
    async with GenerationEngine(smollm) as engine:
        ids = engine.prompt_ids(request)
        whole = await tokens_of(engine.generate(request, ids))
        published = [[whole[0]], [whole[1]]]
        head_start = HeadStart(engine.generate(request, ids))
        steps = steps_after(claimed(request, published), engine, request, ids, never, head_start)
        await head_start.drop()  # as the worker does: before the continuation runs
        assert engine.scheduler.in_flight == 0 and engine.scheduler.waiting == 0
        assert await tokens_of(steps) == whole[2:]


async def test_a_dropped_head_start_gives_its_place_in_the_batch_back_at_any_point(
    smollm: LoadedModel,
) -> None:
    request = greeting(max_tokens=64)
    async with GenerationEngine(smollm) as engine:
        ids = engine.prompt_ids(request)
        before_it_ran = HeadStart(engine.generate(request, ids))
        await before_it_ran.drop()
        prefilling = HeadStart(engine.generate(request, ids))
        await eventually(lambda: engine.scheduler.in_flight == 1, within=60)
        await prefilling.drop()
        assert engine.scheduler.in_flight == 0 and engine.scheduler.waiting == 0
        first_step_out = HeadStart(engine.generate(request, ids))
        steps = first_step_out.steps()
        await anext(steps)
        await steps.aclose()  # the worker stopped it (a revoked partition, say)
        await first_step_out.drop()  # and again, on the way out: harmless
        assert engine.scheduler.in_flight == 0 and engine.scheduler.waiting == 0
