"""Rotary embeddings against the complex-number definition (pair j of a head, x_j + i x_{j+D/2}, turned by
position * theta^(-2j/D)), the relative-position property, and Llama-3's frequency scaling against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from selfrefine.rope import apply_rope, inverse_frequencies, rope_cos_sin

HEAD_DIM, THETA = 8, 10000.0


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = rope_cos_sin(positions, inverse_frequencies(HEAD_DIM, THETA), x.dtype)
    return apply_rope(x, cos, sin)


def test_rotation_is_a_complex_multiplication() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, HEAD_DIM)  # (B, H, T, D)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 0, 31, 12, 63]])
    half = HEAD_DIM // 2
    freqs = torch.tensor([THETA ** (-2 * j / HEAD_DIM) for j in range(half)], dtype=torch.float64)
    turn = torch.polar(torch.ones(2, 1, 5, half, dtype=torch.float64), positions[:, None, :, None] * freqs)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * turn
    expected = torch.cat([z.real, z.imag], dim=-1).float()
    torch.testing.assert_close(rope(x, positions), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope(x, torch.zeros_like(positions)), x)  # position 0 is no rotation


def test_scores_depend_only_on_the_distance() -> None:
    """q at m and k at n score q . k the same as at m + s and n + s: attention sees relative positions."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, HEAD_DIM, dtype=torch.float64), torch.randn(1, 1, 1, HEAD_DIM, dtype=torch.float64)
    at = lambda x, p: rope(x, torch.tensor([[p]]))
    score = lambda m, n: (at(q, m) * at(k, n)).sum().item()
    for m, n, s in [(3, 1, 5), (0, 9, 17), (4, 4, 40)]:
        assert score(m + s, n + s) == pytest.approx(score(m, n), rel=1e-6)  # cos, sin are float32
    assert score(3, 1) != pytest.approx(score(1, 3), rel=1e-3)  # but the direction matters


def test_llama3_scaling_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    head_dim, theta, old_ctx = 64, 10000.0, 64
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": old_ctx}
    wavelen = 2 * math.pi / inverse_frequencies(head_dim, theta)
    # every band is present: kept (short wavelengths), slowed by `factor` (long), blended (between)
    assert (wavelen < old_ctx / 4).any() and (wavelen > old_ctx / 1).any()
    assert ((wavelen > old_ctx / 4) & (wavelen < old_ctx / 1)).any()
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=theta,
                                   rope_scaling=scaling)
    expected, _ = _compute_llama3_parameters(cfg, "cpu")
    torch.testing.assert_close(inverse_frequencies(head_dim, theta, scaling), expected.float())


def test_unknown_scaling_is_refused() -> None:
    assert torch.equal(inverse_frequencies(HEAD_DIM, THETA, {"rope_type": "default"}),
                       inverse_frequencies(HEAD_DIM, THETA))
    with pytest.raises(ValueError, match="yarn"):
        inverse_frequencies(HEAD_DIM, THETA, {"rope_type": "yarn", "factor": 4.0})
