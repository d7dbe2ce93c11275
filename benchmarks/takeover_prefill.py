"""The forward passes a worker taking a request over runs before its first token:
is a slow one the first pass of a new size class or prompt length, or the machine?

    .venv/bin/python benchmarks/takeover_prefill.py

One `GenerationEngine` with SmolLM2 on the CPU, in this process, as a worker runs it
(no broker). Times to the first step for: a short chat prompt (the first pass ever,
then again), the failover benchmark's essay prompt resumed after 10 published tokens
(size class 512, new to the engine; then again; then after 11 tokens), and the
decoding pace after it; then the same after 20 s idle. Writes
benchmarks/results/takeover_prefill.json, with the load averages, since on a shared
machine a starved CPU stretches every pass.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from brokers import load
from worker_failover import ESSAY, WARMUP

from schemas import GenerationRequest, uuid7
from workers import GenerationEngine, load_model

RESULTS = Path(__file__).parent / "results" / "takeover_prefill.json"
IDLE_S = 20.0


def request(messages: list[dict[str, str]], max_tokens: int) -> GenerationRequest:
    return GenerationRequest.model_validate(
        {
            "request_id": uuid7(),
            "messages": messages,
            "sampling": {"max_tokens": max_tokens, "temperature": 0},
            "submitted_at": datetime.now(UTC),
        }
    )


async def first_steps(
    engine: GenerationEngine, req: GenerationRequest, resumed: list[int], steps: int
) -> dict[str, Any]:
    began = time.perf_counter()
    times: list[float] = []
    ids: list[int] = []
    generator = engine.generate(req, engine.prompt_ids(req), resumed=resumed)
    async for step in generator:
        times.append(time.perf_counter())
        ids += step.token_ids
        if len(times) >= steps or step.finish_reason is not None:
            break
    await generator.aclose()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "prefilled_tokens": len(engine.prompt_ids(req)) + len(resumed),
        "first_step_s": round(times[0] - began, 3),
        "decode_step_s_median": round(statistics.median(gaps), 3) if gaps else None,
        "ids": ids,
    }


async def main() -> None:
    load_start = load()
    began = time.perf_counter()
    loaded = load_model(None, device="cpu", cache_dir=Path.home() / ".cache" / "tokenbus")
    load_s = time.perf_counter() - began
    results: dict[str, Any] = {}
    async with GenerationEngine(loaded) as engine:
        short = request(WARMUP, 2)
        results["short_first_ever"] = await first_steps(engine, short, [], 2)
        results["short_again"] = await first_steps(engine, short, [], 2)
        essay = request(ESSAY, 200)
        prefix = (await first_steps(engine, essay, [], 11))["ids"]
        results["essay_fresh_first"] = {"note": "generated the 11-token prefix used below"}
        results["essay_resumed_after_10"] = await first_steps(engine, essay, prefix[:10], 12)
        results["essay_resumed_after_10_again"] = await first_steps(engine, essay, prefix[:10], 2)
        results["essay_resumed_after_11"] = await first_steps(engine, essay, prefix[:11], 2)
        # A worker waits idle before a takeover (its partner generates, then dies, then
        # the session times out): the same passes after as long idle.
        await asyncio.sleep(IDLE_S)
        results[f"essay_resumed_after_10_idle_{IDLE_S:g}s"] = await first_steps(
            engine, essay, prefix[:10], 2
        )
        await asyncio.sleep(IDLE_S)
        results[f"essay_resumed_after_9_idle_{IDLE_S:g}s"] = await first_steps(
            engine, essay, prefix[:9], 2
        )
    for figures in results.values():
        figures.pop("ids", None)
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; shared",
        "model_load_s": round(load_s, 2),
        "load_start": load_start,
        "load_end": load(),
        **results,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
