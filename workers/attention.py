"""Attention over a packed step: every running sequence's new tokens in one flat
row, each sequence's keys and values in a row of its own.

A scheduler step feeds the model one token for each decoding sequence and a chunk
of prompt for each prefilling one, all packed into a single ``[1, T]`` input, so
the step reads the weights once for everyone (a separate forward pass per
newcomer would read them again). The linear layers do not care which sequence a
token belongs to; attention does, and that is this module: `packed_attention`
writes each token's key and value into its sequence's row of `KVRows` and lets
each token attend to its own sequence only.

Sequences of very different lengths keep their rows in different `KVRows` (the
scheduler groups them by size), so a short sequence's row is not as long as the
longest one's. The packed step lays the tokens out cache by cache: each `Packing`
is the contiguous run of tokens whose rows are in one cache.

Grouped-query attention is computed without copying keys: the query heads that
share a key-value head are folded into the query-length dimension (a decoding
row's ``[heads, 1, d]`` query becomes ``[kv_heads, group, d]``), where
transformers' ``repeat_kv`` would copy the whole cache ``group`` times per layer.

The model runs with ``attn_implementation="tokenbus"``. Without a ``packing``
argument (transformers' own ``generate``, say) that is plain SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "tokenbus"


class KVRows:
    """Keys and values of the running sequences: per layer ``[rows, kv_heads,
    capacity, head_dim]``, a row per sequence, filled from column 0 (so a token's
    column is its position). Past a row's length lies stale data, never read:
    attention masks it. Storage grows by doubling and is only ever copied then,
    or when `compact` moves rows."""

    def __init__(self, config: Any, *, dtype: torch.dtype, device: torch.device) -> None:
        self.layers = config.num_hidden_layers
        heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.group = heads // self.kv_heads  # query heads per key-value head
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self._dtype, self._device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(0, 0)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def bytes_per_position(self) -> int:
        """What one token's keys and values take, over all layers."""
        element = torch.empty((), dtype=self._dtype).element_size()
        return int(2 * self.layers * self.kv_heads * self.head_dim * element)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for at least ``rows`` rows of ``columns`` columns."""
        if rows > self.rows or columns > self.capacity:
            self._allocate(
                _grown(self.rows, rows),
                _grown(self.capacity, columns),
                keep=(self.rows, self.capacity),
            )

    def compact(self, rows: list[int], columns: int) -> None:
        """Keep only ``rows`` (in that order, as rows 0, 1, ...) and their first
        ``columns`` columns, in storage of just that size (plus room to grow)."""
        index = torch.tensor(rows, dtype=torch.long, device=self._device)
        kept = [(k[index, :, :columns], v[index, :, :columns]) for k, v in self._pairs()]
        self._allocate(len(rows), columns + 64)
        for (keys, values), (k, v) in zip(self._pairs(), kept, strict=True):
            keys[:, :, :columns] = k
            values[:, :, :columns] = v

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.keys, self.values, strict=True))

    def _allocate(self, rows: int, columns: int, keep: tuple[int, int] = (0, 0)) -> None:
        shape = (rows, self.kv_heads, columns, self.head_dim)
        old = self._pairs()
        # zeros, not empty: attention gives a masked position weight 0, and 0 times
        # uninitialised memory that happens to be NaN is still NaN.
        self.keys = [
            torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self.layers)
        ]
        self.values = [
            torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self.layers)
        ]
        r, c = keep
        if r and c:
            for (keys, values), (k, v) in zip(self._pairs(), old, strict=True):
                keys[:r, :, :c] = k
                values[:r, :, :c] = v


def _grown(size: int, needed: int) -> int:
    """At least ``needed``, and at least double ``size`` if it has to grow at all."""
    return size if needed <= size else max(needed, 2 * size)


@dataclass(frozen=True, slots=True)
class Prefill:
    """A chunk of one sequence's prompt in the packed step."""

    row: int
    start: int  # where the chunk's tokens begin in the packed step
    column: int  # where they go in the row: tokens before it are cached already
    length: int


@dataclass(frozen=True, slots=True)
class Packing:
    """Where each token of one cache's run of a packed step belongs: tokens
    ``start`` to ``stop`` of the step. The first ``len(decoding)`` of them are one
    per decoding row; the prefill chunks follow (their ``start`` counts from the
    run's)."""

    cache: KVRows
    start: int
    stop: int
    rows: torch.Tensor  # [T]: each token's row
    columns: torch.Tensor  # [T]: each token's column in its row (= its position)
    decoding: torch.Tensor  # [D]: the rows that decode a token
    decode_mask: torch.Tensor | None  # [R, 1, 1, W] bool over rows 0..R-1; None if D = 0
    prefills: tuple[Prefill, ...]
    prefill_masks: tuple[torch.Tensor, ...]  # causal, [group * length, column + length] each

    @classmethod
    def build(
        cls,
        cache: KVRows,
        decoding: list[tuple[int, int]],  # (row, column) of each decoded token
        prefills: list[Prefill],
        device: torch.device,
        start: int = 0,
    ) -> Packing:
        rows = [r for r, _ in decoding]
        columns = [c for _, c in decoding]
        for p in prefills:
            rows += [p.row] * p.length
            columns += range(p.column, p.column + p.length)
        mask = None
        if decoding:
            # Decode attention reads rows 0..R-1 in place (a slice, not a copy);
            # rows that do not decode this step see column 0 only, and their
            # output is dropped.
            span = max(r for r, _ in decoding) + 1
            seen = torch.zeros(span, dtype=torch.long)
            seen[torch.tensor([r for r, _ in decoding])] = torch.tensor(
                [c + 1 for _, c in decoding]
            )
            width = int(seen.max())
            mask = torch.arange(width) < seen.clamp(min=1).unsqueeze(1)
            mask = mask.to(device)[:, None, None, :]
        return cls(
            cache=cache,
            start=start,
            stop=start + len(rows),
            rows=torch.tensor(rows, device=device),
            columns=torch.tensor(columns, device=device),
            decoding=torch.tensor([r for r, _ in decoding], dtype=torch.long, device=device),
            decode_mask=mask,
            prefills=tuple(prefills),
            # Built once per step, not once per layer. Row g * length + i is query i of
            # the g-th head of its group (see packed_attention): it sees its own past.
            prefill_masks=tuple(
                torch.ones((p.length, p.column + p.length), dtype=torch.bool, device=device)
                .tril(p.column)
                .repeat(cache.group, 1)
                for p in prefills
            ),
        )


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, d]
    key: torch.Tensor,  # [1, kv_heads, T, d]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packing: tuple[Packing, ...] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if packing is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    heads, tokens, d = query.shape[1:]
    out = query.new_empty((tokens, heads, d))
    for run in packing:
        span = slice(run.start, run.stop)
        _attend(
            module.layer_idx,  # type: ignore[arg-type]
            query[0, :, span],
            key[0, :, span],
            value[0, :, span],
            run,
            scaling,
            out[span],
        )
    return out.unsqueeze(0), None


def _attend(
    layer: int,
    query: torch.Tensor,  # [heads, n, d]: one cache's run of the step
    key: torch.Tensor,  # [kv_heads, n, d]
    value: torch.Tensor,
    run: Packing,
    scaling: float | None,
    out: torch.Tensor,  # [n, heads, d], written
) -> None:
    keys, values = run.cache.keys[layer], run.cache.values[layer]
    keys[run.rows, :, run.columns] = key.transpose(0, 1)
    values[run.rows, :, run.columns] = value.transpose(0, 1)
    heads, _, d = query.shape
    kv_heads, group = keys.shape[1], run.cache.group
    if run.decode_mask is not None:
        decoded = len(run.decoding)
        span, width = run.decode_mask.shape[0], run.decode_mask.shape[-1]
        q = query.new_zeros((span, heads, d))
        q[run.decoding] = query[:, :decoded].transpose(0, 1)
        attended = functional.scaled_dot_product_attention(
            q.view(span, kv_heads, group, d),
            keys[:span, :, :width],
            values[:span, :, :width],
            attn_mask=run.decode_mask,
            scale=scaling,
        )
        out[:decoded] = attended.view(span, heads, d)[run.decoding]
    for p, visible in zip(run.prefills, run.prefill_masks, strict=True):
        end = p.column + p.length
        q = query[:, p.start : p.start + p.length]  # [heads, n, d]
        attended = functional.scaled_dot_product_attention(
            q.reshape(1, kv_heads, group * p.length, d),
            keys[p.row : p.row + 1, :, :end],
            values[p.row : p.row + 1, :, :end],
            attn_mask=visible,
            scale=scaling,
        )
        out[p.start : p.start + p.length] = attended.view(heads, p.length, d).transpose(0, 1)


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
