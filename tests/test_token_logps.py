"""Target-token log-probs from hidden states (`token_logps`): the values and both gradients equal the
log-softmax-and-pick of `F.cross_entropy` in float64 at any chunking, nothing of size (N, vocab) is kept for
the backward, the model's training path (`model(..., targets=...)`) gives the losses what the logits did, and
oneDNN's bf16 math mode is taken only under a CPU's bf16 autocast, in forward and backward, where it is
float32-accurate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfrefine.losses import mean_nll, scored_positions, scored_targets, sequence_sums
from selfrefine.lora import LoRAConfig, inject_lora
from selfrefine.model import Transformer
from selfrefine.chunks import CHUNK_BYTES, chunk_rows
import selfrefine.token_logps as token_logps
from selfrefine.token_logps import fp32_matmul_math, head_fp32_math, head_token_logps
from tests.helpers import tiny_config


def _inputs(n: int = 23, h: int = 16, v: int = 101, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=dtype)
    return hidden, weight, targets, upstream


def _grads(out: torch.Tensor, upstream: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad((out * upstream).sum(), leaves)


@pytest.mark.parametrize("rows", [1, 5, 23, 64])
def test_values_and_gradients_equal_cross_entropy_in_float64(rows):
    """Chunks of one row, chunks that do not divide N, one chunk, a chunk larger than N: all the same numbers."""
    hidden, weight, targets, upstream = _inputs()
    ours = head_token_logps(hidden, weight, targets, rows)
    oracle = -F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, oracle, rtol=0, atol=1e-12)
    for a, b in zip(_grads(ours, upstream, hidden, weight), _grads(oracle, upstream, hidden, weight)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_float32_agrees_to_rounding():
    """The LoRA case: the (tied) head weight is frozen, only the hidden states get a gradient."""
    hidden, weight, targets, upstream = _inputs(n=40, h=32, v=500, dtype=torch.float32)
    weight = weight.detach()
    ours = head_token_logps(hidden, weight, targets)
    oracle = -F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    torch.testing.assert_close(ours, oracle, rtol=1e-5, atol=1e-5)
    (g_ours,), (g_oracle,) = _grads(ours, upstream, hidden), _grads(oracle, upstream, hidden)
    torch.testing.assert_close(g_ours, g_oracle, rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_give_float32_log_probs():
    """A bf16 model (inference, the reference scored without autocast) still gets float32 log-probs."""
    hidden, weight, targets, _ = _inputs(dtype=torch.float32)
    hidden, weight = hidden.detach().bfloat16(), weight.detach().bfloat16()
    ours = head_token_logps(hidden, weight, targets, 4)
    oracle = -F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="none")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, oracle, rtol=0, atol=1e-5)


def test_nothing_of_vocabulary_size_per_row_is_kept_for_the_backward():
    """What autograd saves is the inputs and one number per row, never (N, V) logits or probabilities."""
    hidden, weight, targets, _ = _inputs(n=64, h=8, v=1000, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        head_token_logps(hidden, weight, targets, 16)
    assert saved and max(saved) <= max(hidden.numel(), weight.numel())
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        -F.cross_entropy(hidden @ weight.t(), targets, reduction="none")  # the usual way keeps N x V
    assert max(saved) == 64 * 1000


def test_chunks_fit_the_cpu_budget_and_refuse_bad_shapes():
    assert chunk_rows(4 * 49152, torch.device("cpu")) * 4 * 49152 <= CHUNK_BYTES["cpu"]
    assert chunk_rows(10 ** 9, torch.device("cpu")) == 1
    hidden, weight, targets, _ = _inputs()
    with pytest.raises(ValueError, match="expected hidden"):
        head_token_logps(hidden, weight, targets[:-1])


def test_model_training_path_gives_the_losses_what_the_logits_gave():
    """`model(ids, logits_at, targets)` against `model(ids, logits_at)` + cross-entropy on a LoRA model with a
    tied head: the same per-sequence log-probs, SFT loss and LoRA gradients."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_layers=2, tie_word_embeddings=True)).double()
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p, 0, 0.1)  # a trained adapter, so its gradients are not all zero
    ids = torch.randint(3, model.config.vocab_size, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 9:] = -100
    at = scored_positions(labels)
    lora = [p for p in model.parameters() if p.requires_grad]
    ours = sequence_sums(model(ids, logits_at=at, targets=scored_targets(labels)), labels)
    # packed_sequence_logps in float64 (it rounds logits to float32, as training does)
    oracle = sequence_sums(-F.cross_entropy(model(ids, logits_at=at), scored_targets(labels), reduction="none"),
                           labels)
    for a, b in zip(ours, oracle):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    g_ours = torch.autograd.grad(mean_nll(*ours), lora)
    g_oracle = torch.autograd.grad(mean_nll(*oracle), lora)
    assert any(g.abs().max() > 0 for g in g_oracle)
    for a, b in zip(g_ours, g_oracle):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="targets need logits_at"):
        model(ids, targets=scored_targets(labels))
    with pytest.raises(ValueError, match="log-probs at the 21 scored positions"):
        sequence_sums(ours[0], labels)


def test_the_math_mode_reaches_forward_and_backward_and_is_restored(monkeypatch):
    """The backward runs outside the forward's context, so it must set the mode itself; the global flag is put
    back after each (and after an error inside the block)."""
    seen = []
    real = token_logps.fp32_matmul_math

    def recording(mode):
        seen.append(mode)
        return real(mode)

    monkeypatch.setattr(token_logps, "fp32_matmul_math", recording)
    before = torch.backends.mkldnn.matmul.fp32_precision
    hidden, weight, targets, upstream = _inputs(dtype=torch.float32)
    out = head_token_logps(hidden, weight.detach(), targets, 8, math="bf16")
    _grads(out, upstream, hidden)
    assert seen == ["bf16", "bf16"]
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    with pytest.raises(RuntimeError), fp32_matmul_math("bf16"):
        raise RuntimeError
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_bf16_math_only_under_cpu_bf16_autocast_and_where_the_probe_allows(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(token_logps, "bf16_math_ok", lambda: True)
    assert head_fp32_math(cpu) == "ieee"  # --precision float32: no autocast, float32 matmuls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head_fp32_math(cpu) == "bf16"
    with torch.autocast("cpu", dtype=torch.float16):
        assert head_fp32_math(cpu) == "ieee"
    monkeypatch.setattr(token_logps, "bf16_math_ok", lambda: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head_fp32_math(cpu) == "ieee"


def test_the_probe_measures_float32_even_inside_autocast():
    """It runs lazily inside the first training step's autocast; there its plain float32 product must stay float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        speedup, error_ieee, _ = token_logps.probe_bf16_math()
    assert speedup > 0 and error_ieee < 1e-5


def test_where_the_probe_takes_bf16_math_the_head_stays_float32_accurate():
    """On this machine's verdict: if the mode is taken, log-probs and gradients stay within 1e-4 of float64 on a
    head of SmolLM2's width (a single bf16 rounding of the factors would be off by about 1e-2)."""
    if not token_logps.bf16_math_ok():
        pytest.skip("the probe keeps float32 matmuls on this CPU")
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(48, 576, generator=g) * 2).requires_grad_()
    weight = torch.randn(4096, 576, generator=g) * 0.05
    targets = torch.randint(0, 4096, (48,), generator=g)
    upstream = torch.randn(48, generator=g)
    h64 = hidden.detach().double().requires_grad_()
    oracle = -F.cross_entropy(h64 @ weight.double().t(), targets, reduction="none")
    ours = head_token_logps(hidden, weight, targets, 16, math="bf16")
    torch.testing.assert_close(ours.double(), oracle, rtol=0, atol=1e-4)
    (g_ours,), (g_oracle,) = _grads(ours, upstream, hidden), _grads(oracle, upstream.double(), h64)
    torch.testing.assert_close(g_ours.double(), g_oracle, rtol=0, atol=1e-4)
