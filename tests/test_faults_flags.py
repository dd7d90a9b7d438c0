"""Out-of-range flags, broken model configs and weights, and a diverging run, each through a real command line.

Bad input: exit code 2, one line on stderr naming the problem, no traceback, nothing on disk changed (no stray
run.json). A run that diverges: exit code 3, one line naming the step, no adapter written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import make_tiny_model_dir
from tests.test_faults import DPO, ENV, EVAL, REPO, SAMPLE, SFT, edit_config, model_variant, tree_hash, write_jsonl


def nan_weight(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def smaller_vocab(d: Path) -> None:
    """A model whose embedding (and config.json) is 8 tokens short of its tokenizer."""
    tensors = load_file(d / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:-8].contiguous()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] - 8}))


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("faults_flags")
    model = make_tiny_model_dir(root / "model", num_layers=1)
    d = root / "data"
    d.mkdir()
    out = root / "outputs"
    out.mkdir()
    (out / "report.json").write_text('{"old": true}\n')
    good = {"prompt": "What is 2 plus 3?", "completion": "2 + 3 = 5. The answer is 5."}
    short = {"prompt": "Hi", "completion": "5"}
    variant = lambda name, edit: model_variant(model, root / name, edit)
    return SimpleNamespace(
        root=root, model=str(model), out=out,
        sft=write_jsonl(d / "sft.jsonl", [good] * 4),
        sft_long=write_jsonl(d / "sft_long.jsonl", [short, short, {"prompt": "apples " * 40, "completion": "5"}]),
        pairs=write_jsonl(d / "pairs.jsonl", [{"prompt": "What is 1 plus 1?", "chosen": "2", "rejected": "3"}] * 2),
        nan_weights=variant("nan_weights", nan_weight),
        rope_zero=variant("rope_zero", edit_config(rope_theta=0)),
        eps_negative=variant("eps_negative", edit_config(rms_norm_eps=-1)),
        size_string=variant("size_string", edit_config(hidden_size="64")),
        layers_float=variant("layers_float", edit_config(num_hidden_layers=1.5)),
        tie_string=variant("tie_string", edit_config(tie_word_embeddings="yes")),
        small_vocab=variant("small_vocab", smaller_vocab),
        small_ctx=variant("small_ctx", edit_config(max_position_embeddings=32)),
    )


@dataclass
class Case:
    argv: list[str]
    says: str  # a fragment of the one-line message
    file: str | None = None  # the file the message must start with (None: a flag is at fault)


def sft(w, *flags: str) -> list[str]:
    return SFT + ["--model", w.model, "--data", w.sft, "--out", f"{w.out}/new_run", *flags]


def dpo(w, *flags: str) -> list[str]:
    return DPO + ["--model", w.model, "--pairs", w.pairs, "--out", f"{w.out}/new_run", *flags]


def sample(w, *flags: str, model: str | None = None) -> list[str]:
    return SAMPLE + ["--model", model or w.model, "--task", "arith", "--size", "2", "--out", f"{w.out}/s.jsonl", *flags]


def evaluate(w, *flags: str, model: str | None = None) -> list[str]:
    return EVAL + ["--model", model or w.model, "--task", "arith", "--size", "2", "--out", f"{w.out}/report.json",
                   *flags]


CASES: dict[str, Callable[[SimpleNamespace], Case]] = {
    # training flags: checked when parsed, before any file is read or written
    "sft_lr_nan": lambda w: Case(sft(w, "--lr", "nan"), "--lr must be a finite number, got 'nan'"),
    "sft_lr_inf": lambda w: Case(sft(w, "--lr", "inf", "--warmup", "0"), "--lr must be a finite number"),
    "sft_lr_negative": lambda w: Case(sft(w, "--lr=-1e-3"), "--lr must be a finite number > 0"),
    "sft_epochs_nan": lambda w: Case(sft(w, "--epochs", "nan"), "--epochs"),
    "sft_weight_decay_nan": lambda w: Case(sft(w, "--weight-decay", "nan"), "--weight-decay"),
    "sft_max_grad_norm_nan": lambda w: Case(sft(w, "--max-grad-norm", "nan"), "--max-grad-norm"),
    "sft_max_grad_norm_negative": lambda w: Case(sft(w, "--max-grad-norm", "-1"), "--max-grad-norm must be a finite number > 0"),
    "sft_batch_size_zero": lambda w: Case(sft(w, "--batch-size", "0"), "--batch-size must be >= 1"),
    "sft_warmup_fraction": lambda w: Case(sft(w, "--warmup", "1.5"), "--warmup expected an integer"),
    "sft_val_fraction_one": lambda w: Case(sft(w, "--val-fraction", "1"), "--val-fraction must be a number in [0, 1)"),
    "sft_lora_dropout_big": lambda w: Case(sft(w, "--lora-dropout", "1.5"), "--lora-dropout"),
    "sft_device_tpu": lambda w: Case(sft(w, "--device", "tpu"), "--device must be auto, cpu, cuda"),
    # DPO's own flags
    "dpo_beta_zero_ipo": lambda w: Case(dpo(w, "--beta", "0", "--loss", "ipo"), "--beta must be a finite number > 0"),
    "dpo_label_smoothing_two": lambda w: Case(dpo(w, "--label-smoothing", "2"), "--label-smoothing must be in [0, 0.5)"),
    "dpo_label_smoothing_ipo": lambda w: Case(dpo(w, "--label-smoothing", "0.1", "--loss", "ipo"), "--loss sigmoid only"),
    "dpo_loss_unknown": lambda w: Case(dpo(w, "--loss", "kto"), "argument --loss: invalid choice"),
    # sampling flags
    "sample_temperature_nan": lambda w: Case(sample(w, "--temperature", "nan"), "--temperature"),
    "sample_top_p_zero": lambda w: Case(sample(w, "--top-p", "0"), "--top-p must be a number in (0, 1]"),
    "sample_top_k_negative": lambda w: Case(sample(w, "--top-k", "-1"), "--top-k"),
    "sample_n_zero": lambda w: Case(sample(w, "--n", "0"), "--n"),
    "eval_batch_size_zero": lambda w: Case(evaluate(w, "--batch-size", "0"), "--batch-size"),
    "eval_device_tpu": lambda w: Case(evaluate(w, "--device", "tpu"), "--device"),
    # models: weights and config.json
    "eval_nan_weights": lambda w: Case(evaluate(w, model=w.nan_weights), "non-finite values",
                                       f"{w.nan_weights}/model.safetensors"),
    "eval_rope_theta_zero": lambda w: Case(evaluate(w, model=w.rope_zero), "rope_theta must be a finite number > 0",
                                           f"{w.rope_zero}/config.json"),
    "sample_rms_norm_eps_negative": lambda w: Case(sample(w, model=w.eps_negative), "rms_norm_eps must be",
                                                   f"{w.eps_negative}/config.json"),
    "sft_hidden_size_string": lambda w: Case(sft(w, "--model", w.size_string),
                                             "hidden_size must be an integer >= 1", f"{w.size_string}/config.json"),
    "sft_layers_float": lambda w: Case(sft(w, "--model", w.layers_float),
                                       "num_hidden_layers must be an integer >= 1", f"{w.layers_float}/config.json"),
    "eval_tie_string": lambda w: Case(evaluate(w, model=w.tie_string), "tie_word_embeddings must be true or false",
                                      f"{w.tie_string}/config.json"),
    "eval_tokenizer_larger_than_vocab": lambda w: Case(evaluate(w, model=w.small_vocab), "vocab_size",
                                                       f"{w.small_vocab}/tokenizer.json"),
    "sft_example_past_context": lambda w: Case(
        SFT + ["--model", w.small_ctx, "--data", w.sft_long, "--out", f"{w.out}/new_run"],
        "max_position_embeddings (32 tokens", f"{w.sft_long}:3"),
}


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_flag_or_model_is_one_line_exit_2_and_changes_nothing(name: str, w: SimpleNamespace):
    case = CASES[name](w)
    before = tree_hash(w.root)
    r = run(case.argv)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith("error: " + (f"{case.file}" if case.file else "--")) or (
        case.file is None and not lines[0].startswith(f"error: {w.root}")), lines[0]
    assert case.says in lines[0], lines[0]
    after = tree_hash(w.root)
    assert after == before, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def test_divergence_exits_3_naming_the_step_and_writes_no_adapter(w: SimpleNamespace, tmp_path: Path):
    """An lr that overflows float32 (finite as a flag) makes the first update non-finite: the step is undone,
    the run stops with exit code 3 naming it, and no adapter or checkpoint is written from NaN weights."""
    out = tmp_path / "diverged"
    r = run(SFT + ["--model", w.model, "--data", w.sft, "--out", str(out), "--lr", "1e39", "--warmup", "0"])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("sft:")]  # less the progress bar
    assert r.returncode == 3 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith(f"error: {out}: non-finite update at step 1;") and "undone" in lines[0], lines[0]
    assert not (out / "adapter").exists() and not (out / "checkpoint.pt").exists()
    assert not (out / "metrics.jsonl").exists()
