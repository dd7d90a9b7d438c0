"""train_dpo.py on a tiny model: policy == reference at step 0, frozen reference, precomputed reference,
and a short run that separates chosen from rejected."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from selfrefine.checkpoint import load_model
from selfrefine.data import collate_pairs
from selfrefine.errors import UserError
from selfrefine.lora import LoRAConfig, inject_lora
from selfrefine.preference import load_pairs
from selfrefine.recipes import dpo
from selfrefine.tokenizer import Tokenizer
from selfrefine.trainer import TrainConfig, train

from .conftest import write_jsonl


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def dpo_args(**kw) -> argparse.Namespace:
    return dpo.parser().parse_args(["--model", "m", "--out", "o", *sum(([f"--{k}", str(v)] for k, v in kw.items()), [])])


def encoded(tiny_dir: Path, pairs: Path):
    tok = Tokenizer.from_dir(tiny_dir)
    records, _ = load_pairs(pairs)
    return tok, dpo.encode_pairs(tok, records, 128, pairs)


def test_step0_rewards_exactly_zero_then_separates(tiny_dir: Path, pairs: Path, tmp_path: Path):
    out = tmp_path / "run"
    dpo.main(["--model", str(tiny_dir), "--pairs", str(pairs), "--out", str(out), "--max-steps", "25",
              "--batch-size", "3", "--lr", "1e-2", "--warmup", "0", "--lora-r", "8", "--beta", "0.5"])
    m = metrics(out)
    assert m[0]["rewards/chosen"] == 0.0 and m[0]["rewards/rejected"] == 0.0 and m[0]["rewards/margin"] == 0.0
    assert m[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    late = m[-4:]
    assert sum(r["rewards/margin"] for r in late) / 4 > 1.0
    assert sum(r["rewards/accuracy"] for r in late) / 4 > 0.9
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("full", [False, True])
def test_reference_weights_stay_bit_identical(tiny_dir: Path, pairs: Path, tmp_path: Path, full: bool):
    tok, examples = encoded(tiny_dir, pairs)
    model = load_model(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = None
    if full:
        import copy
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
    else:
        inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    step = dpo.DPOStep(dpo_args(beta=0.5), reference)
    train(model, examples, lambda b: collate_pairs(b, tok.pad_id), step,
          TrainConfig(lr=1e-2, max_steps=4, batch_size=3, warmup=0), tmp_path, torch.device("cpu"))
    frozen = reference if full else model
    params = dict(frozen.named_parameters())
    for n, p in before.items():
        assert torch.equal(params[n], p), n
    if full:  # the policy itself did move
        assert not torch.equal(dict(model.named_parameters())["model.norm.weight"], before["model.norm.weight"])


def test_precomputed_reference_matches_on_the_fly(tiny_dir: Path, pairs: Path, tmp_path: Path):
    tok, examples = encoded(tiny_dir, pairs)
    model = load_model(tiny_dir)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter, so "adapter off" matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    step = dpo.DPOStep(dpo_args(), None)
    dpo.precompute_reference(step, model, examples, tok.pad_id, 4, tmp_path, key="k")
    batch = collate_pairs(examples[1:4], tok.pad_id)
    cached = batch["ref_logps"]
    batch["ref_logps"] = None
    on_the_fly = step.reference_logps(model, batch)
    assert torch.allclose(cached, on_the_fly, atol=1e-5)
    policy, _ = step.logps(model, batch)  # the adapter really was switched off for the reference
    assert not torch.allclose(policy[:3], on_the_fly[:, 0], atol=1e-3)
    assert (tmp_path / dpo.REF_CACHE).exists()


def test_precompute_ref_run(tiny_dir: Path, pairs: Path, tmp_path: Path):
    out = tmp_path / "run"
    dpo.main(["--model", str(tiny_dir), "--pairs", str(pairs), "--out", str(out), "--max-steps", "2",
              "--batch-size", "3", "--precompute-ref", "--merge"])
    assert metrics(out)[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "merged" / "config.json").exists() and (out / dpo.REF_CACHE).exists()


def test_bad_pairs(tiny_dir: Path, tmp_path: Path):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"},
                                             {"prompt": "q", "chosen": "", "rejected": "b"}])
    with pytest.raises(UserError, match="p.jsonl"):
        dpo.main(["--model", str(tiny_dir), "--pairs", str(bad), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--lora-dropout must be 0"):
        dpo.main(["--model", str(tiny_dir), "--pairs", str(bad), "--out", str(tmp_path / "o"), "--lora-dropout", "0.1"])
