"""The shared training loop: exact resume, clean SIGINT stop, NaN stop, crash-safe checkpoints."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from selfrefine.errors import UserError
from selfrefine.files import atomic_write
from selfrefine import trainer
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


def test_non_finite_update_is_undone_and_checkpoint_stays_last_good(tmp_path: Path, monkeypatch):
    """Loss and gradient finite, but the optimizer step writes NaN (as an overflowing lr does): the step is
    undone (weights and optimizer moments equal the pre-step ones), nothing of it is logged or checkpointed,
    and the run stops naming the step with exit code 3."""
    import json

    from selfrefine import trainer

    seen: dict = {}

    class NaNOnThirdStep(torch.optim.AdamW):
        calls = 0

        def step(self, closure=None):
            NaNOnThirdStep.calls += 1
            if NaNOnThirdStep.calls == 3:
                seen["params"] = [p.detach().clone() for g in self.param_groups for p in g["params"]]
            out = super().step(closure)
            if NaNOnThirdStep.calls == 3:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
            return out

    monkeypatch.setattr(trainer, "make_optimizer", lambda params, cfg, device: NaNOnThirdStep(params, lr=cfg.lr))
    model, data, collate, step = toy_problem()
    cfg = TrainConfig(**{**CFG.__dict__, "save_every": 1})
    with pytest.raises(TrainingDiverged, match=r"non-finite update at step 3; .*undone.*last good checkpoint") as e:
        train(model, data, collate, step, cfg, tmp_path, torch.device("cpu"))
    assert e.value.exit_code == 3 and e.value.step == 3
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(p, q) for p, q in zip(params, seen["params"]))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2]
    fresh, *_ = toy_problem()
    opt = torch.optim.AdamW(fresh.parameters())
    assert load_checkpoint(tmp_path, fresh, opt, None) == 2
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), seen["params"]))  # checkpoint = restored weights


def test_infinite_lr_update_is_undone_at_first_step(tmp_path: Path):
    model, data, collate, step = toy_problem()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(**{**CFG.__dict__, "warmup": 0})
    cfg.lr = float("inf")  # past the config's own check, as a buggy schedule could be
    with pytest.raises(TrainingDiverged, match=r"non-finite update at step 1.*no checkpoint was written"):
        train(model, data, collate, step, cfg, tmp_path, torch.device("cpu"))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not (tmp_path / CHECKPOINT).exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("lr", -1e-3), ("epochs", float("nan")),
                                         ("weight_decay", float("nan")), ("max_grad_norm", -1.0),
                                         ("max_grad_norm", float("nan")), ("batch_size", 0)])
def test_train_config_refuses_out_of_range_values(field: str, value):
    with pytest.raises(UserError, match=field):
        TrainConfig(**{**CFG.__dict__, field: value})


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


# ---- gradient accumulation: one optimizer step is one mean over all its examples ---------------------------

ANSWER_LENGTHS = (2, 65, 11, 30)  # very different: a per-micro-batch mean would weigh 2 tokens like 65
PROMPT_LENGTHS = (5, 9, 3, 12)


def tiny_lm_problem(full: bool):
    """A float64 tiny Llama (`tests.helpers.tiny_config`) with LoRA (B non-zero, so A gets gradient too) or
    fully trainable, and 4 SFT examples whose answers are 2 to 65 tokens long."""
    from selfrefine.data import IGNORE, TokenizedText
    from selfrefine.lora import LoRAConfig, inject_lora
    from selfrefine.model import Transformer
    from tests.helpers import tiny_config

    gen = torch.Generator().manual_seed(0)
    model = Transformer(tiny_config(num_layers=1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.02)
    if full:
        model.requires_grad_(True)
    else:
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():  # not the global RNG's Kaiming init: every call must build the same adapter
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.double()
    vocab = model.config.vocab_size
    examples = []
    for n_prompt, n_answer in zip(PROMPT_LENGTHS, ANSWER_LENGTHS):
        ids = torch.randint(3, vocab, (n_prompt + n_answer,), generator=gen).tolist()
        examples.append(TokenizedText(ids, [IGNORE] * n_prompt + ids[n_prompt:]))
    return model, examples


def sft_step_float64(model, batch):
    """`recipes.sft.sft_step` with the cross-entropy in float64 (`losses` computes it in float32, whose rounding
    would hide a 1e-10 comparison): the mean over the batch's completion tokens."""
    import torch.nn.functional as F

    from selfrefine.losses import scored_positions

    labels = batch["labels"]
    logits = model(batch["input_ids"], logits_at=scored_positions(labels))
    targets = labels[:, 1:][labels[:, 1:] != -100]
    return F.cross_entropy(logits, targets, reduction="sum") / max(len(targets), 1), {}, batch["n_tokens"]


def one_step_update(full: bool, batch_size: int, grad_accum: int, out_dir: Path) -> tuple[dict, dict]:
    """(parameter update of one optimizer step over all 4 examples, its logged metrics)."""
    from selfrefine.data import pad_batch
    from selfrefine.recipes.sft import completion_tokens

    model, examples = tiny_lm_problem(full)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=batch_size, grad_accum=grad_accum, warmup=0, seed=1)
    last = train(model, examples, lambda b: pad_batch(b, 2), sft_step_float64, cfg, out_dir, torch.device("cpu"),
                 loss_weight=completion_tokens)
    after = dict(model.named_parameters())
    return {n: (after[n].detach() - b) for n, b in before.items()}, last


def update_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_accumulation_equals_one_big_batch_token_weighted(tmp_path: Path, full: bool):
    """batch 4 x accum 1 == batch 1 x accum 4 == batch 2 x accum 2: the step's loss is the mean over all its
    completion tokens, not the mean of per-micro-batch means (2-token and 65-token answers weigh 2:65)."""
    ref, ref_last = one_step_update(full, 4, 1, tmp_path / "4x1")
    assert max(t.abs().max().item() for t in ref.values()) > 1e-3  # a real step
    for bs, acc in ((1, 4), (2, 2)):
        upd, last = one_step_update(full, bs, acc, tmp_path / f"{bs}x{acc}")
        assert update_diff(ref, upd) <= 1e-10, (bs, acc)
        assert last["loss"] == pytest.approx(ref_last["loss"], rel=1e-12, abs=0)
        assert last["grad_norm"] == pytest.approx(ref_last["grad_norm"], rel=1e-10, abs=0)
        assert last["tokens"] == ref_last["tokens"]


def test_accumulation_with_uneven_micro_batches_weighs_examples():
    """loss_weight None (a per-example mean, as DPO's per-pair loss): 5 examples as micro-batches of 2, 2 and 1
    give the step of one batch of 5 (the lone example weighs 1/5, not 1/3), loss and metrics included."""
    def run(batch_size: int, grad_accum: int, out: Path):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1).double()
        data = [(torch.randn(4, dtype=torch.float64), torch.randn(1, dtype=torch.float64) * (i + 1))
                for i in range(5)]
        collate = lambda b: (torch.stack([x for x, _ in b]), torch.stack([y for _, y in b]))

        def step(m, batch):
            x, y = batch
            err = (m(x) - y) ** 2
            return err.mean(), {"abs_y": y.abs().mean().item()}, x.shape[0]

        before = [p.detach().clone() for p in model.parameters()]
        cfg = TrainConfig(lr=0.1, max_steps=1, batch_size=batch_size, grad_accum=grad_accum, warmup=0,
                          max_grad_norm=1e9)
        last = train(model, data, collate, step, cfg, out, torch.device("cpu"))
        return [p.detach() - b for p, b in zip(model.parameters(), before)], last

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ref, ref_last = run(5, 1, Path(d) / "a")
        for bs, acc in ((2, 3), (1, 5)):
            upd, last = run(bs, acc, Path(d) / f"{bs}x{acc}")
            assert max((a - b).abs().max().item() for a, b in zip(ref, upd)) <= 1e-12
            for key in ("loss", "abs_y", "grad_norm"):
                assert last[key] == pytest.approx(ref_last[key], rel=1e-12), key


def test_held_out_loss_is_the_weighted_mean_of_its_batches():
    """Batches of 2 with losses 1, 3, 5 (per-example weights 2, 2, 1; token weights 10, 1, 1)."""
    from selfrefine.trainer import held_out_loss

    losses = iter([1.0, 3.0, 5.0, 1.0, 3.0, 5.0])
    step = lambda m, batch: (torch.tensor(next(losses)), {}, 0)  # noqa: E731
    assert held_out_loss(None, [0, 1, 2, 3, 4], list, step, 2) == pytest.approx((2 + 6 + 5) / 5)
    weight = lambda batch: 10 if batch == [0, 1] else 1  # noqa: E731
    assert held_out_loss(None, [0, 1, 2, 3, 4], list, step, 2, weight) == pytest.approx((10 + 3 + 5) / 12)


def test_validation_every_n_steps_keeps_the_lowest_and_resumes_with_it(tmp_path: Path):
    """Validated after steps 3 and 6 and the last (8), with losses 3, 1, 2: the model ends with step 6's weights,
    logged; a resume at the end keeps them; validation runs in eval mode (no dropout) and under no_grad."""
    model, data, collate, step = toy_problem()
    seen, losses = {}, iter([3.0, 1.0, 2.0])

    def validate(m):
        assert not m.training and not torch.is_grad_enabled()
        seen[len(seen)] = [p.detach().clone() for p in model.parameters()]
        return next(losses)

    cfg = TrainConfig(**{**CFG.__dict__, "eval_every": 3})
    last = train(model, data, collate, step, cfg, tmp_path, torch.device("cpu"), validate=validate)
    assert (last["best_step"], last["best_val_loss"], last["val_loss"]) == (6, 1.0, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(seen[1], model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], model.parameters()))  # not simply the last
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r] == [(3, 3.0), (6, 1.0), (8, 2.0)]
    assert model.training
    model, *_ = toy_problem()
    again = train(model, data, collate, step, cfg, tmp_path, torch.device("cpu"), resume=True, validate=validate)
    assert again["best_step"] == 6 and all(torch.equal(a, b) for a, b in zip(seen[1], model.parameters()))


class FakeWriter:
    """Stands in for TensorBoard's SummaryWriter: records what the trainer writes."""

    def __init__(self, log_dir: str, purge_step: int) -> None:
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_report_to_tensorboard_writes_every_metric_against_its_step(tmp_path: Path, monkeypatch):
    """Every key of every metrics.jsonl line (val_loss included) becomes a scalar at that line's step; a resume
    purges the events past its checkpoint, as it drops those lines."""
    monkeypatch.setattr(trainer, "summary_writer", lambda: FakeWriter)
    FakeWriter.made = []
    model, data, collate, step = toy_problem()
    cfg = TrainConfig(**{**CFG.__dict__, "max_steps": 2, "report_to": "tensorboard"})
    train(model, data, collate, step, cfg, tmp_path, torch.device("cpu"), validate=lambda m: 0.5)
    (board,) = FakeWriter.made
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert board.scalars == [(k, v, r["step"]) for r in lines for k, v in r.items() if k != "step"]
    assert ("val_loss", 0.5, 2) in board.scalars and {"loss", "lr", "grad_norm"} <= {t for t, _, _ in board.scalars}
    assert board.log_dir == str(tmp_path / "tensorboard") and board.purge_step == 1 and board.closed
    model, *_ = toy_problem()
    train(model, data, collate, step, TrainConfig(**{**cfg.__dict__, "max_steps": 3}), tmp_path,
          torch.device("cpu"), resume=True)
    assert FakeWriter.made[1].purge_step == 3 and {s for _, _, s in FakeWriter.made[1].scalars} == {3}


def test_report_to_tensorboard_writes_an_events_file(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model, data, collate, step = toy_problem()
    cfg = TrainConfig(**{**CFG.__dict__, "max_steps": 2, "report_to": "tensorboard"})
    train(model, data, collate, step, cfg, tmp_path, torch.device("cpu"), validate=lambda m: 0.5)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2] and events.Scalars("val_loss")[0].value == 0.5


def test_report_to_tensorboard_without_the_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails as without tensorboard
    with pytest.raises(UserError, match="--report-to tensorboard needs the tensorboard package: pip install"):
        TrainConfig(report_to="tensorboard")
    with pytest.raises(UserError, match="report_to = 'mlflow': must be one of none, tensorboard, wandb"):
        TrainConfig(report_to="mlflow")


class FakeWandb:
    """Stands in for the wandb module and its run: records init's arguments, each log(data, step) and finish."""

    def __init__(self) -> None:
        self.inits, self.logged, self.finished = [], [], []

    def init(self, **kw: object) -> FakeWandb:
        self.inits.append(kw)
        return self

    def log(self, data: dict[str, float], step: int) -> None:
        self.logged.append((step, data))

    def finish(self, exit_code: int = 0) -> None:
        self.finished.append(exit_code)


def test_report_to_wandb_logs_every_record_at_its_step_offline_and_resumes_the_same_run(tmp_path: Path,
                                                                                         monkeypatch):
    """The W&B run gets run.json's settings once, each metrics.jsonl record at its step (val_loss included), is
    finished at the end, stays offline unless WANDB_MODE says otherwise, and a resume continues it by its id."""
    from selfrefine.recipes import sft
    from tests.helpers import make_tiny_model_dir

    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"What is {i} plus 3?", "completion": f"The answer is {i + 3}."})
                             + "\n" for i in range(8)), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["--model", str(make_tiny_model_dir(tmp_path / "model")), "--data", str(demos), "--out", str(out),
            "--batch-size", "2", "--val-fraction", "0.25", "--report-to", "wandb"]
    sft.main([*argv, "--max-steps", "2"])
    (init,) = wandb.inits
    run_id = (out / "wandb_id").read_text()
    assert init == {"id": run_id, "resume": "allow", "dir": str(out), "name": "run", "mode": "offline",
                    "config": json.loads((out / "run.json").read_text())["config"]}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert wandb.logged == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in lines]
    assert [s for s, _ in wandb.logged] == [1, 2, 2] and "val_loss" in wandb.logged[-1][1]
    assert wandb.finished == [0]
    monkeypatch.setenv("WANDB_MODE", "online")
    sft.main([*argv, "--max-steps", "3", "--resume", "--allow-config-change"])
    assert wandb.inits[1]["id"] == run_id and wandb.inits[1]["mode"] == "online"
    assert [s for s, _ in wandb.logged[3:]] == [3, 3] and wandb.finished == [0, 0]


def test_report_to_wandb_writes_an_offline_run(tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    model, data, collate, step = toy_problem()
    cfg = TrainConfig(**{**CFG.__dict__, "max_steps": 2, "report_to": "wandb"})
    train(model, data, collate, step, cfg, tmp_path, torch.device("cpu"))
    run_id = (tmp_path / "wandb_id").read_text()
    assert [p.name for p in (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")]


def test_report_to_wandb_without_the_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # the import fails as without wandb
    with pytest.raises(UserError, match="--report-to wandb needs the wandb package: pip install wandb"):
        TrainConfig(report_to="wandb")
    assert TrainConfig(report_to="none").report_to == "none"
