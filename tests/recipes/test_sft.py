"""train_sft.py end to end on a tiny model: masking, overfitting, exact resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfrefine.data import IGNORE, encode_example, pad_batch
from selfrefine.errors import UserError
from selfrefine.recipes import sft
from selfrefine.recipes.common import ModelOptions, load
from selfrefine.tokenizer import Tokenizer

from .conftest import write_jsonl


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_prompt_masked_and_one_trained_eos_even_when_pad_is_eos(tiny_dir: Path):
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.pad_id == tok.eos_id  # like SmolLM2
    ex, truncated = encode_example(tok, [{"role": "user", "content": "What is 2 plus 3?"}], "The answer is 5.",
                                   64, "f", 1)
    p, c = tok.encode_prompt_completion([{"role": "user", "content": "What is 2 plus 3?"}], "The answer is 5.")
    assert not truncated and ex.labels[: len(p)] == [IGNORE] * len(p) and ex.labels[len(p):] == c
    assert c[-1] in tok.stop_ids and c[:-1].count(c[-1]) == 0
    batch = pad_batch([ex, encode_example(tok, "Hi", "Ok", 64, "f", 2)[0]], tok.pad_id)
    short = batch["labels"][1]
    assert (short != IGNORE).sum() == len(tok.encode_prompt_completion("Hi", "Ok")[1])  # its EOS kept, padding masked


def test_loss_ignores_prompt_tokens_beyond_context(tiny_dir: Path):
    """Changing what the prompt positions would predict never changes the loss or its gradient."""
    from selfrefine.checkpoint import load_model
    from selfrefine.losses import sft_loss

    model = load_model(tiny_dir)
    tok = Tokenizer.from_dir(tiny_dir)
    ex, _ = encode_example(tok, "What is 2 plus 3?", "The answer is 5.", 64, "f", 1)
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    logits = model(ids)
    grads = []
    for noise in (0.0, 5.0):
        lg = logits.detach().clone().requires_grad_(True)
        prompt_rows = (labels[0, 1:] == IGNORE).nonzero().squeeze(1)
        with torch.no_grad():
            lg[0, prompt_rows] += noise * torch.randn_like(lg[0, prompt_rows])
        loss = sft_loss(lg, labels)
        loss.backward()
        grads.append((loss.item(), lg.grad[0, (labels[0, 1:] != IGNORE).nonzero().squeeze(1)]))
    assert grads[0][0] == grads[1][0] and torch.equal(grads[0][1], grads[1][1])


def test_tiny_overfit_drives_loss_near_zero(tiny_dir: Path, demos: Path, tmp_path: Path):
    last = sft.main(["--model", str(tiny_dir), "--data", str(demos), "--out", str(tmp_path / "run"), "--full",
                     "--max-steps", "100", "--batch-size", "8", "--lr", "1e-2", "--warmup", "5"])
    assert metrics(tmp_path / "run")[0]["loss"] > 3.0
    assert last["loss"] < 0.1


def test_lora_sigint_resume_equals_straight_run(tiny_dir: Path, demos: Path, tmp_path: Path, monkeypatch):
    common = ["--model", str(tiny_dir), "--data", str(demos), "--max-steps", "6", "--batch-size", "2",
              "--grad-accum", "2", "--lora-r", "4", "--lora-dropout", "0.1", "--lr", "1e-2", "--seed", "5"]
    sft.main(common + ["--out", str(tmp_path / "straight")])
    calls = {"n": 0}
    real = sft.sft_step

    def interrupting(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, batch)

    monkeypatch.setattr(sft, "sft_step", interrupting)
    with pytest.raises(SystemExit) as info:
        sft.main(common + ["--out", str(tmp_path / "split")])
    assert info.value.code == 130
    monkeypatch.setattr(sft, "sft_step", real)
    sft.main(common + ["--out", str(tmp_path / "split"), "--resume"])
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_output_loads_in_transformers(tiny_dir: Path, demos: Path, tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    from selfrefine.checkpoint import load_model
    from selfrefine.lora import load_adapter

    out = tmp_path / "run"
    sft.main(["--model", str(tiny_dir), "--data", str(demos), "--out", str(out), "--max-steps", "3",
              "--lr", "1e-2", "--merge"])
    ids = torch.tensor([[5, 9, 14, 20]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    ours = load_model(tiny_dir)
    load_adapter(ours, out / "adapter")
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)
    recorded = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_dir.resolve())  # what it was trained on, for PEFT's AutoPeftModel loader
    # the merged directory knows its adapter: applying it again (or a copy of it) is refused
    shutil.copytree(out / "adapter", tmp_path / "copy")
    for adapter in (out / "adapter", tmp_path / "copy"):
        with pytest.raises(UserError, match="already merged into .* applying it again would count it twice"):
            load(ModelOptions(model=str(out / "merged"), adapter=str(adapter), device="cpu"))
    load(ModelOptions(model=str(tiny_dir), adapter=str(out / "adapter"), device="cpu"))  # on its base: fine


@pytest.mark.parametrize("bad,match", [
    ({"prompt": "x"}, r"demos.jsonl:2: missing field 'completion'"),
    ({"prompt": "word " * 300, "completion": "y"}, r"demos.jsonl:2: prompt is \d+ tokens"),
])
def test_bad_records(tiny_dir: Path, tmp_path: Path, bad: dict, match: str):
    data = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "a", "completion": "b"}, bad])
    with pytest.raises(UserError, match=match):
        sft.main(["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--max-len", "64"])
    assert not (tmp_path / "o").exists()


def test_refuses_folder_of_another_run(tiny_dir: Path, demos: Path, tmp_path: Path):
    out = tmp_path / "run"
    sft.main(["--model", str(tiny_dir), "--data", str(demos), "--out", str(out), "--max-steps", "1"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds another run"):
        sft.main(["--model", str(tiny_dir), "--data", str(demos), "--out", str(out), "--max-steps", "2"])
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_logits_only_at_scored_positions_equal_full_logits(tiny_dir: Path):
    """The training steps project only the positions that predict completion tokens."""
    from selfrefine.checkpoint import load_model
    from selfrefine.losses import scored_positions, sft_loss, packed_sft_loss

    model = load_model(tiny_dir)
    ids = torch.randint(3, 200, (2, 12))
    labels = ids.clone()
    labels[0, :5], labels[1, :8], labels[1, 11:] = IGNORE, IGNORE, IGNORE
    positions = scored_positions(labels)
    assert positions.sum() == 7 + 3  # labels at 5..11 and 8..10, each predicted from the position before
    full = model(ids)
    packed = model(ids, logits_at=positions)
    assert torch.allclose(packed, full[positions], atol=1e-6)
    assert torch.allclose(packed_sft_loss(packed, labels), sft_loss(full, labels), atol=1e-6)


def test_val_fraction_holds_out_examples_and_logs_their_loss(tiny_dir: Path, demos: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    last = sft.main(["--model", str(tiny_dir), "--data", str(demos), "--out", str(out), "--max-steps", "3",
                     "--batch-size", "2", "--lora-r", "4", "--val-fraction", "0.25"])
    n = sum(1 for _ in demos.open())
    assert f"SFT: {n - n // 4} train / {n // 4} val examples" in capsys.readouterr().out
    assert [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r] == [(3, last["val_loss"])]
    assert (last["best_step"], last["best_val_loss"]) == (3, last["val_loss"]) and last["val_loss"] > 0
