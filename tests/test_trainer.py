"""The shared training loop: exact resume, clean SIGINT stop, NaN stop, crash-safe checkpoints."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from selfrefine.errors import UserError
from selfrefine.io import atomic_write
from selfrefine.schedule import MicroBatchOrder, cosine_lr
from selfrefine.trainer import CHECKPOINT, Interrupted, TrainConfig, TrainingDiverged, load_checkpoint, train


def toy_problem(seed: int = 0):
    """Linear regression with dropout, so exact resume needs the RNG state too."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(4, 1))
    data = [(torch.randn(4), torch.randn(1)) for _ in range(10)]
    collate = lambda b: (torch.stack([x for x, _ in b]), torch.stack([y for _, y in b]))

    def step(m, batch):
        x, y = batch
        return ((m(x) - y) ** 2).mean(), {}, x.shape[0]

    return model, data, collate, step


CFG = TrainConfig(lr=0.05, max_steps=8, batch_size=3, grad_accum=2, warmup=2, seed=3)


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


def test_resume_after_sigint_is_bit_identical(tmp_path: Path):
    model, data, collate, step = toy_problem()
    train(model, data, collate, step, CFG, tmp_path / "straight", torch.device("cpu"))
    straight = [p.detach().clone() for p in model.parameters()]

    model, data, collate, step = toy_problem()
    calls = {"n": 0}

    def interrupting_step(m, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # in the middle of step 4's accumulation
            os.kill(os.getpid(), signal.SIGINT)
        return step(m, batch)

    with pytest.raises(Interrupted) as info:
        train(model, data, collate, interrupting_step, CFG, tmp_path / "split", torch.device("cpu"))
    assert info.value.step == 4  # the running step finished before stopping
    model, data, collate, step = toy_problem()
    train(model, data, collate, step, CFG, tmp_path / "split", torch.device("cpu"), resume=True)
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b)
    steps = [l for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == CFG.max_steps  # no duplicated metric lines


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path):
    model, data, collate, step = toy_problem()
    calls = {"n": 0}

    def nan_at_step_3(m, batch):
        calls["n"] += 1
        loss, metrics, n = step(m, batch)
        return (loss * float("nan") if calls["n"] > 4 else loss), metrics, n

    cfg = TrainConfig(**{**CFG.__dict__, "save_every": 1})
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 3.*last good checkpoint"):
        train(model, data, collate, nan_at_step_3, cfg, tmp_path, torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fresh, *_ = toy_problem()
    opt = torch.optim.AdamW(fresh.parameters())
    assert load_checkpoint(tmp_path, fresh, opt, None) == 2
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


@pytest.mark.parametrize("crash_at", ["write", "fsync", "rename"])
def test_crash_during_checkpoint_write_keeps_previous(tmp_path: Path, monkeypatch, crash_at: str):
    """A kill at any point of the atomic write leaves the previous checkpoint loadable."""
    model, data, collate, step = toy_problem()
    train(model, data, collate, step, TrainConfig(**{**CFG.__dict__, "max_steps": 2}), tmp_path, torch.device("cpu"))
    before = (tmp_path / CHECKPOINT).read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    target = {"write": (torch, "save"), "fsync": (os, "fsync"), "rename": (os, "replace")}[crash_at]
    monkeypatch.setattr(*target, boom)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / CHECKPOINT, "wb") as f:
            torch.save({"half": torch.zeros(3)}, f)
    monkeypatch.undo()
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    fresh, *_ = toy_problem()
    assert load_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), None) == 2


def test_damaged_checkpoint_is_a_user_error(tmp_path: Path):
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    model, *_ = toy_problem()
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()), None)
