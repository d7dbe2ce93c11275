"""Where and how the model computes: on one thread (`workers.compute`), with its
linear layers packed for oneDNN on the CPU (`workers.packed_linear`)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from schemas import GenerationRequest, uuid7
from workers import GenerationEngine, LoadedModel, compute, load_model
from workers.packed_linear import PackedLinear, pack_linears

from .conftest import tiny_llama_config


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 33), (1, 300)])
def test_a_packed_linear_computes_what_the_linear_does(bias: bool, shape: tuple[int, int]) -> None:
    def both() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        linear = nn.Linear(96, 80, bias=bias)
        x = torch.randn(*shape, 96)
        with torch.inference_mode():
            return linear(x), PackedLinear(linear)(x)

    plain, packed = compute.call(both)
    assert packed.shape == plain.shape
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_only_float32_cpu_linears_are_packed() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).double(), nn.ReLU())
    assert compute.call(pack_linears, model) == 1
    assert [type(m) for m in model] == [PackedLinear, nn.Linear, nn.ReLU]


def test_the_default_model_runs_on_packed_linears(smollm: LoadedModel) -> None:
    kinds = {type(m) for m in smollm.model.modules()}
    assert PackedLinear in kinds
    assert nn.Linear not in kinds


async def test_every_forward_pass_runs_on_the_compute_thread(smollm: LoadedModel) -> None:
    threads = set()
    async with GenerationEngine(smollm, ignore_eos=True) as engine:
        model = engine.scheduler._model

        def recording(**inputs: Any) -> Any:
            threads.add(threading.current_thread())
            return model(**inputs)

        engine.scheduler._model = recording
        req = GenerationRequest(
            request_id=uuid7(),
            prompt="Hi",
            submitted_at=datetime.now(UTC),
            sampling={"max_tokens": 3, "temperature": 0},
        )
        steps = [s async for s in engine.generate(req, engine.prompt_ids(req))]
    assert len(steps) == 3
    assert threads == {compute.call(threading.current_thread)}
    assert threading.current_thread() not in threads


def test_a_call_from_the_compute_thread_runs_in_place() -> None:
    # Queueing behind itself would hang: the nested call runs where it is.
    assert compute.call(compute.call, threading.current_thread) is compute.call(
        threading.current_thread
    )


def test_random_weights_need_only_the_config_and_the_tokenizer(
    smollm: LoadedModel, tmp_path: Path
) -> None:
    config = tiny_llama_config(smollm.tokenizer)
    config.save_pretrained(tmp_path)
    smollm.tokenizer.save_pretrained(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.suffix in {".safetensors", ".bin"}]
    first, second = (
        load_model(tmp_path, device="cpu", cache_dir=tmp_path, random_weights=True)
        for _ in range(2)
    )
    assert first.revision.startswith("random-")
    assert first.model.config.hidden_size == 32
    # Seeded: two loads are the same model.
    ids = torch.tensor([[1, 2, 3, 4]])

    def logits(loaded: LoadedModel) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = loaded.model(ids).logits
            return out

    torch.testing.assert_close(compute.call(logits, first), compute.call(logits, second))
