"""The training path's logits (`model(ids, logits_at=...)`) stay float32 under autocast."""

from __future__ import annotations

import re

import pytest
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


@pytest.mark.parametrize("change,says", [
    ({"rope_theta": 0}, "rope_theta must be a finite number > 0"),
    ({"rope_theta": float("nan")}, "rope_theta must be a finite number > 0"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a finite number > 0"),
    ({"hidden_size": "64"}, "hidden_size must be an integer >= 1"),
    ({"num_layers": 1.5}, "num_hidden_layers must be an integer >= 1"),
    ({"num_kv_heads": 3}, "multiple of num_key_value_heads"),
    ({"vocab_size": 0}, "vocab_size must be an integer >= 1"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"eos_token_id": "2"}, "eos_token_id must be"),
    ({"head_dim": 15}, "head_dim must be even"),
])
def test_config_refuses_out_of_range_or_mistyped_values(change: dict, says: str):
    from tests.helpers import tiny_config

    with pytest.raises(ValueError, match=re.escape(says)):
        tiny_config(**change)


def test_load_refuses_non_finite_weights_naming_the_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from selfrefine.checkpoint import load_model
    from selfrefine.errors import UserError
    from tests.helpers import make_tiny_model_dir

    d = make_tiny_model_dir(tmp_path / "m", num_layers=1)
    load_model(d)  # finite: loads
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=re.escape(f"{d / 'model.safetensors'}: tensor 'model.norm.weight' has non-finite")):
        load_model(d)
