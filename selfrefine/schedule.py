"""Learning-rate schedule and data order as pure functions of the step, so a resumed run replays exactly."""

from __future__ import annotations

import math

import torch


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup from 0, then cosine decay to `min_ratio * base_lr` at `total` steps."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class MicroBatchOrder:
    """The k-th micro-batch of the whole run: epoch e shuffles the data with seed + e, chunks of `batch_size`.

    Any step's micro-batches are computed from the step alone (no iterator state to save).
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int) -> None:
        self.n, self.bs, self.seed = n_examples, batch_size, seed
        self.per_epoch = math.ceil(n_examples / batch_size)
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def micro_batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        return self._perm(epoch)[j * self.bs:(j + 1) * self.bs]


def total_steps(n_examples: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int) -> int:
    """`max_steps` wins when set (> 0); else enough optimizer steps to cover `epochs` passes."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * math.ceil(n_examples / batch_size) / grad_accum))
