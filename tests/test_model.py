"""The training path's logits (`model(ids, logits_at=...)`) stay float32 under autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfrefine.model import Transformer
from tests.helpers import tiny_config


def test_scored_logits_are_float32_under_bf16_autocast():
    """Under a bfloat16 autocast the backbone runs in bf16, but the head that feeds the log-softmax does not:
    the scored positions' logits are float32, equal to the float32 head on the same hidden states."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_layers=1, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # logits of several units, where bf16 rounding is coarse
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    at = torch.zeros(2, 10, dtype=torch.bool)
    at[0, 3:9], at[1, 5:] = True, True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, logits_at=at)
        hidden = model.hidden_states(ids)
        full = model(ids)  # without logits_at (sampling, evaluation): autocast as before
    expected = F.linear(hidden[at].float(), model.lm_head.weight)
    assert logits.dtype == torch.float32 and logits.shape == (int(at.sum()), model.config.vocab_size)
    torch.testing.assert_close(logits, expected, rtol=1.3e-6, atol=1e-5)
    assert (expected - expected.bfloat16().float()).abs().max() > 1e-3  # bf16 logits would not pass
    assert full.dtype == torch.bfloat16
