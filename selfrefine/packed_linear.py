"""Linear layers from prepacked weights, for bfloat16 inference on a CPU.

On a CPU a bfloat16 `F.linear` is oneDNN's matmul, which reorders the whole weight into the blocked layout its
kernel reads on every call. At the sampler's decode shapes (8 to 128 rows) that reorder costs about as much as
the product: the 30 layers' linear products of the 135M model took 20.7 ms at 8 rows plain and 13.0 ms from
weights reordered once, 86 and 71 ms at 128 rows. `packed_linears` reorders each weight once and runs the same
oneDNN kernel on it (the `torch.ops.mkldnn` pair that inductor's CPU weight freezing uses), so the outputs are
bit-identical (tested), for a second copy of the weights while it lasts. float32 weights, GPUs and training are
left alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.nn as nn

from .lora import LoRALinear


def packable(weight: torch.Tensor) -> bool:
    """A bfloat16 weight on a CPU whose torch build has oneDNN's packed linear."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _product(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@contextmanager
def packed_linears(model: nn.Module) -> Iterator[int]:
    """Inside, every packable linear layer of `model` multiplies by a reordered copy of its weight (an adapter's
    own path is unchanged); yields how many. The weights must not change meanwhile: the copies would not see it."""
    swapped: list[tuple[nn.Module, str]] = []
    try:
        for m in model.modules():
            if isinstance(m, nn.Linear) and packable(m.weight):
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach())
                name = "base" if isinstance(m, LoRALinear) else "forward"  # an instance attribute shadows the method
                setattr(m, name, partial(_product, packed, m.bias))
                swapped.append((m, name))
        yield len(swapped)
    finally:
        for m, name in swapped:
            delattr(m, name)
