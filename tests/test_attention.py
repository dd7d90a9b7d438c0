"""Grouped-query attention against a naive softmax(Q K^T / sqrt(d)) V with each KV head repeated for its group of
query heads and an explicit causal mask; padding keys hidden by `attention_mask`; a KV cache decoding token by token
giving the full forward's outputs."""

from __future__ import annotations

import math

import pytest
import torch

from selfrefine.attention import Attention, KVCache, attention_mask, decode_attention
from selfrefine.rope import apply_rope, inverse_frequencies, rope_cos_sin

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8


@pytest.fixture()
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, bias=True, layer=0).double().eval()


def cos_sin(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_cos_sin(positions, inverse_frequencies(HEAD_DIM, 10000.0), torch.float64)


def naive(attn: Attention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    heads = lambda proj, n: proj(x).view(B, T, n, HEAD_DIM).transpose(1, 2)
    cos, sin = cos_sin(positions)
    q = apply_rope(heads(attn.q_proj, HEADS), cos, sin)
    k = apply_rope(heads(attn.k_proj, KV_HEADS), cos, sin)
    v = heads(attn.v_proj, KV_HEADS)
    group = HEADS // KV_HEADS  # query head h reads KV head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, HEADS * HEAD_DIM))


def test_matches_naive_grouped_causal_attention(attn: Attention) -> None:
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        got = attn(x, *cos_sin(positions))
        torch.testing.assert_close(got, naive(attn, x, positions), atol=1e-12, rtol=1e-10)
        # causal: changing the last token changes no earlier output
        later = x.clone()
        later[:, -1] += 1.0
        torch.testing.assert_close(attn(later, *cos_sin(positions))[:, :-1], got[:, :-1], atol=1e-12, rtol=0)


def test_left_padding_is_hidden_by_the_mask(attn: Attention) -> None:
    """Row 1 is row 0's last 4 tokens after 2 padding slots: its real outputs equal the unpadded sequence's."""
    x = torch.randn(1, 4, HIDDEN, dtype=torch.float64)
    padded = torch.cat([x.new_zeros(1, 2, HIDDEN).normal_(), x], dim=1)
    key_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    positions = (torch.arange(6) - 2).clamp(min=0)[None]
    with torch.no_grad():
        alone = attn(x, *cos_sin(torch.arange(4)[None]))
        got = attn(padded, *cos_sin(positions), mask=attention_mask(key_mask, 6))
    torch.testing.assert_close(got[:, 2:], alone, atol=1e-12, rtol=1e-10)
    assert torch.isfinite(got).all()  # padding queries see at least themselves: no NaN


def test_kv_cache_decoding_equals_the_full_forward(attn: Attention) -> None:
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    positions = torch.arange(7).expand(2, 7)
    cache = KVCache.empty(1, 2, KV_HEADS, 7, HEAD_DIM, torch.float64, "cpu")
    with torch.no_grad():
        full = attn(x, *cos_sin(positions))
        steps = [(0, 3)] + [(t, t + 1) for t in range(3, 7)]  # a 3-token prefill, then one token at a time
        outs = []
        for a, b in steps:
            outs.append(attn(x[:, a:b], *cos_sin(positions[:, a:b]), cache=cache))
            cache.length += b - a  # the model advances the cache after all layers
        torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-12, rtol=1e-10)
        with pytest.raises(ValueError, match="KV cache full"):
            attn(x[:, :1], *cos_sin(positions[:, :1]), cache=cache)


def test_decode_attention_matches_naive_grouped_attention() -> None:
    """The sampler's one-token step: each query head against its KV group's keys, hidden keys masked out."""
    g = torch.Generator().manual_seed(3)
    B, S = 5, 11
    q = torch.randn(B, HEADS, 1, HEAD_DIM, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, KV_HEADS, S, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
    lengths = torch.tensor([1, 4, 11, 7, 2])
    mask = (torch.arange(S)[None] < lengths[:, None])[:, None, None]  # (B, 1, 1, S)
    group = HEADS // KV_HEADS
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ kr.transpose(-1, -2) / math.sqrt(HEAD_DIM)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(decode_attention(q, k, v, mask), torch.softmax(scores, -1) @ vr, rtol=0, atol=1e-12)


def test_slot_cache_returns_keys_and_values_as_views_a_batched_matmul_reads_in_place() -> None:
    """The decode step's products must read the stored keys and values in place: both come back as views of the
    cache whose matrices are packed back to back (the keys' transpose and the values each fold into one
    (rows x kv_heads) batch without a copy), covering every position."""
    from selfrefine.attention import SlotCache

    cache = SlotCache.empty(2, 4, 3, 10, 8, torch.float32, "cpu")
    cache.index = torch.tensor([0, 5, 2])
    k, v = torch.randn(3, 3, 1, 8), torch.randn(3, 3, 1, 8)
    keys, values = cache.write(1, k, v)
    assert keys.shape == (3, 3, 10, 8) and values.shape == (3, 3, 10, 8)
    assert keys.untyped_storage().data_ptr() == cache.kt.untyped_storage().data_ptr()
    assert values.untyped_storage().data_ptr() == cache.v.untyped_storage().data_ptr()
    assert keys.transpose(-1, -2).is_contiguous() and values.is_contiguous()
    torch.testing.assert_close(keys[1, :, 5], k[1, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(values[2, :, 2], v[2, :, 0], rtol=0, atol=0)
