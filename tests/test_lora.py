"""LoRA: closed forms for the layer, exactness of the switched-off / merged / reloaded model, and PEFT
(on the `transformers` model of the same weights) as the oracle for the adapter file format."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from selfrefine.checkpoint import load_model
from selfrefine.errors import UserError
from selfrefine.lora import (LoRAConfig, LoRALinear, adapter_disabled, inject_lora, load_adapter, lora_dropout,
                             lora_state_dict, merge_and_unload, merge_lora, save_adapter, set_adapter_enabled, unmerge_lora)
from selfrefine.model import ModelConfig, Transformer

TARGETS = LoRAConfig().targets


def tiny(tie: bool = False, bias: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=tie, attention_bias=bias)
    return Transformer(cfg).eval()


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (and a fresh A) so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding through the network: 1e-6 of the logit scale (tied tiny models reach ~40)."""
    torch.testing.assert_close(got, want, atol=1e-6 * want.abs().max().item(), rtol=0)


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- the layer

def test_zero_B_is_exactly_the_base_layer() -> None:
    torch.manual_seed(0)
    base, x = nn.Linear(8, 6), torch.randn(3, 5, 8)
    want = base(x)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    assert layer.weight is base.weight and layer.bias is base.bias  # adopted, not copied
    assert torch.equal(layer.eval()(x), want)
    assert torch.equal(layer.train()(x), want)  # dropout on the LoRA path of a zero update changes nothing


def test_init_and_closed_form() -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 6)
    layer = LoRALinear(base, r=16, alpha=8, dropout=0.0)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)): gain sqrt(2/6), bound gain*sqrt(3/fan_in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.95 * bound
    assert layer.lora_A.shape == (16, 64) and layer.lora_B.shape == (6, 16) and not layer.lora_B.any()
    randomize_lora(layer)
    x = torch.randn(4, 64)
    want = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * (8 / 16)
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=0)


def test_dropout_only_in_train_mode_and_only_on_the_lora_input() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=4, dropout=0.5)
    randomize_lora(layer)
    x = torch.randn(5, 16)
    lora = lambda h: h @ layer.lora_A.T @ layer.lora_B.T  # noqa: E731
    base = F.linear(x, layer.weight, layer.bias)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    torch.testing.assert_close(layer(x), base + lora(x), atol=1e-6, rtol=0)
    layer.train()
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    want = base + lora(lora_dropout(x, 0.5, training=True))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, base + lora(x), atol=1e-3)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_lora_dropout_rate_and_scale(p: float) -> None:
    """Each of the four 16-bit lanes of a 64-bit draw drops at p (rounded to 2^-16): a lane fed by fewer random
    bits (the sign of a non-negative draw, say) would be off by far more than the 5-sigma tolerance; the kept
    elements are scaled so the expectation is x."""
    torch.manual_seed(0)
    x = torch.ones(4, 250_000)
    out = lora_dropout(x, p, training=True)
    q = round(p * 2**16) / 2**16
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / (1 - q), rel=1e-6)
    for lane in range(4):
        dropped = (out.flatten()[lane::4] == 0).double().mean().item()
        assert abs(dropped - q) < 5 * math.sqrt(q * (1 - q) / 250_000)
    assert abs(out.double().mean().item() - 1) < 5 * math.sqrt(q / (1 - q) / 1_000_000)


def test_lora_dropout_is_seeded_shaped_and_off_outside_training() -> None:
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16, requires_grad=True)  # 105 elements: not a multiple of 4
    assert lora_dropout(x, 0.5, training=False) is x and lora_dropout(x, 0.0, training=True) is x
    torch.manual_seed(1)
    a = lora_dropout(x, 0.5, training=True)
    torch.manual_seed(1)
    b = lora_dropout(x, 0.5, training=True)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b) and (a == 0).any() and (a != 0).any()
    a.float().sum().backward()  # d out / d x: the scale where kept, 0 where dropped
    assert torch.equal(x.grad, torch.where(a == 0, 0.0, 2.0).to(x.dtype))


def test_bfloat16_base_keeps_float32_adapter() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    randomize_lora(layer)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    want = F.linear(x, base.weight, base.bias) + (x.float() @ layer.lora_A.T @ layer.lora_B.T * 2).bfloat16()
    assert torch.equal(y, want)
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


# ---------------------------------------------------------------- injection into the model

def test_inject_wraps_targets_and_freezes_everything_else() -> None:
    model = tiny(tie=True)
    keys_before = list(model.state_dict())
    names = inject_lora(model, LoRAConfig(r=4, alpha=8))
    assert names == [f"model.layers.{i}.{part}" for i in range(2) for part in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    # The base weights keep their names; the adapter only adds keys.
    assert list(k for k in model.state_dict() if ".lora_" not in k) == keys_before
    assert set(lora_state_dict(model)) == trainable
    with pytest.raises(UserError, match="already has LoRA"):
        inject_lora(model, LoRAConfig(r=4))


def test_only_lora_parameters_get_gradients() -> None:
    model = tiny()
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    model.train()
    model(IDS).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert p.grad is None, name
        elif name.endswith("lora_A"):  # B = 0 at init: dL/dA = s * B^T (dL/dy)^T x = 0
            assert torch.equal(p.grad, torch.zeros_like(p)), name
        else:
            assert p.grad.abs().sum() > 0, name


def test_tied_output_head_is_never_wrapped() -> None:
    with pytest.raises(UserError, match="tied output head"):
        inject_lora(tiny(tie=True), LoRAConfig(targets=("q_proj", "lm_head")))
    untied = tiny(tie=False)
    assert inject_lora(untied, LoRAConfig(targets=("lm_head",))) == ["lm_head"]


def test_bad_targets_are_user_errors() -> None:
    with pytest.raises(UserError, match="'c_attn' matches no module"):
        inject_lora(tiny(), LoRAConfig(targets=("q_proj", "c_attn")))
    with pytest.raises(UserError, match="not nn.Linear"):
        inject_lora(tiny(), LoRAConfig(targets=("mlp",)))
    with pytest.raises(UserError, match="rank"):
        LoRAConfig(r=0)


def test_adapter_off_is_bit_identical_to_the_model_before_injection() -> None:
    model = tiny()
    before = model(IDS)
    with pytest.raises(ValueError, match="no LoRA"):
        with adapter_disabled(model):
            pass
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora(model)
    on = model(IDS)
    assert not torch.allclose(on, before, atol=1e-2)
    with adapter_disabled(model):
        assert torch.equal(model(IDS), before)
    assert torch.equal(model(IDS), on)
    set_adapter_enabled(model, False)
    with adapter_disabled(model):  # restores the state it found, not "on"
        pass
    assert torch.equal(model(IDS), before)


def test_merge_equals_unmerged_and_unmerge_restores_the_base() -> None:
    model = tiny()
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    y_layer, y_model = layer(x), model(IDS)
    merge_lora(model)
    assert not torch.equal(layer.weight, base["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(layer(x), y_layer, atol=1e-6, rtol=0)
    assert_same_logits(model(IDS), y_model)
    with pytest.raises(RuntimeError, match="merged"):
        set_adapter_enabled(model, False)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)
    assert_same_logits(model(IDS), y_model)


def test_merge_and_unload_gives_the_plain_model_with_the_lora_logits() -> None:
    model = tiny(tie=True)
    keys = list(model.state_dict())
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora(model)
    want = model(IDS)
    out = merge_and_unload(model)
    assert list(out.state_dict()) == keys
    assert not any(isinstance(m, LoRALinear) for m in out.modules())
    assert type(out.model.layers[1].mlp.down_proj) is nn.Linear
    assert_same_logits(out(IDS), want)
    fresh = tiny(tie=True, seed=5)  # loads into a model that never saw LoRA
    fresh.load_state_dict(out.state_dict())
    assert torch.equal(fresh(IDS), out(IDS))


# ---------------------------------------------------------------- adapter files

def saved_adapter(tmp_path: Path) -> tuple[Transformer, Path, torch.Tensor]:
    """A fresh copy of the base model, an adapter folder, and the LoRA model's logits."""
    model = tiny()
    fresh = copy.deepcopy(model)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    inject_lora(model, cfg)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", cfg)
    return fresh, tmp_path / "adapter", model(IDS)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    fresh, folder, want = saved_adapter(tmp_path)
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["task_type"] == "CAUSAL_LM" and meta["bias"] == "none"
    assert (meta["r"], meta["lora_alpha"], meta["lora_dropout"]) == (4, 8, 0.1)
    assert sorted(load_file(folder / "adapter_model.safetensors"))[0] == \
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    cfg = load_adapter(fresh, folder)
    assert cfg == LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    assert torch.equal(fresh(IDS), want)
    assert not list(tmp_path.glob("adapter/.*"))  # no temp files left behind


def _edit_config(folder: Path, **changes) -> None:
    meta = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**meta, **changes}))


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
BROKEN = {
    "missing target": (lambda f: _edit_config(f, target_modules=["q_proj", "c_attn"]),
                       "adapter_config.json: LoRA target module 'c_attn' matches no module"),
    "shape": (lambda f: _edit_config(f, r=8), "adapter_model.safetensors: tensor '.*lora_A.weight' has shape"),
    "unknown tensor": (lambda f: _edit_weights(f, lambda t: t.update({KEY.replace("v_proj", "x_proj"): t[KEY].clone()})),
                       "adapter_model.safetensors: tensor '.*x_proj.lora_B.weight' matches no LoRA target"),
    "missing tensor": (lambda f: _edit_weights(f, lambda t: t.pop(KEY)), f"tensor '{KEY}' is missing"),
    "NaN tensor": (lambda f: _edit_weights(f, lambda t: t[KEY].fill_(float("nan"))),
                   f"adapter_model.safetensors: tensor '{KEY}' has non-finite values"),
    "missing file": (lambda f: (f / "adapter_model.safetensors").unlink(), "safetensors: file not found"),
    "corrupt file": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x07garbage"), "cannot read"),
    "missing config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json: file not found"),
    "rslora": (lambda f: _edit_config(f, use_rslora=True), "unsupported LoRA option use_rslora"),
    "not lora": (lambda f: _edit_config(f, peft_type="IA3"), "not a LoRA adapter"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_incompatible_adapter_is_a_user_error_and_leaves_the_model_alone(tmp_path: Path, case: str) -> None:
    fresh, folder, _ = saved_adapter(tmp_path)
    damage, message = BROKEN[case]
    damage(folder)
    with pytest.raises(UserError, match=message):
        load_adapter(fresh, folder)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())


# ---------------------------------------------------------------- PEFT as the oracle

def hf_model_pair(tmp_path: Path) -> tuple[nn.Module, Path, Transformer]:
    """A tiny `transformers` Llama saved to disk, and our Transformer loaded from that folder."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-5, rtol=0)  # precondition: same model
    return hf, tmp_path / "base", ours


def test_peft_loads_our_adapter(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    hf, _, ours = hf_model_pair(tmp_path)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.05)
    inject_lora(ours, cfg)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter", cfg, base_model=tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    want = ours(IDS)
    torch.testing.assert_close(theirs(IDS).logits, want, atol=1e-5, rtol=0)
    # the adapter names its base model, so PEFT's one-call loader finds it (offline: a local path)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(auto(IDS).logits, want, atol=1e-5, rtol=0)
    with theirs.disable_adapter(), adapter_disabled(ours):
        base = ours(IDS)
        torch.testing.assert_close(theirs(IDS).logits, base, atol=1e-5, rtol=0)
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter is not a no-op


def test_we_load_a_peft_adapter(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    _, base_dir, ours = hf_model_pair(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    torch.manual_seed(4)  # init_lora_weights=False: random B, so the adapter is not a no-op
    lora = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "o_proj", "up_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, lora).eval()
    theirs.save_pretrained(tmp_path / "peft_adapter")
    cfg = load_adapter(ours, tmp_path / "peft_adapter")
    assert (cfg.r, cfg.alpha, cfg.dropout, set(cfg.targets)) == (4, 16, 0.1, {"q_proj", "o_proj", "up_proj"})
    want = theirs(IDS).logits
    with theirs.disable_adapter():
        assert not torch.allclose(theirs(IDS).logits, want, atol=1e-3)
    torch.testing.assert_close(ours(IDS), want, atol=1e-5, rtol=0)
