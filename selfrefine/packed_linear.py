"""Linear layers from prepacked weights, for bfloat16 inference on a CPU.

On a CPU a bfloat16 `F.linear` is oneDNN's matmul, which reorders the whole weight into the blocked layout its
kernel reads on every call. At the sampler's decode shapes (8 to 128 rows) that reorder costs about as much as
the product: the 30 layers' linear products of the 135M model took 20.7 ms at 8 rows plain and 13.0 ms from
weights reordered once, 86 and 71 ms at 128 rows. `packed_linears` reorders each weight once and runs the same
oneDNN kernel on it (the `torch.ops.mkldnn` pair that inductor's CPU weight freezing uses), so the outputs are
bit-identical (tested), for a second copy of the weights while it lasts. float32 weights, GPUs and training are
left alone.

Projections that read the same input are also fused into one product: q/k/v (`Attention.project`) and gate/up
(`MLP.gate_up`), each output column the same dot product as before (bit-identical, tested). A decode step at 8
rows is mostly per-call overhead (a 30-layer model of width 64 steps in 19 ms, against ~38 ms for the 135M), and
this saves 3 of the 7 linear calls of each layer. A projection carrying an adapter is packed on its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.nn as nn

from .attention import Attention
from .lora import LoRALinear
from .model import MLP

FUSED = {Attention: ("project", ("q_proj", "k_proj", "v_proj")), MLP: ("gate_up", ("gate_proj", "up_proj"))}


def packable(weight: torch.Tensor) -> bool:
    """A bfloat16 weight on a CPU whose torch build has oneDNN's packed linear."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _product(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _split_product(packed: torch.Tensor, bias: torch.Tensor | None, widths: list[int],
                   x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _product(packed, bias, x).split(widths, -1)


def _fusable(layers: list[nn.Module]) -> bool:
    """Plain packable linear layers (no adapter), all with a bias or none."""
    return (all(type(m) is nn.Linear and packable(m.weight) for m in layers)
            and len({m.bias is None for m in layers}) == 1)


@contextmanager
def packed_linears(model: nn.Module) -> Iterator[int]:
    """Inside, every packable linear layer of `model` multiplies by a reordered copy of its weight (an adapter's
    own path is unchanged), fused with its siblings where `FUSED` says; yields how many layers. The weights must
    not change meanwhile: the copies would not see it."""
    swapped: list[tuple[nn.Module, str]] = []
    fused: set[nn.Module] = set()
    try:
        for m in model.modules():  # a parent comes before its children
            method, names = FUSED.get(type(m), ("", ()))
            layers = [getattr(m, name) for name in names]
            if layers and _fusable(layers):
                weight = torch.cat([layer.weight.detach() for layer in layers])
                bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers])
                packed = torch.ops.mkldnn._reorder_linear_weight(weight)
                setattr(m, method, partial(_split_product, packed, bias, [layer.out_features for layer in layers]))
                swapped.append((m, method))
                fused.update(layers)
            elif isinstance(m, nn.Linear) and packable(m.weight) and m not in fused:
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach())
                name = "base" if isinstance(m, LoRALinear) else "forward"  # an instance attribute shadows the method
                setattr(m, name, partial(_product, packed, m.bias))
                swapped.append((m, name))
        yield len(fused) + sum(isinstance(m, nn.Linear) for m, _ in swapped)
    finally:
        for m, name in swapped:
            delattr(m, name)
