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

Under a CPU's bfloat16 autocast the head stays float32 (bf16 logits would be off by 1/16 at |logit| 8), but its
matmuls may run in oneDNN's bf16 math mode (`head_fp32_math`): float32 in and out, each factor split into bf16
parts, about 16 bits of mantissa instead of 24 and still about 1e-6 relative error on the logits, against
bf16's 4e-3. It is taken only where a probe measures it faster and that accurate (2.2x on the head's shapes on
a 2-core AMD EPYC); `--precision float32` never takes it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from .chunks import chunk_rows

logger = logging.getLogger(__name__)
MIN_SPEEDUP = 1.2  # the bf16 math mode must beat plain float32 by this much on the probe
MAX_REL_ERROR = 1e-4  # and stay this close to float64 (a single bf16 rounding gives about 4e-3)


@contextlib.contextmanager
def fp32_matmul_math(mode: str) -> Iterator[None]:
    """float32 matmuls on the CPU in oneDNN math `mode` ("ieee": float32; "bf16": bf16 parts) inside the block."""
    old = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = mode
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old


def probe_bf16_math() -> tuple[float, float, float]:
    """(speedup, relative error in float32, relative error in bf16 math) of a head-shaped float32 matmul (85 x 576
    @ 576 x 8192, best of 5) in oneDNN's bf16 math mode against plain float32, errors against float64. Autocast is
    switched off: the probe runs lazily, inside the training step's autocast, which would make both bf16."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(85, 576, generator=g), torch.randn(8192, 576, generator=g)
    exact = a.double() @ b.double().t()
    seconds, error = {}, {}
    with torch.autocast("cpu", enabled=False):
        for mode in ("ieee", "bf16"):
            with fp32_matmul_math(mode):
                out = a @ b.t()
                error[mode] = ((out.double() - exact).abs().max() / exact.abs().max()).item()
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    a @ b.t()
                    times.append(time.perf_counter() - t0)
            seconds[mode] = min(times)
    return seconds["ieee"] / seconds["bf16"], error["ieee"], error["bf16"]


@functools.cache
def bf16_math_ok() -> bool:
    """Whether the bf16 math mode is at least `MIN_SPEEDUP` faster than float32 and within `MAX_REL_ERROR` of
    float64 on `probe_bf16_math`: measured once per process (about 0.2 s) and logged."""
    speedup, error_ieee, error_bf16 = probe_bf16_math()
    ok = speedup >= MIN_SPEEDUP and error_bf16 <= MAX_REL_ERROR
    logger.info(f"LM head under bf16 autocast: oneDNN's bf16 math mode measured {speedup:.2f}x float32, relative "
                f"error {error_bf16:.1e} (float32 {error_ieee:.1e}) -> {'bf16 math' if ok else 'float32'}")
    return ok


def head_fp32_math(device: torch.device) -> str:
    """The head's float32 matmul mode: "bf16" under a CPU's bfloat16 autocast where `bf16_math_ok`, else "ieee"."""
    bf16_autocast = (device.type == "cpu" and torch.is_autocast_enabled("cpu")
                     and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return "bf16" if bf16_autocast and bf16_math_ok() else "ieee"


class _HeadTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, rows: int, math: str) -> Tensor:
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32 at least, whatever the weights
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        lse = torch.empty_like(out)
        with fp32_matmul_math(math):
            for i in range(0, hidden.shape[0], rows):
                logits = (hidden[i:i + rows] @ weight.t()).to(dtype)
                torch.logsumexp(logits, -1, out=lse[i:i + rows])
                out[i:i + rows] = logits.gather(1, targets[i:i + rows, None]).squeeze(1) - lse[i:i + rows]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows, ctx.math = rows, math
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        with fp32_matmul_math(ctx.math):  # the backward runs outside the forward's context
            return _backward(grad, hidden, weight, targets, lse, ctx.rows, ctx.needs_input_grad[:2])


def _backward(grad: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, rows: int,
              needs: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None, None, None, None]:
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if needs[1] else None
    for i in range(0, hidden.shape[0], rows):
        h, g = hidden[i:i + rows], grad[i:i + rows, None].to(lse.dtype)
        d = (h @ weight.t()).to(lse.dtype)
        d.sub_(lse[i:i + rows, None]).exp_().mul_(-g)  # -g * softmax, in the logits' own memory
        d.scatter_add_(1, targets[i:i + rows, None], g)  # + g at the target
        if grad_hidden is not None:
            torch.mm(d.to(weight.dtype), weight, out=grad_hidden[i:i + rows])
        if grad_weight is not None:
            grad_weight.addmm_(d.t(), h.to(lse.dtype))
    return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def head_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, rows: int | None = None,
                     math: str = "ieee") -> Tensor:
    """(N,) log p(targets[n]) under logits `hidden @ weight.T`, for (N, H) `hidden`, (V, H) `weight` and (N,)
    `targets`, in float32 (float64 for float64 weights); `rows` per chunk, `chunks.chunk_rows` when None; float32
    matmuls in oneDNN math `math` (`fp32_matmul_math`), forward and backward."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(f"expected hidden (N, H), weight (V, H) and targets (N,), got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(targets.shape)}")
    rows = rows or chunk_rows(4 * weight.shape[0], hidden.device)  # a chunk's float32 logits fit the budget
    return _HeadTokenLogps.apply(hidden.to(weight.dtype), weight, targets, rows, math)
