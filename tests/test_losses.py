"""DPO / SFT loss math against closed forms, hand-computed values and torch's own cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfrefine.losses import dpo_loss, sequence_logps, sft_loss


def _logps(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_dpo_equal_log_ratios_is_log2_and_zero_rewards():
    pc, pr = _logps(-5.0, -12.0), _logps(-7.0, -3.0)
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    torch.testing.assert_close(cr, torch.zeros(2))
    torch.testing.assert_close(rr, torch.zeros(2))


def test_dpo_sigmoid_reference_values():
    # h = (pc - rc) - (pr - rr) = 0, 10, 20 with beta 0.1 -> -logsigmoid(0, 1, 2)
    pc = _logps(-10.0, -10.0, -10.0)
    rc = _logps(-10.0, -15.0, -20.0)
    pr = _logps(-10.0, -15.0, -20.0)
    rr = _logps(-10.0, -10.0, -10.0)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(losses, _logps(0.6931472, 0.3132617, 0.1269280), atol=1e-6, rtol=0)
    torch.testing.assert_close(cr, _logps(0.0, 0.5, 1.0))
    torch.testing.assert_close(rj, _logps(0.0, -0.5, -1.0))


def test_dpo_label_smoothing():
    # beta * h = 1: 0.9 * softplus(-1) + 0.1 * softplus(1)
    losses, _, _ = dpo_loss(_logps(0.0), _logps(-10.0), _logps(0.0), _logps(0.0), beta=0.1, label_smoothing=0.1)
    torch.testing.assert_close(losses, _logps(0.4132617), atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_ipo_and_hinge_formulas(beta):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(6, generator=g) for _ in range(4))
    h = (pc - rc) - (pr - rr)
    ipo, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    torch.testing.assert_close(ipo, (h - 1 / (2 * beta)) ** 2)
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    torch.testing.assert_close(hinge, torch.clamp(1 - beta * h, min=0))
    torch.testing.assert_close(cr, beta * (pc - rc))
    torch.testing.assert_close(rj, beta * (pr - rr))
    # hand-computed single value: h = 3, beta 0.5 -> ipo (3 - 1)^2 = 4, hinge max(0, 1 - 1.5) = 0
    one = dpo_loss(_logps(-1.0), _logps(-4.0), _logps(0.0), _logps(0.0), beta=0.5, loss_type="ipo")[0]
    torch.testing.assert_close(one, _logps(4.0))
    assert dpo_loss(_logps(-1.0), _logps(-4.0), _logps(0.0), _logps(0.0), beta=0.5, loss_type="hinge")[0].item() == 0.0


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_sigmoid_gradient_matches_analytic(ls):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-30 * torch.rand(5, generator=g) for _ in range(4))
    pc.requires_grad_(), pr.requires_grad_()
    beta = 0.1
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
    losses.sum().backward()
    h = ((pc - rc) - (pr - rr)).detach()
    # d/dh [-(1-ls) logsig(b h) - ls logsig(-b h)] = -b [(1-ls) sig(-b h) - ls sig(b h)]
    dh = -beta * ((1 - ls) * torch.sigmoid(-beta * h) - ls * torch.sigmoid(beta * h))
    torch.testing.assert_close(pc.grad, dh)
    torch.testing.assert_close(pr.grad, -dh)
    assert not cr.requires_grad and not rj.requires_grad
    assert losses.dtype == torch.float32


def test_dpo_reference_gets_no_gradient():
    pc, pr = _logps(-1.0).requires_grad_(), _logps(-2.0).requires_grad_()
    rc, rr = _logps(-1.5).requires_grad_(), _logps(-1.0).requires_grad_()
    dpo_loss(pc, pr, rc, rr)[0].sum().backward()
    assert rc.grad is None and rr.grad is None and pc.grad is not None


def test_dpo_bad_arguments():
    x = _logps(-1.0)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(x, x, x, x, label_smoothing=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="shapes"):
        dpo_loss(x, _logps(-1.0, -2.0), x, x)


def _batch(seed: int = 0, B: int = 3, T: int = 7, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 5:] = -100  # right padding
    labels[2, :] = -100  # no completion at all
    return logits, labels


def test_sequence_logps_closed_form():
    logits, labels = _batch()
    total, counts = sequence_logps(logits, labels)
    logsm = logits.log_softmax(-1)
    for b in range(labels.shape[0]):
        want = sum(logsm[b, t - 1, labels[b, t]].item() for t in range(1, labels.shape[1]) if labels[b, t] != -100)
        assert total[b].item() == pytest.approx(want, abs=1e-5)
    assert counts.tolist() == [4, 3, 0]
    mean, _ = sequence_logps(logits, labels, average=True)
    torch.testing.assert_close(mean, total / torch.tensor([4.0, 3.0, 1.0]))
    assert mean[2].item() == 0.0


def test_sequence_logps_ignores_prompt_and_padding():
    logits, labels = _batch()
    base, _ = sequence_logps(logits, labels)
    # Change every logit that predicts an ignored label, and the ignored label slots' own ids.
    predicts_ignored = torch.zeros_like(labels, dtype=torch.bool)
    predicts_ignored[:, :-1] = labels[:, 1:] == -100
    predicts_ignored[:, -1] = True  # the last position predicts nothing
    noisy = torch.where(predicts_ignored.unsqueeze(-1), torch.randn_like(logits) * 50, logits)
    torch.testing.assert_close(sequence_logps(noisy, labels)[0], base)
    # the ignore marker is only a marker
    minus_one = torch.where(labels == -100, -1, labels)
    torch.testing.assert_close(sequence_logps(logits, minus_one, ignore_index=-1)[0], base)
    # while a completion token's logits or id do count (the test can fail)
    bumped = logits.clone()
    bumped[0, 4] += 3 * F.one_hot(labels[0, 5], logits.shape[-1])
    assert sequence_logps(bumped, labels)[0][0] > base[0]
    relabeled = labels.clone()
    relabeled[0, 5] = (labels[0, 5] + 1) % logits.shape[-1]
    assert sequence_logps(logits, relabeled)[0][0] != base[0]


def test_sequence_logps_float32_from_bf16():
    logits, labels = _batch()
    total, _ = sequence_logps(logits.bfloat16(), labels)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, sequence_logps(logits.bfloat16().float(), labels)[0])


def test_sft_loss_matches_cross_entropy():
    logits, labels = _batch()
    logits.requires_grad_()
    ours = sft_loss(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ours, ref)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)
    empty = torch.full_like(labels, -100)
    assert sft_loss(logits, empty).item() == 0.0


def test_sequence_logps_shape_check():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="expected logits"):
        sequence_logps(logits, labels[:, :-1])
