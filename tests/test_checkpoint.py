"""Checkpoint I/O against transformers on the same weights (ours -> HF loader, shards, dtypes, atomic saves) and
the loader's user errors. The logits of HF-saved models read by our loader: tests/test_model.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfrefine.checkpoint import config_dtype, load_config, load_model, save_model
from selfrefine.errors import UserError
from tests.helpers import make_tiny_model_dir
from tests.test_model import IDS, LLAMA3_ROPE, TINY, hf_dir, hf_logits, hf_model  # noqa: F401 (hf_dir: a fixture)

transformers = pytest.importorskip("transformers")


def test_save_roundtrip_through_transformers(hf_dir, tmp_path):
    case, path, expected = hf_dir
    save_model(load_model(path), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in tensors) == (not json.loads((path / "config.json").read_text())["tie_word_embeddings"])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert back.dtype == torch.float32
    assert torch.equal(hf_logits(back), expected)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(IDS), expected, atol=1e-5, rtol=0)


def test_sharded_checkpoint(tmp_path):
    model = hf_model("llama3_untied", seed=1)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 2
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(IDS), hf_logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "float16", "torch.float32"])
def test_dtype_at_load(untied_dir, dtype):
    ref = load_model(untied_dir)
    model = load_model(untied_dir, dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype.removeprefix("torch."))
    assert {p.dtype for p in model.parameters()} == {want}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q.to(want)), name


def test_saved_dtype_is_recorded(hf_dir, tmp_path):
    save_model(load_model(hf_dir[1], dtype="bfloat16"), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16


def test_sharded_save_loads_in_ours_and_transformers(untied_dir, tmp_path):
    """Above `max_shard_size` the weights go to Hugging Face shards + index; both loaders read them back exactly."""
    model = load_model(untied_dir)
    save_model(model, tmp_path / "out", max_shard_size=40_000)
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {k: v for name in shards for k, v in load_file(out / name).items()}
    assert set(index["weight_map"].values()) == set(shards) and set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = load_model(out)
    for (name, p), q in zip(back.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in tensors.items())
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf), back(IDS), atol=1e-5, rtol=0)


def test_resave_switches_layout_without_stale_files(untied_dir, tmp_path):
    """Saving into an existing directory in the other layout removes the old one (a left-over model.safetensors
    would shadow the new shards)."""
    model = load_model(untied_dir)
    save_model(model, tmp_path, max_shard_size=40_000)
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    save_model(model, tmp_path, max_shard_size=40_000)
    assert "model.safetensors" not in {p.name for p in tmp_path.iterdir()}


def test_save_dtype_is_written_and_recorded(untied_dir, tmp_path):
    save_model(load_model(untied_dir), tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert config_dtype(tmp_path) == torch.bfloat16


def test_config_dtype_reads_either_key_or_none(tmp_path):
    for hf, want in [({"torch_dtype": "float16"}, torch.float16), ({"dtype": "bfloat16"}, torch.bfloat16), ({}, None)]:
        (tmp_path / "config.json").write_text(json.dumps(hf))
        assert config_dtype(tmp_path) == want


def test_save_copies_tokenizer_files(hf_dir, tmp_path):
    src = shutil.copytree(hf_dir[1], tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text('{"eos_token": "x"}')
    save_model(load_model(src), tmp_path / "out", tokenizer_from=src)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "tokenizer_config.json").is_file()
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    assert not list(out.glob(".*.tmp"))


def test_new_model_dir_appears_whole_or_not_at_all(hf_dir, tmp_path, monkeypatch):
    """A crash while writing a new directory leaves nothing under its name (and no temp folder); into an existing
    directory config.json, what makes a directory a model, is written last."""
    from selfrefine import checkpoint

    model = load_model(hf_dir[1])
    written = []
    real = checkpoint.write_json

    def crash_on_config(path, obj):
        written.append(Path(path).name)
        if Path(path).name == "config.json":
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(checkpoint, "write_json", crash_on_config)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == [] and written[-1] == "config.json"
    monkeypatch.setattr(checkpoint, "write_json", real)
    save_model(model, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (tmp_path / "merged" / "config.json").is_file() and oct((tmp_path / "merged").stat().st_mode)[-3:] != "700"
    torch.testing.assert_close(load_model(tmp_path / "merged")(IDS), model(IDS))


# --- user errors: each names the file (and the tensor) -----------------------------------------------------------


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("untied")
    hf_model("llama3_untied").save_pretrained(path)
    return path


@pytest.fixture()
def broken(untied_dir, tmp_path) -> Path:
    """A writable copy of a tiny untied Llama checkpoint."""
    shutil.copytree(untied_dir, tmp_path, dirs_exist_ok=True)
    return tmp_path


def raises(path: Path, *words: str) -> None:
    with pytest.raises(UserError) as e:
        load_model(path)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_error_missing_dir_and_config(tmp_path):
    raises(tmp_path / "nope", "nope", "not found")
    raises(tmp_path, "config.json", "not found")


def test_error_bad_config(broken):
    cfg = broken / "config.json"
    cfg.write_text('{"vocab_size": 3,')
    raises(broken, str(cfg), "invalid JSON")
    cfg.write_text(json.dumps({**TINY, "architectures": ["GPT2LMHeadModel"]}))
    raises(broken, str(cfg), "GPT2LMHeadModel")
    cfg.write_text(json.dumps({**TINY, "hidden_act": "gelu"}))
    raises(broken, str(cfg), "gelu")
    cfg.write_text(json.dumps({**TINY, "attention_bias": True}))
    raises(broken, str(cfg), "attention_bias")
    cfg.write_text(json.dumps({**TINY, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    raises(broken, str(cfg), "yarn")


def edit_tensors(path: Path, fn) -> Path:
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_error_wrong_shape(broken):
    file = edit_tensors(broken, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(95, 64)}))
    raises(broken, str(file), "model.layers.1.mlp.up_proj.weight", "(95, 64)", "(96, 64)")


def test_error_missing_tensor(broken):
    file = edit_tensors(broken, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    raises(broken, str(file), "missing tensor", "model.layers.0.self_attn.k_proj.weight")


def test_error_missing_untied_head(broken):
    edit_tensors(broken, lambda t: t.pop("lm_head.weight"))
    raises(broken, "missing tensor", "lm_head.weight")


def test_error_unexpected_tensor(broken):
    file = edit_tensors(broken, lambda t: t.update({"model.layers.0.mlp.gate_proj.bias": torch.zeros(96)}))
    raises(broken, str(file), "unexpected tensor", "model.layers.0.mlp.gate_proj.bias")


def test_error_truncated_and_corrupt(broken):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    raises(broken, str(file), "truncated or corrupt")
    file.write_bytes(b"\x00" * 64)
    raises(broken, str(file), "truncated or corrupt")


def test_error_no_weights_and_bad_index(broken):
    (broken / "model.safetensors").unlink()
    raises(broken, str(broken), "model.safetensors")
    index = broken / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    raises(broken, "model-00001-of-00002.safetensors", "not found")
    index.write_text("{")
    raises(broken, str(index), "invalid JSON")


def test_error_bad_dtype(untied_dir):
    with pytest.raises(UserError, match="float64"):
        load_model(untied_dir, dtype="float64")


def test_load_config_reads_llama3_rope_parameters(tmp_path):
    """transformers >= 5 writes rope_theta and the scaling under `rope_parameters`."""
    cfg = transformers.LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    cfg.save_pretrained(tmp_path)
    ours = load_config(tmp_path)
    assert ours.rope_theta == 500000.0 and ours.rope_scaling["rope_type"] == "llama3"
    assert ours.rope_scaling["original_max_position_embeddings"] == 16


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS", 7, ""])
def test_error_shard_outside_model_dir(broken, tmp_path_factory, shard):
    """An index may only name files inside the model directory, even when the outside file is a valid shard."""
    outside = tmp_path_factory.mktemp("elsewhere") / "outside.safetensors"
    shutil.copy(broken / "model.safetensors", outside)
    (broken / "model.safetensors").unlink()
    shard = str(outside) if shard == "ABS" else shard
    if isinstance(shard, str) and shard.startswith(".."):
        shutil.copy(outside, broken.parent / "outside.safetensors")
    index = broken / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    raises(broken, f"{index}: ", "shard")


def test_shard_in_subfolder_and_linked_blob_load(broken, tmp_path_factory):
    """Shards named relative to the model directory still load, also as links to blobs elsewhere (the HF cache)."""
    blob = tmp_path_factory.mktemp("blobs") / "sha256-abc"
    shutil.move(broken / "model.safetensors", blob)
    (broken / "shards").mkdir()
    (broken / "shards" / "model-00001-of-00001.safetensors").symlink_to(blob)
    names = list(load_file(blob))
    (broken / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "shards/model-00001-of-00001.safetensors" for n in names}}))
    assert isinstance(load_model(broken), torch.nn.Module)


def test_load_refuses_non_finite_weights_naming_the_file_and_tensor(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m", num_layers=1)
    load_model(d)  # finite: loads
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=re.escape(f"{d / 'model.safetensors'}: tensor 'model.norm.weight' has non-finite")):
        load_model(d)
