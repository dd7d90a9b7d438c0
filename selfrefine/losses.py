"""Training losses: token log-probabilities of completions, SFT cross-entropy, and DPO.

All math is done in float32 whatever the model dtype: the DPO margin is a difference of sums over
hundreds of tokens, and bf16 rounding there is larger than the signal.

Conventions (the DPO paper, Rafailov et al. 2023, eq. 7; TRL agrees except where noted):
  h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
  sigmoid: -log sigmoid(beta h)            (label smoothing eps gives conservative DPO, cDPO)
  ipo:     (h - 1/(2 beta))^2              (Azar et al. 2023, eq. 17)
  hinge:   max(0, 1 - beta h)              (SLiC, Zhao et al. 2023)
  implicit rewards: beta (log pi - log ref), detached (they are logged, not trained on).
Log-probs are SUMS over completion tokens, as in the paper. TRL switches IPO to per-token means
internally; here the caller chooses (`sequence_logps(..., average=True)`), the loss takes what it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def scored_positions(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """(B, T) bool: the positions whose logits predict a completion token (position t predicts t+1).

    The model can project only these (`model(ids, logits_at=...)`): the prompt's and the padding's logits
    are never needed, and the LM head is a large share of a small model's compute.
    """
    if labels.dim() != 2:
        raise ValueError(f"expected labels (B, T), got {tuple(labels.shape)}")
    return F.pad(labels[:, 1:] != ignore_index, (0, 1), value=False)


def scored_targets(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """(N,) the completion tokens the `scored_positions` predict, in row-major order."""
    return labels[:, 1:][scored_positions(labels, ignore_index)[:, :-1]]


def sequence_sums(token: Tensor, labels: Tensor, ignore_index: int = -100,
                  average: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sequence sum (or mean) of completion-token log-probs and the token counts, (B,) each, from the
    log-probs `token` (N,) of `scored_targets(labels)`. A sequence with no completion tokens gets 0 (its mean
    divides by max(count, 1))."""
    positions = scored_positions(labels, ignore_index)
    if token.shape != (int(positions.sum()),):
        raise ValueError(f"expected (N,) log-probs at the {int(positions.sum())} scored positions, "
                         f"got {tuple(token.shape)}")
    return grouped_sums(token, positions.nonzero()[:, 0], labels.shape[0], average)


def grouped_sums(token: Tensor, owner: Tensor, n: int, average: bool = False) -> tuple[Tensor, Tensor]:
    """Sum (or mean) of the log-probs `token` (N,) of each of `n` sequences, and their counts, (n,) each; `owner`
    (N,) is the sequence of each token. A sequence with no tokens gets 0."""
    counts = torch.bincount(owner, minlength=n)
    total = torch.zeros(n, dtype=token.dtype, device=token.device).index_add(0, owner, token)
    return (total / counts.clamp(min=1) if average else total), counts


def packed_sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                          average: bool = False) -> tuple[Tensor, Tensor]:
    """`sequence_sums` from `logits` (N, V) at `scored_positions(labels)` in row-major order (the recipes
    score from hidden states instead, `model(..., targets=...)`, which never holds these logits)."""
    positions = scored_positions(labels, ignore_index)
    if logits.dim() != 2 or logits.shape[0] != int(positions.sum()):
        raise ValueError(f"expected logits (N, V) at the {int(positions.sum())} scored positions, "
                         f"got {tuple(logits.shape)}")
    # -cross_entropy is the fused log-softmax-and-pick: one pass over the logits, in float32.
    token = -F.cross_entropy(logits.float(), scored_targets(labels, ignore_index), reduction="none")
    return sequence_sums(token, labels, ignore_index, average)


def mean_nll(total: Tensor, counts: Tensor) -> Tensor:
    """The SFT loss from `sequence_sums`: mean cross-entropy over all completion tokens of the batch
    (token-weighted, like `F.cross_entropy(ignore_index=...)`), so long answers weigh by their length; 0 if
    there are none."""
    return -total.sum() / counts.sum().clamp(min=1)


def packed_sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """`mean_nll` from `logits` (N, V) at `scored_positions(labels)`."""
    return mean_nll(*packed_sequence_logps(logits, labels, ignore_index))


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                   average: bool = False) -> tuple[Tensor, Tensor]:
    """`packed_sequence_logps` from full (B, T, V) logits."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T), "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return packed_sequence_logps(logits[scored_positions(labels, ignore_index)], labels, ignore_index, average)


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """`packed_sft_loss` from full (B, T, V) logits."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T), "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return packed_sft_loss(logits[scored_positions(labels, ignore_index)], labels, ignore_index)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO losses and the implicit rewards of chosen and rejected: three (B,) tensors.

    The reference is frozen by definition, so its log-probs are detached here: a caller that forgot
    `no_grad` cannot leak gradient into it. `label_smoothing` (cDPO: the label is flipped with
    probability eps) only has a meaning for the sigmoid loss and is refused for the others rather than
    silently ignored, as TRL does.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss_type!r}")
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = reference_chosen_logps.detach().float(), reference_rejected_logps.detach().float()
    if not pc.shape == pr.shape == rc.shape == rr.shape:
        raise ValueError(f"log-prob shapes differ: {[tuple(t.shape) for t in (pc, pr, rc, rr)]}")

    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * h)
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    return losses, chosen_rewards, rejected_rewards
