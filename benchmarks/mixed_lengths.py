"""Short requests beside a long one: how many run at once, and how fast, with the
KV cache in size classes (the engine as it is) and with one class for everyone
(every row as long as the longest: the engine before size classes), in one run.

    .venv/bin/python benchmarks/mixed_lengths.py [--short 64] [--long-prompt 1500]

The workload: one request with a long prompt (--long-prompt tokens, about) and
--long-tokens to generate, issued first, then --short requests of 1 to 4
sentences with exponentially distributed output lengths (mean 24, as in
worker_throughput.py), in a closed loop with --concurrency in flight in all;
greedy, end-of-sequence ignored. Both layouts run under the default cap
(TOKENBUS_MAX_BATCH_TOKENS, 32,768 positions) and the default batch (32).
Reported per layout: sequences in flight at each step while the long request ran
(mean and most), tokens/s over the whole workload, the short requests' TTFT
p50/p99, and the most KV cache positions allocated.

Writes benchmarks/results/mixed_lengths.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from schemas import GenerationRequest, uuid7
from workers import GenerationEngine, LoadedModel, batching, load_model

RESULTS = Path(__file__).parent / "results" / "mixed_lengths.json"
CACHE = Path.home() / ".cache" / "tokenbus"
TOPICS = ["the sea", "bread", "a clock", "rain", "owls", "a city at night", "tea", "mountains"]


def request(prompt: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid7(),
        prompt=prompt,
        submitted_at=datetime.now(UTC),
        sampling={"max_tokens": max_tokens, "temperature": 0},
    )


def workload(args: argparse.Namespace) -> tuple[GenerationRequest, list[GenerationRequest]]:
    rng = random.Random(0)
    # "Write about the sea. " is 5 tokens in SmolLM2's tokenizer.
    long = request("Write about the sea. " * (args.long_prompt // 5), args.long_tokens)
    short = [
        request(
            f"Write about {TOPICS[i % len(TOPICS)]}. " * (1 + i % 4),
            min(128, max(1, round(rng.expovariate(1 / 24)))),
        )
        for i in range(args.short)
    ]
    return long, short


async def run(
    model: LoadedModel, long: GenerationRequest, short: list[GenerationRequest], concurrency: int
) -> dict[str, Any]:
    async with GenerationEngine(model, ignore_eos=True) as engine:
        scheduler = engine.scheduler
        slots = asyncio.Semaphore(concurrency)
        in_flight: list[int] = []  # at each token of the long request
        most_allocated = 0

        async def one(req: GenerationRequest) -> tuple[int, float]:
            nonlocal most_allocated
            async with slots:
                issued, first, count = time.perf_counter(), 0.0, 0
                async for step in engine.generate(req, engine.prompt_ids(req)):
                    if not first and step.token_ids:
                        first = time.perf_counter() - issued
                    count += len(step.token_ids)
                    most_allocated = max(most_allocated, scheduler.allocated_positions)
                    if req is long:
                        in_flight.append(scheduler.in_flight)
                return count, first

        t0 = time.perf_counter()
        long_task = asyncio.create_task(one(long))
        await asyncio.sleep(0)  # let it take its slot first: it is issued first
        done = await asyncio.gather(*(one(r) for r in short))
        long_tokens, _ = await long_task
        wall = time.perf_counter() - t0
    ttfts = sorted(first for _, first in done)
    return {
        "tokens": long_tokens + sum(c for c, _ in done),
        "wall_s": round(wall, 3),
        "tokens_per_s": round((long_tokens + sum(c for c, _ in done)) / wall, 1),
        "in_flight_beside_long_mean": round(statistics.mean(in_flight), 1),
        "in_flight_beside_long_most": max(in_flight),
        "short_ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
        "short_ttft_p99_ms": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1000, 1),
        "most_kv_positions_allocated": most_allocated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=64)
    parser.add_argument("--long-prompt", type=int, default=1500)
    parser.add_argument("--long-tokens", type=int, default=150)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = parser.parse_args()
    model = load_model(cache_dir=CACHE)
    long, short = workload(args)
    probe = GenerationEngine(model)
    long_budget = len(probe.prompt_ids(long)) + args.long_tokens
    asyncio.run(run(model, request("Write about tea.", 8), short[:8], 8))  # warm up
    layouts: dict[str, Any] = {}
    smallest = batching.SMALLEST_SIZE_CLASS
    # Interleaved, twice each: this machine's speed drifts between runs.
    for round_ in (1, 2):
        for layout, smallest_class in [("size_classes", smallest), ("one_class", 1 << 30)]:
            batching.SMALLEST_SIZE_CLASS = smallest_class  # 2**30: every budget in one class
            result = asyncio.run(run(model, long, short, args.concurrency))
            print(layout, round_, result, flush=True)
            layouts.setdefault(layout, []).append(result)
    batching.SMALLEST_SIZE_CLASS = smallest
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or '?'}",
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "model": model.name,
        "dtype": str(model.model.dtype),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "long_budget": long_budget,
        "short_requests": args.short,
        "concurrency": args.concurrency,
        "max_batch_tokens": probe.scheduler.max_batch_tokens,
        "layouts": layouts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
