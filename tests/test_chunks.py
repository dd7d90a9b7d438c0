"""The chunk budget (`chunks.chunk_rows`) and its users outside the losses: the sampler's prefill in groups gives
what one forward over all the prompts gives, its draws in chunks of rows the same tokens as at once, and the
decode step's logits written in place equal the head's."""

from __future__ import annotations

import pytest
import torch

import selfrefine.chunks as chunks
from selfrefine.chunks import CHUNK_BYTES, DEFAULT_CHUNK_BYTES, chunk_rows
from selfrefine.model import ModelConfig, Transformer
from selfrefine.sampling import (PAD_TO, SamplingParams, _prefill, _prefill_group, _shared_prefix, next_tokens,
                                 padded_length)


def test_rows_fit_the_device_budget():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(1000, cpu) == CHUNK_BYTES["cpu"] // 1000
    assert chunk_rows(1000, cpu) * 1000 <= CHUNK_BYTES["cpu"] < (chunk_rows(1000, cpu) + 1) * 1000
    assert chunk_rows(1000, cuda) == DEFAULT_CHUNK_BYTES // 1000 > chunk_rows(1000, cpu)
    assert chunk_rows(CHUNK_BYTES["cpu"] * 10, cpu) == 1  # a row over the budget still runs, alone


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return Transformer(cfg).double().eval()


@pytest.mark.parametrize("budget", [1, 3 * 4 * 8 * 64 * 8])  # one prompt per group; three of 8 padded tokens
@pytest.mark.parametrize("with_prefix", [False, True])
@torch.inference_mode()
def test_prefill_in_groups_equals_one_forward(model, monkeypatch, budget, with_prefix):
    """Mixed lengths, with and without a shared prefix: the same keys, values and next-token logits, in the prompts'
    order, whether the prompts go through one forward or through groups of one padded length that the budget
    allows, shortest first."""
    g = torch.Generator().manual_seed(1)
    head = torch.randint(0, 40, (4,), generator=g).tolist() if with_prefix else []
    prompts = [head + torch.randint(0, 40, (n,), generator=g).tolist() for n in (5, 9, 1, 7, 3, 9, 2)]
    prefix = _shared_prefix(model, prompts) if with_prefix else None
    assert (prefix is not None) == with_prefix
    whole = _prefill_group(model, prompts, prefix, 16)
    groups = []
    inner = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, *a: groups.append(tuple(ids.shape)) or inner(ids, *a))
    monkeypatch.setitem(chunks.CHUNK_BYTES, "cpu", budget)
    grouped = _prefill(model, prompts, prefix)
    assert PAD_TO == 8  # lengths 1-7 pad to 8 tokens, 9 to 16
    assert groups == ([(1, 8)] * 5 + [(1, 16)] * 2 if budget == 1 else [(3, 8), (2, 8), (1, 16), (1, 16)])
    assert len(grouped) == len(whole)
    for (k, v, lg), (k2, v2, lg2) in zip(grouped, whole):
        assert k.shape == k2.shape and v.shape == v2.shape
        torch.testing.assert_close((k, v, lg), (k2, v2, lg2), rtol=0, atol=1e-12)


def test_padded_length_is_the_next_multiple():
    assert [padded_length(n) for n in (1, 7, 8, 9, 16, 17)] == [8, 8, 8, 16, 16, 24]


@pytest.mark.parametrize("with_prefix", [False, True])
@torch.inference_mode()
def test_a_bf16_prefill_does_not_depend_on_its_company(with_prefix):
    """In bfloat16 a prompt's keys, values and logits change with the length its row is padded to; each prompt is
    padded by its own length, so a prompt prefilled alone, or among others of any lengths, gives the same bits
    (what keeps samples independent of the slot count and the sharding)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=256, tie_word_embeddings=True)
    model = Transformer(cfg).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(3)
    head = torch.randint(0, 64, (5,), generator=g).tolist() if with_prefix else []
    prompts = [head + torch.randint(0, 64, (n,), generator=g).tolist() for n in (37, 101, 58, 12, 150, 40)]
    prefix = _shared_prefix(model, prompts) if with_prefix else None
    together = _prefill(model, prompts, prefix)
    for p, kv in zip(prompts, together):
        assert all(torch.equal(a, b) for a, b in zip(_prefill(model, [p], prefix)[0], kv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_into_equals_the_head(model, dtype):
    """float32: written straight into the buffer, bit for bit the head's; a bf16 head: cast into float32."""
    m = Transformer(model.config).to(dtype).eval()
    hidden = torch.randn(5, model.config.hidden_size).to(dtype)
    out = torch.full((5, model.config.vocab_size), float("nan"))
    m.logits_into(hidden, out)
    assert torch.equal(out, m.lm_head(hidden).float())


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (8, 0.7)])
def test_draws_in_chunks_equal_draws_at_once(monkeypatch, top_k, top_p):
    """Sampling is row by row (filter, softmax, CDF, search), so drawing a chunk of rows at a time gives the same
    tokens, bit for bit, as one call over every row."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 50, generator=g) * 3
    uniforms = torch.rand(9, generator=g, dtype=torch.float64).tolist()
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    at_once = next_tokens(logits, params, uniforms)
    monkeypatch.setitem(chunks.CHUNK_BYTES, "cpu", 2 * 32 * 50)  # two rows per chunk
    assert torch.equal(next_tokens(logits, params, uniforms), at_once)
    assert len(set(at_once.tolist())) > 1
