"""The CUDA path's behaviour on the GPU machine (`scripts/device-check` runs it).

The default model's weights cannot travel there (see `load_model`'s
``random_weights``), so this builds SmolLM2's architecture with seeded random
weights and checks what does not depend on them:

    bf16     32 concurrent requests of mixed prompt and output lengths all end,
             each with exactly its max_tokens (end-of-sequence ignored)
    float32  the engine's greedy tokens for 8 prompts batched together, against
             transformers' generate for each alone: how many agree, and where the
             first that differ part (a GPU's batched and lone kernels need not
             round alike, and random weights give near ties)

    python benchmarks/cuda_check.py --model DIR [--device cuda] [--out FILE]

Writes a JSON report to --out; exits 1 if a bf16 request did not end whole.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from schemas import GenerationRequest, uuid7
from workers import GenerationEngine, LoadedModel, compute, load_model

CACHE = Path.home() / ".cache" / "tokenbus"
PROMPTS = [
    "Hi",
    "Write a long story about a dragon who loves tea and lives in the mountains.",
    "1 2 3 4 5",
    "What is the capital of France? Answer:",
    "The quick brown fox",
    "Les fleurs du jardin sont",
    "def fibonacci(n):",
    "Once upon a time",
]


def request(prompt: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid7(),
        prompt=prompt,
        submitted_at=datetime.now(UTC),
        sampling={"max_tokens": max_tokens, "temperature": 0},
    )


async def batched(model: LoadedModel, work: list[tuple[str, int]]) -> list[list[int]]:
    """Every request of ``work`` at once through the engine: the tokens of each."""
    async with GenerationEngine(model, ignore_eos=True) as engine:

        async def one(prompt: str, n: int) -> list[int]:
            req = request(prompt, n)
            return [
                t
                async for step in engine.generate(req, engine.prompt_ids(req))
                for t in step.token_ids
            ]

        return list(await asyncio.gather(*(one(p, n) for p, n in work)))


def alone(model: LoadedModel, prompt: str, n: int) -> list[int]:
    ids = list(model.tokenizer(prompt)["input_ids"])
    with torch.inference_mode():
        out = model.model.generate(
            torch.tensor([ids], device=model.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
    return list(out[0, len(ids) :].tolist())


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Where two token lists part (the shorter one's end, if one is a prefix)."""
    if a == b:
        return None
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a directory with config.json and tokenizer")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("cuda_check.json"))
    args = parser.parse_args()
    model = load_model(args.model, cache_dir=CACHE, device=args.device, random_weights=True)
    report: dict[str, Any] = {
        "device": str(model.device)
        + (f" ({torch.cuda.get_device_name()})" if model.device.type == "cuda" else ""),
        "torch": torch.__version__,
    }

    work = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 3), 1 + (7 * i) % 40) for i in range(32)]
    outputs = asyncio.run(batched(model, work))
    whole = [len(out) == n for out, (_, n) in zip(outputs, work, strict=True)]
    report["concurrent"] = {
        "dtype": str(model.model.dtype),
        "requests": len(work),
        "ended_whole": sum(whole),
    }

    compute.call(model.model.float)  # on the compute thread, as all model work is
    work = [(prompt, 24) for prompt in PROMPTS]
    together = asyncio.run(batched(model, work))
    parts = []
    for (prompt, n), got in zip(work, together, strict=True):
        expected = compute.call(alone, model, prompt, n)
        parts.append(first_difference(got, expected))
    report["float32_greedy"] = {
        "prompts": len(work),
        "tokens_each": 24,
        "agree": sum(p is None for p in parts),
        "first_difference_at": parts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all(whole) else 1


if __name__ == "__main__":
    sys.exit(main())
