"""Log-probabilities of target tokens from hidden states, without holding the (N, vocab) logits.

The training losses need one number per scored position: log p(target) = logit[target] - logsumexp(logits).
Computing it the usual way (head matmul, log-softmax, pick) holds N x V floats three times in a step (the
logits, their log-softmax, its gradient), plus a zero-filled N x V gradient from the pick: 165 MB each for
840 positions of SmolLM2's 49,152-token vocabulary. On a CPU every such tensor is a fresh mmap whose pages
fault in on first touch (about 250,000 page faults in one DPO step of the demo's shape); on a GPU it is the
peak memory of a LoRA step at a large vocabulary.

Here the head runs over chunks of rows (`chunks.chunk_rows`: 85 rows of SmolLM2's logits on a CPU). The forward
keeps only the logsumexp of each row; the backward recomputes a chunk's logits (one more head matmul) and turns
them into that chunk's gradient in place:
d log p(t) / d logits = onehot(t) - softmax(logits). The math is the log-softmax's, so results agree with
`F.cross_entropy` to rounding (tests/test_token_logps.py checks values and gradients in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunks import chunk_rows


class _HeadTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, rows: int) -> Tensor:
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32 at least, whatever the weights
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        lse = torch.empty_like(out)
        for i in range(0, hidden.shape[0], rows):
            logits = (hidden[i:i + rows] @ weight.t()).to(dtype)
            torch.logsumexp(logits, -1, out=lse[i:i + rows])
            out[i:i + rows] = logits.gather(1, targets[i:i + rows, None]).squeeze(1) - lse[i:i + rows]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        rows = ctx.rows
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for i in range(0, hidden.shape[0], rows):
            h, g = hidden[i:i + rows], grad[i:i + rows, None].to(lse.dtype)
            d = (h @ weight.t()).to(lse.dtype)
            d.sub_(lse[i:i + rows, None]).exp_().mul_(-g)  # -g * softmax, in the logits' own memory
            d.scatter_add_(1, targets[i:i + rows, None], g)  # + g at the target
            if grad_hidden is not None:
                torch.mm(d.to(weight.dtype), weight, out=grad_hidden[i:i + rows])
            if grad_weight is not None:
                grad_weight.addmm_(d.t(), h.to(lse.dtype))
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def head_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, rows: int | None = None) -> Tensor:
    """(N,) log p(targets[n]) under logits `hidden @ weight.T`, for (N, H) `hidden`, (V, H) `weight` and (N,)
    `targets`, in float32 (float64 for float64 weights); `rows` per chunk, `chunks.chunk_rows` when None."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(f"expected hidden (N, H), weight (V, H) and targets (N,), got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(targets.shape)}")
    rows = rows or chunk_rows(4 * weight.shape[0], hidden.device)  # a chunk's float32 logits fit the budget
    return _HeadTokenLogps.apply(hidden.to(weight.dtype), weight, targets, rows)
