"""The learning-rate schedule and the data order, pure functions of the step."""

from __future__ import annotations

import math

import pytest

from selfrefine.schedule import MicroBatchOrder, cosine_lr, total_steps


def test_cosine_schedule_shape():
    lrs = [cosine_lr(s, 1.0, 2, 10) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert cosine_lr(10, 1.0, 2, 10) == pytest.approx(0.1)


def test_micro_batches_cover_each_epoch_once():
    order = MicroBatchOrder(10, 3, seed=0)
    epoch0 = sum((order.micro_batch(k) for k in range(order.per_epoch)), [])
    assert sorted(epoch0) == list(range(10))
    assert order.micro_batch(order.per_epoch) != order.micro_batch(0) or order.per_epoch == 1


@pytest.mark.parametrize("n,batch_size,grad_accum,epochs", [(10, 3, 2, 1.0), (10, 3, 2, 2.5), (7, 8, 4, 3.0),
                                                           (100, 1, 1, 0.5), (1, 3, 8, 0.1)])
def test_total_steps_is_the_fewest_steps_covering_the_epochs(n: int, batch_size: int, grad_accum: int, epochs: float):
    micro_batches = epochs * math.ceil(n / batch_size)  # what `epochs` passes over the data take
    steps = total_steps(n, batch_size, grad_accum, epochs, max_steps=0)
    assert steps >= 1 and steps * grad_accum >= micro_batches
    assert steps == 1 or (steps - 1) * grad_accum < micro_batches
    assert total_steps(n, batch_size, grad_accum, epochs, max_steps=steps + 5) == steps + 5  # max_steps wins
