"""Aggregate tokens/s and TTFT of the worker's engine at 1, 8 and 32 concurrent
requests, against sequential `generate` and static padded batching measured in the
same run, and against transformers' own continuous batching manager.

    .venv/bin/python benchmarks/worker_throughput.py [--concurrency 1 8 32] [--device auto]

One workload for every method: --requests prompts of 1 to 4 sentences, with output
lengths drawn from an exponential distribution (mean --mean-tokens, clipped to
1..--max-tokens, fixed seed); end-of-sequence is ignored, so every method does the
same work. "N concurrent" is a closed loop: N requests in flight, the next one
issued when one finishes, so the batch stays full until the workload runs out.
Runs with one request in flight (sequential, and every method at N = 1) take the
first --requests-at-1 requests only: they would take many minutes, and tokens/s is
a rate. TTFT is from a request's issue to its first token.
Decode at batch 1 is also reported against the memory-bandwidth limit: a decode
step reads every weight once, so it cannot take less than weight bytes ÷ memory
bandwidth, the bandwidth measured here as a large tensor copy on the device.
Writes benchmarks/results/worker_throughput.json (or --out).

On a GPU the default concurrencies are 1, 8, 32, 128 and 256, and --requests
defaults to twice the largest, so the batch can stay full.

    engine       tokenbus' GenerationEngine (workers/batching.py): continuous batching
    sequential   transformers' generate, one request after another (N = 1 always)
    static       transformers' generate on N requests at a time, left-padded, each
                 batch running until its longest is done (tokens past a request's
                 own length are not counted)
    hf_cb        transformers' ContinuousBatchingManager (init_continuous_batching),
                 at most N requests per batch; TTFT not measured
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from schemas import GenerationRequest, uuid7
from workers import GenerationEngine, LoadedModel, compute, load_model

RESULTS = Path(__file__).parent / "results" / "worker_throughput.json"
CACHE = Path.home() / ".cache" / "tokenbus"
TOPICS = ["the sea", "bread", "a clock", "rain", "owls", "a city at night", "tea", "mountains"]


def workload(n: int, mean: float, most: int, seed: int) -> list[tuple[str, int]]:
    """n prompts of 1..4 sentences, each with an exponentially distributed length."""
    rng = random.Random(seed)
    return [
        (
            f"Write about {TOPICS[i % len(TOPICS)]}. " * (1 + i % 4),
            min(most, max(1, round(rng.expovariate(1 / mean)))),
        )
        for i in range(n)
    ]


def summary(tokens: int, wall: float, ttfts: list[float]) -> dict[str, float]:
    ttfts = sorted(ttfts)
    return {
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
        "ttft_p99_ms": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1000, 1),
    }


async def run_engine(
    model: LoadedModel, work: list[tuple[str, int]], concurrency: int
) -> dict[str, float]:
    slots = asyncio.Semaphore(concurrency)
    async with GenerationEngine(model, ignore_eos=True) as engine:
        requests = [
            GenerationRequest(
                request_id=uuid7(),
                prompt=prompt,
                submitted_at=datetime.now(UTC),
                sampling={"max_tokens": n, "temperature": 0},
            )
            for prompt, n in work
        ]
        ids = [engine.prompt_ids(r) for r in requests]
        t0 = time.perf_counter()

        async def one(request: GenerationRequest, prompt: list[int]) -> tuple[int, float]:
            async with slots:
                issued, first, count = time.perf_counter(), 0.0, 0
                async for step in engine.generate(request, prompt):
                    if not first and step.token_ids:
                        first = time.perf_counter() - issued
                    count += len(step.token_ids)
                return count, first

        done = await asyncio.gather(*(one(r, p) for r, p in zip(requests, ids, strict=True)))
        wall = time.perf_counter() - t0
    return summary(sum(c for c, _ in done), wall, [f for _, f in done])


async def decode_at_batch_1(model: LoadedModel, tokens: int = 128) -> dict[str, float]:
    """The median gap between tokens of one sequence alone, against the least a
    decode step can take: reading every weight once at the measured bandwidth."""
    async with GenerationEngine(model, ignore_eos=True) as engine:
        request = GenerationRequest(
            request_id=uuid7(),
            prompt="Write about the sea.",
            submitted_at=datetime.now(UTC),
            sampling={"max_tokens": tokens, "temperature": 0},
        )
        arrivals = [
            time.perf_counter()
            async for step in engine.generate(request, engine.prompt_ids(request))
            if step.token_ids
        ]
    gap = statistics.median(b - a for a, b in itertools.pairwise(arrivals))
    weights = weight_bytes(model.model)
    bandwidth = compute.call(copy_bandwidth, model.device)
    limit = weights / bandwidth
    return {
        "ms_per_token": round(gap * 1000, 2),
        "weight_bytes": weights,
        "memory_bandwidth_gb_per_s": round(bandwidth / 1e9, 1),
        "limit_ms_per_token": round(limit * 1000, 2),
        "fraction_of_limit": round(limit / gap, 3),
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every weight but the input embedding table, of
    which it reads one row (a tied output projection is counted, as the layer that
    reads it all)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            seen[id(t)] = t.numel() * t.element_size()  # a tied weight is one tensor
    return sum(seen.values())


def copy_bandwidth(device: torch.device, size: int = 1 << 30) -> float:
    """Bytes per second read and written by copying a large tensor, best of five."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size / best


def encode(model: LoadedModel, work: list[tuple[str, int]]) -> list[list[int]]:
    return [list(model.tokenizer(prompt)["input_ids"]) for prompt, _ in work]


class _FirstToken:
    """A generate() streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls, self.at = 0, 0.0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_sequential(model: LoadedModel, work: list[tuple[str, int]]) -> dict[str, float]:
    t0 = time.perf_counter()
    ttfts, tokens = [], 0
    for ids, (_, n) in zip(encode(model, work), work, strict=True):
        issued, streamer = time.perf_counter(), _FirstToken()
        out = model.model.generate(
            torch.tensor([ids], device=model.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            streamer=streamer,
        )
        tokens += out.shape[1] - len(ids)
        ttfts.append(streamer.at - issued)
    return summary(tokens, time.perf_counter() - t0, ttfts)


@torch.inference_mode()
def run_static(
    model: LoadedModel, work: list[tuple[str, int]], concurrency: int
) -> dict[str, float]:
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    wall, ttfts = 0.0, []
    for start in range(0, len(work), concurrency):
        group = work[start : start + concurrency]
        batch = tokenizer([prompt for prompt, _ in group], return_tensors="pt", padding=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        longest = max(n for _, n in group)
        t0 = time.perf_counter()
        # Everyone's first token comes out of the one batched prefill.
        model.model.generate(**batch, max_new_tokens=1, do_sample=False)
        ttfts += [time.perf_counter() - t0] * len(group)
        t0 = time.perf_counter()
        model.model.generate(
            **batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False
        )
        wall += time.perf_counter() - t0
    return summary(sum(n for _, n in work), wall, ttfts)


def run_hf_continuous(
    model: LoadedModel, work: list[tuple[str, int]], concurrency: int
) -> dict[str, Any]:
    try:
        config = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in work))  # type: ignore[no-untyped-call]
        # Sized like the engine's defaults; left to itself, on a CPU it sizes its paged
        # cache from free memory, and on this machine the kernel killed it for that.
        sizes = ContinuousBatchingConfig(
            num_blocks=128, max_batch_tokens=256, max_requests_per_batch=concurrency
        )
        # The engine runs the model with its own attention function; the manager
        # builds on a stock one.
        model.model.set_attn_implementation("sdpa")
        # The manager runs the model on a thread of its own. The compute thread
        # steps aside, so that the manager's is the only OpenMP team, as the
        # engine's is when it runs (see workers/compute.py).
        compute.shutdown()
        manager = model.model.init_continuous_batching(
            generation_config=config, continuous_batching_config=sizes
        )
        manager.start()
        try:
            # No manager.warmup(): on this CPU it leaves the manager failing every
            # request ("cannot reshape tensor of 0 elements"); the process is warm anyway.
            t0 = time.perf_counter()
            ids = [
                manager.add_request(p, max_new_tokens=n, eos_token_id=-1)
                for p, (_, n) in zip(encode(model, work), work, strict=True)
            ]
            finished: dict[str, int] = {}
            while len(finished) < len(ids):
                out = manager.get_result(timeout=120)
                if out is None:
                    raise TimeoutError("no result from the manager in 120 s")
                if out.error:
                    raise RuntimeError(out.error)
                if out.is_finished():
                    finished[out.request_id] = len(out.generated_tokens)
            tokens, wall = sum(finished.values()), time.perf_counter() - t0
            return {
                "tokens": tokens,
                "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 1),
            }
        finally:
            manager.stop(block=True)
    except Exception as exc:  # noqa: BLE001  # report, do not hide, why it could not be measured
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--requests-at-1", type=int, default=32)
    parser.add_argument("--mean-tokens", type=float, default=24)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    parser.add_argument("--model", help="a local model directory (default: SmolLM2)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the --model's architecture with seeded random weights: where only its "
        "config.json and tokenizer can go (the GPU machine); same speed, nonsense text",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["static", "hf_cb"])
    args = parser.parse_args()
    model = load_model(
        args.model, cache_dir=CACHE, device=args.device, random_weights=args.random_weights
    )
    on_gpu = model.device.type == "cuda"
    args.concurrency = args.concurrency or ([1, 8, 32, 128, 256] if on_gpu else [1, 8, 32])
    args.requests = args.requests or max(128, 2 * max(args.concurrency))
    work = workload(args.requests, args.mean_tokens, args.max_tokens, seed=0)
    few = work[: args.requests_at_1]
    asyncio.run(run_engine(model, workload(8, 16, 16, seed=1), 8))  # warm up: page in weights
    # On the compute thread, as the engine's forward passes are: one OpenMP team.
    sequential = compute.call(run_sequential, model, few)
    print("sequential", sequential, flush=True)
    batch_1 = asyncio.run(decode_at_batch_1(model))
    print("decode at batch 1", batch_1, flush=True)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or '?'}",
        "device": str(model.device)
        + (f" ({torch.cuda.get_device_name()})" if model.device.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(),
        "model": model.name,
        "weights": "random (seeded)" if args.random_weights else model.revision,
        "dtype": str(model.model.dtype),
        "requests": args.requests,
        "requests_at_1": args.requests_at_1,
        "output_tokens": sum(n for _, n in work),
        "mean_tokens": args.mean_tokens,
        "max_tokens": args.max_tokens,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sequential": sequential,
        "decode_batch_1": batch_1,
        "concurrent": {},
    }
    for n in args.concurrency:
        load = few if n == 1 else work
        run: dict[str, Any] = {"engine": asyncio.run(run_engine(model, load, n))}
        if "static" not in args.skip:
            run["static"] = compute.call(run_static, model, load, n)
        if "hf_cb" not in args.skip:
            run["hf_cb"] = run_hf_continuous(model, load, n)
        run["speedup_vs_sequential"] = {
            k: round(v["tokens_per_s"] / sequential["tokens_per_s"], 2)
            for k, v in run.items()
            if "tokens_per_s" in v
        }
        results["concurrent"][str(n)] = run
        print(n, json.dumps(run), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
