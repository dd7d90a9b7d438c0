"""The transformer: logits equal transformers' on the same weights (Llama, Llama-3 rope scaling, an explicit
head_dim, Mistral, Qwen2), the training path's logits (`model(ids, logits_at=...)`) stay float32 under autocast,
and the config refuses bad values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfrefine.checkpoint import load_model
from selfrefine.model import RMSNorm, Transformer
from tests.helpers import tiny_config

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3_untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama_headdim": ("LlamaConfig", dict(head_dim=8)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
}
IDS = torch.tensor([[5, 17, 3, 88, 42, 9, 61, 0, 7, 33, 21, 90, 14, 2, 76, 50, 11, 8, 64, 30],
                    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])


def hf_model(case: str, seed: int = 0):
    """A transformers model with every parameter random (HF zero-inits biases, which would hide bugs)."""
    transformers = pytest.importorskip("transformers")
    cls, kw = CASES[case]
    cfg = getattr(transformers, cls)(**TINY, **kw, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module", params=list(CASES))
def hf_dir(request, tmp_path_factory) -> tuple[str, Path, torch.Tensor]:
    model = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, hf_logits(model)


def test_load_matches_transformers(hf_dir):
    case, path, expected = hf_dir
    model = load_model(path)
    with torch.no_grad():
        ours = model(IDS)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters()) and model.inv_freq.device.type == "cpu"
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_reference_formula_bit_for_bit(dtype):
    """`RMSNorm` (one fused float32 kernel) gives the same bits as the reference's composite float32 math, over
    widths and scales, and the same gradient up to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    for dim in (64, 576, 2048):
        norm = RMSNorm(dim, 1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(dim, generator=g))
        norm = norm.to(dtype)
        for scale in (1e-3, 1.0, 300.0):
            x = (torch.randn(37, dim, generator=g) * scale).to(dtype).requires_grad_()
            xf = x.float()
            ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
            out = norm(x)
            assert torch.equal(out, ref)
            if dtype == torch.float32:
                (grad,) = torch.autograd.grad(out.square().sum(), x)
                (grad_ref,) = torch.autograd.grad(ref.square().sum(), x)
                torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
