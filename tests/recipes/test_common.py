"""recipes/common.py: device and dtype choice, the LoRA settings of TrainingOptions and its fsdp rule, what
make_trainable leaves trainable, refuse_past_context, load's tokenizer/vocabulary check, and save_outputs' dtype."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from selfrefine.checkpoint import config_dtype, load_model, save_model

from selfrefine.errors import UserError
from selfrefine.lora import LoRAConfig, merge_rounding
from selfrefine.model import Transformer
from selfrefine.recipes.common import (WEIGHT_DTYPES, ModelOptions, TrainingOptions, load, make_trainable,
                                       hold_out, pick_device, pick_dtype, refuse_past_context, save_outputs)
from tests.helpers import make_tiny_model_dir, tiny_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def training(**kw) -> TrainingOptions:
    return TrainingOptions(model="m", out="run", **kw)


@pytest.mark.parametrize("native", [False, True])
def test_pick_dtype(monkeypatch, native):
    monkeypatch.setattr("selfrefine.recipes.common.bf16_native", lambda device: native)
    for training_run in (False, True):
        for name, dtype in WEIGHT_DTYPES.items():
            assert pick_dtype(name, CPU, training_run) == pick_dtype(name, CUDA, training_run) == dtype
        assert pick_dtype("auto", CUDA, training_run) == pick_dtype("auto", CPU, training_run)
    assert pick_dtype("auto", CPU, training=False) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("auto", CPU, training=True) == torch.float32  # float32 master weights under autocast


def test_pick_device_refuses_cuda_when_not_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == CPU and pick_device("cpu") == CPU
    for name in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=f"--device {name}: CUDA is not available"):
            pick_device(name)


def test_lora_config_from_training_options():
    opts = training(lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_targets=" q_proj, v_proj ,, down_proj,")
    assert opts.lora_config() == LoRAConfig(r=4, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    assert training().lora_config().targets == LoRAConfig().targets
    assert training(full=True, lora_targets="q_proj").lora_config() is None


def test_fsdp_only_with_full_fine_tuning():
    with pytest.raises(UserError, match="drop --fsdp"):
        training(fsdp=True)
    assert training(fsdp=True, full=True).fsdp


def test_report_to_tensorboard_without_the_package_fails_before_anything_loads(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails as without tensorboard
    with pytest.raises(UserError, match="--report-to tensorboard needs the tensorboard package"):
        training(report_to="tensorboard")
    assert training().train_config().report_to == "none"


def test_make_trainable_lora_adapters_only_or_everything():
    model = Transformer(tiny_config(num_layers=2))
    targets = ("q_proj", "v_proj")
    make_trainable(model, LoRAConfig(r=2, targets=targets), seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert len(trainable) == 2 * len(targets) * model.config.num_layers
    assert any(not p.requires_grad for p in model.parameters())

    full = Transformer(tiny_config(num_layers=2)).requires_grad_(False)
    make_trainable(full, None, seed=0)
    assert all(p.requires_grad for p in full.parameters())
    with pytest.raises(UserError, match="'nothing_proj' matches no module"):
        make_trainable(Transformer(tiny_config(num_layers=1)), LoRAConfig(targets=("nothing_proj",)), seed=0)


@pytest.mark.parametrize("n, fraction, held", [(16, 0.05, 1), (400, 0.05, 20), (1, 0.5, 0), (16, 0.0, 0)])
def test_hold_out_keeps_at_least_one_when_a_fraction_is_asked(n: int, fraction: float, held: int):
    """A fraction that rounds to nothing still holds one item out (of two or more), so the lowest-validation-loss
    rule applies at every data size; the split is a seeded permutation, all items kept exactly once."""
    train, val = hold_out(list(range(n)), fraction, seed=3)
    assert len(val) == held and sorted(train + val) == list(range(n))
    assert (train, val) == hold_out(list(range(n)), fraction, seed=3)


def test_refuse_past_context_names_the_first_too_long_line():
    ctx = 16
    refuse_past_context([(1, ctx), (2, 1), (None, ctx)], ctx, "example", "data.jsonl")  # exactly ctx is fine
    with pytest.raises(UserError, match=f"2 example\\(s\\) longer than the model's max_position_embeddings \\({ctx} "
                                        f"tokens; the first here\\): set --max-len {ctx} or less") as e:
        refuse_past_context([(1, ctx), (3, ctx + 1), (4, 1), (7, ctx + 5)], ctx, "example", "data.jsonl")
    assert (e.value.file, e.value.line) == ("data.jsonl", 3)


def test_load_gives_the_picked_dtype_and_tokenizer_on_cpu(tiny_dir: Path):
    model, tok, device = load(ModelOptions(model=str(tiny_dir), device="cpu"))
    assert device == CPU and tok.vocab_size <= model.config.vocab_size
    assert {p.dtype for p in model.parameters()} == {pick_dtype("auto", CPU, training=False)}
    model, _, _ = load(ModelOptions(model=str(tiny_dir), device="cpu"), training=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_load_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path: Path):
    vocab = tiny_config().vocab_size - 1
    small = make_tiny_model_dir(tmp_path / "small", num_layers=1, vocab_size=vocab)
    with pytest.raises(UserError, match=f"tokenizer.json has {vocab + 1} tokens but config.json's vocab_size is "
                                        f"{vocab}: they belong to different models") as e:
        load(ModelOptions(model=str(small), device="cpu"))
    assert e.value.file == str(small / "tokenizer.json")


@pytest.mark.parametrize("save_dtype, want", [("auto", torch.bfloat16), ("float16", torch.float16)])
def test_save_outputs_keeps_the_base_dtype_by_default(tmp_path: Path, save_dtype: str, want: torch.dtype):
    """A float32-trained model of a bfloat16 base is saved as bfloat16 unless --save-dtype says otherwise."""
    base = tmp_path / "base"
    save_model(load_model(make_tiny_model_dir(tmp_path / "tiny")), base, dtype="bfloat16")
    save_outputs(load_model(base, torch.float32), None, False, str(base), tmp_path / "run", save_dtype)
    assert config_dtype(tmp_path / "run" / "merged") == want
    assert {p.dtype for p in load_model(tmp_path / "run" / "merged", want).parameters()} == {want}


def _adapted(tmp_path: Path, b_scale: float) -> tuple[Transformer, LoRAConfig, Path]:
    """A tiny float32 model with a trained-looking adapter whose change has about `b_scale` times its size."""
    base = make_tiny_model_dir(tmp_path / "tiny")
    model = load_model(base, torch.float32)
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0)
    make_trainable(model, lora, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_scale, generator=torch.Generator().manual_seed(1))
    return model, lora, base


def test_merge_rounding_is_the_rounding_error_as_a_share_of_the_adapters_change(tmp_path: Path):
    """A change far below bf16's resolution of the weights is mostly rounded away; a large one survives; float32
    keeps it exactly."""
    model, _, _ = _adapted(tmp_path, 1e-6)
    assert merge_rounding(model, torch.bfloat16) > 1.0
    assert merge_rounding(model, torch.float32) == 0.0
    model, _, _ = _adapted(tmp_path / "big", 1.0)
    assert merge_rounding(model, torch.bfloat16) < 0.05


def test_save_outputs_warns_when_a_merge_into_16_bits_would_erase_the_adapter(tmp_path: Path, capsys):
    def said() -> str:
        out = capsys.readouterr()
        return out.out + out.err

    model, lora, base = _adapted(tmp_path, 1e-6)
    save_outputs(model, lora, True, str(base), tmp_path / "run32", "float32")
    assert "rounded by" not in said()
    model, lora, base = _adapted(tmp_path / "again", 1e-6)
    save_outputs(model, lora, True, str(base), tmp_path / "run16", "bfloat16")
    assert f"{tmp_path / 'run16' / 'merged'}: merged into bfloat16 weights, the adapter's change is rounded by" \
        in said()
    assert (tmp_path / "run16" / "adapter" / "adapter_model.safetensors").exists()  # the adapter is kept in full
