"""Linear layers with their weights laid out once for oneDNN (CPU only).

A plain ``nn.Linear`` on the CPU hands its row-major weight to the BLAS on every
call, which re-blocks it each time; at decode sizes (a few to a few dozen rows)
that costs as much as the multiply. oneDNN can take the weight already in the
blocked layout its kernels read, which is what inductor does when it freezes a
model. On 2 cores this halves a SmolLM2 forward pass (measured: 1 token
38 -> 20 ms, 32 tokens 86 -> 37 ms). ``torch.ops.mkldnn`` is a private API, so
anything it refuses leaves the layer as it was.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# The batch size oneDNN picks its layout for; every size still works. Decode
# steps of a few dozen sequences are the ones that matter.
ROWS_HINT = 32


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward over a weight reordered for oneDNN."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        self.register_buffer("packed", packed, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.packed, self.bias, "none", [], ""
        )
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Swap the float32 CPU ``nn.Linear`` layers of ``model`` for `PackedLinear`, for
    inference only (the packed weights take no gradients). Returns how many."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return 0
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _packable(child):
                continue
            try:
                replacement = PackedLinear(child)  # type: ignore[arg-type]
            except RuntimeError as exc:  # this CPU or build has no such kernel
                log.info("keeping plain linear layers: oneDNN refused %s (%s)", name, exc)
                return packed
            setattr(parent, name, replacement)
            packed += 1
    return packed


def _packable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    )
