"""Prepacked bfloat16 linear layers against the plain ones: the same bits (fused q/k/v and gate/up included), the
adapter's path kept, nothing swapped where packing does not apply, everything restored on the way out."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
import torch.nn as nn

from selfrefine import sampling
from selfrefine.lora import LoRAConfig, inject_lora
from selfrefine.attention import Attention
from selfrefine.model import MLP, ModelConfig, Transformer
from selfrefine.packed_linear import _split_product, packable, packed_linears
from selfrefine.sampling import SamplingParams, generate

needs_packing = pytest.mark.skipif(not packable(torch.zeros(1, 1, dtype=torch.bfloat16)),
                                   reason="this torch build has no oneDNN packed linear")


def tiny(dtype: torch.dtype, bias: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True, attention_bias=bias)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.normal_(1, 0.1)
    return m.to(dtype)


def swapped(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if {"forward", "base", "project", "gate_up"} & m.__dict__.keys()]


@needs_packing
@pytest.mark.parametrize("rows", [1, 8, 100, 257])
@pytest.mark.parametrize("bias", [False, True])
def test_a_fused_product_gives_each_projection_s_own_bits(rows: int, bias: bool) -> None:
    """At the 135M model's widths (q/k/v: 576 -> 576 + 192 + 192; gate/up: 576 -> 1536 + 1536), from a decode step's
    rows to a prefill's: every column of the fused product is the plain layer's."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g).bfloat16()
    for widths in ([576, 192, 192], [1536, 1536]):
        weights = [torch.randn(w, 576, generator=g).bfloat16() for w in widths]
        biases = [torch.randn(w, generator=g).bfloat16() if bias else None for w in widths]
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights))
        got = _split_product(packed, torch.cat(biases) if bias else None, widths, x)
        for out, w, b in zip(got, weights, biases, strict=True):
            assert torch.equal(out, nn.functional.linear(x, w, b))


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
def test_packed_logits_are_bit_identical(bias: bool) -> None:
    model = tiny(torch.bfloat16, bias)
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids)
        with packed_linears(model) as n:
            assert n == 2 * 7 + 1  # every projection and the head
            assert len(swapped(model)) == 2 * 4 + 1  # q/k/v and gate/up fused in each layer
            assert all({"project", "gate_up"} & m.__dict__.keys() for m in model.modules()
                       if isinstance(m, (Attention, MLP)))
            got = model(ids)
            one_row = model(ids[:1, :1])  # a decode-sized product
        assert not swapped(model)
    assert torch.equal(got, want)
    assert torch.equal(one_row, want[:1, :1])


@needs_packing
def test_an_unmerged_adapter_still_applies() -> None:
    """Layers with an adapter are packed one by one (their adapter path kept), the others fused as usual."""
    model = tiny(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "o_proj", "up_proj")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model(ids)
        with packed_linears(model) as n:
            assert n == 2 * 7 + 1
            assert sorted(m.__class__.__name__ for m in swapped(model) if "base" in m.__dict__) == ["LoRALinear"] * 8
            assert not any({"project", "gate_up"} & m.__dict__.keys() for m in model.modules())
            got = model(ids)
    assert torch.equal(got, want)


def test_float32_weights_are_left_alone() -> None:
    model = tiny(torch.float32)
    with packed_linears(model) as n:
        assert n == 0 and not swapped(model)


@needs_packing
def test_the_plain_layers_come_back_after_an_error() -> None:
    model = tiny(torch.bfloat16)
    with pytest.raises(RuntimeError, match="inside"):
        with packed_linears(model):
            assert swapped(model)
            raise RuntimeError("inside")
    assert not swapped(model)


@needs_packing
def test_generate_packs_and_samples_what_the_plain_layers_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy and temperature sampling of a bf16 model with the packed layers (the default) and with them switched
    off give the same tokens; and packing does happen inside `generate`."""
    model = tiny(torch.bfloat16)
    prompts = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 5, 14)]
    counts: list[int] = []

    @contextmanager
    def counting(m: nn.Module) -> Iterator[int]:
        with packed_linears(m) as n:
            counts.append(n)
            yield n

    def run(**kw) -> list[list[list[int]]]:
        out = generate(model, prompts, SamplingParams(max_new_tokens=12, **kw), stop_ids=[], batch_size=3,
                       progress=False)
        return [[c.token_ids for c in row] for row in out]

    monkeypatch.setattr(sampling, "packed_linears", counting)
    packed = [run(), run(temperature=0.9, n=2)]
    assert counts == [2 * 7 + 1] * 2  # every projection and the head, in each call
    monkeypatch.setattr(sampling, "packed_linears", lambda m: packed_linears(nn.Module()))
    assert [run(), run(temperature=0.9, n=2)] == packed
