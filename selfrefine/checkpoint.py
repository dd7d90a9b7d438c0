"""Hugging Face model directories in and out: `config.json` + safetensors (single file or sharded).

Loading builds the model on the meta device and assigns the file's tensors straight into it, so no
time is spent on a random init that would be overwritten (SmolLM2-135M: ~0.1 s from a warm page cache).
Every mismatch between the file and the config is a `UserError` naming the file and the tensor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .errors import fail
from .files import atomic_write, current_umask, fsync_dir, read_json, write_json
from .model import ModelConfig, Transformer
from .rope import inverse_frequencies

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = 5 * 10**9  # bytes per safetensors file when saving (transformers' default "5GB")
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json")
CONFIG_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in CONFIG_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in CONFIG_DTYPES:
        return CONFIG_DTYPES[dtype.removeprefix("torch.")]
    fail(f"unsupported dtype {dtype!r} (choose float32, bfloat16 or float16)")


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """Read `config.json` and refuse, up front, features this model does not implement."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        fail("model directory not found", model_dir)
    path = model_dir / "config.json"
    hf = read_json(path)
    if not isinstance(hf, dict):
        fail("expected a JSON object", path)
    for key in _REQUIRED:
        if key not in hf:
            fail(f"missing key {key!r}", path)
    if hf.get("hidden_act", "silu") != "silu":
        fail(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)", path)
    if hf.get("mlp_bias"):
        fail("unsupported mlp_bias=true", path)
    if hf.get("attention_bias") and (hf.get("architectures") or [""])[0] != "Qwen2ForCausalLM":
        fail("unsupported attention_bias=true (Llama/Mistral put a bias on o_proj too; only Qwen2's q/k/v bias is "
             "implemented)", path)
    if hf.get("use_sliding_window"):
        # Mistral's `sliding_window` alone is fine: full attention equals it for sequences shorter than the window.
        fail("unsupported use_sliding_window=true", path)
    try:
        cfg = ModelConfig.from_hf(hf)
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if not bool(torch.isfinite(inv_freq).all() and (inv_freq > 0).all()):
            raise ValueError(f"rope_theta {cfg.rope_theta!r} / rope_scaling {cfg.rope_scaling!r} give non-finite "
                             "rotary frequencies")
    except (ValueError, TypeError, KeyError) as e:  # values out of range or of the wrong type (`ModelConfig`)
        fail(str(e) if isinstance(e, ValueError) else f"bad value in config.json ({type(e).__name__}: {e})", path)
    return cfg


def _shard_name(name: object, index: Path) -> str:
    """A shard path from the index, kept inside the model directory: a model is that directory (its fingerprint
    covers nothing else), so an index must not pull in a file elsewhere. Checked by name, not by resolving
    links, because the Hugging Face cache links each shard to a blob outside the snapshot folder."""
    if not isinstance(name, str) or not name:
        fail(f"shard names in 'weight_map' must be non-empty strings, got {name!r}", index)
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or "\\" in name:
        fail(f"shard {name!r} lies outside the model directory (shards must be named relative to it)", index)
    return name


def _shards(model_dir: Path) -> tuple[list[Path], Path]:
    """The safetensors files to read, and the file to blame for a missing tensor."""
    single, index = model_dir / WEIGHTS, model_dir / INDEX
    if single.is_file():
        return [single], single
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            fail("expected a non-empty 'weight_map' object", index)
        files = [model_dir / _shard_name(name, index) for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                fail(f"shard listed in {INDEX} not found", f)
        return files, index
    extra = " (only PyTorch .bin weights found: convert them to safetensors)" if any(model_dir.glob("*.bin")) else ""
    fail(f"no {WEIGHTS} or {INDEX}{extra}", model_dir)


def _read_tensors(files: list[Path], dtype: torch.dtype,
                  device: str | torch.device) -> dict[str, tuple[torch.Tensor, Path]]:
    """Every tensor of every file, cast to `dtype`, with the file it came from (for error messages)."""
    out: dict[str, tuple[torch.Tensor, Path]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name in out:
                        fail(f"tensor {name!r} also stored in {out[name][1].name}", path)
                    out[name] = (f.get_tensor(name).to(dtype), path)
        except (SafetensorError, OSError) as e:
            fail(f"unreadable safetensors file (truncated or corrupt?): {e}", path)
    return out


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """Load a Hugging Face Llama/Mistral/Qwen2 checkpoint in `dtype`, in eval mode."""
    model_dir, dtype = Path(model_dir), resolve_dtype(dtype)
    cfg = load_config(model_dir)
    files, blame = _shards(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del expected["lm_head.weight"]
    state = {}
    for name, (tensor, path) in _read_tensors(files, dtype, device).items():
        if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue  # recomputed from config / a tied copy of the embedding: nothing to load
        if name not in expected:
            fail(f"unexpected tensor {name!r} (not part of a {cfg.architecture} with this config.json)", path)
        if tensor.shape != expected[name]:
            fail(f"tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name])}", path)
        if not bool(torch.isfinite(tensor).all()):  # NaN weights would evaluate as a silent 0% accuracy
            fail(f"tensor {name!r} has non-finite values (NaN or inf)", path)
        state[name] = tensor
    missing = [name for name in expected if name not in state]
    if missing:
        fail(f"missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), blame)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the embedding Parameter: tie the head to the new one
        model.lm_head.weight = model.model.embed_tokens.weight
    # The RoPE table is a non-persistent buffer, still on meta: compute it for real.
    model.inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    return model.eval()


def config_dtype(model_dir: str | os.PathLike) -> torch.dtype | None:
    """The dtype a model directory's config.json declares (`torch_dtype`, or newer transformers' `dtype`), if any:
    what a model fine-tuned from it is saved in by default, so a bfloat16 base does not come back twice the size."""
    hf = read_json(Path(model_dir) / "config.json")
    name = hf.get("torch_dtype", hf.get("dtype")) if isinstance(hf, dict) else None
    return resolve_dtype(name) if name is not None else None


def save_model(model: Transformer, out_dir: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None,
               dtype: torch.dtype | str | None = None, max_shard_size: int = MAX_SHARD_SIZE) -> None:
    """Write a directory that both `load_model` and `transformers.AutoModelForCausalLM` read.

    Weights are cast to `dtype` (default: the model's own) and written as one model.safetensors, or, when
    they exceed `max_shard_size` bytes, as Hugging Face shards with a model.safetensors.index.json.
    A new directory is written as a temporary sibling and renamed into place whole, so a crash leaves no
    half-written model under its name; into an existing directory each file is replaced atomically and
    config.json (what makes a directory a model) comes last. Tokenizer files (and generation_config.json)
    are copied from `tokenizer_from`, else a generation_config.json is made from the model's bos/eos/pad ids.
    """
    out_dir = Path(out_dir)
    dtype = resolve_dtype(dtype) if dtype is not None else model.model.embed_tokens.weight.dtype
    if out_dir.exists():
        _write_model_files(model, out_dir, tokenizer_from, dtype, max_shard_size)
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        _write_model_files(model, tmp, tokenizer_from, dtype, max_shard_size)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would make the model unreadable to others
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _split_shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of at most `max_shard_size` bytes (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int) -> None:
    """model.safetensors, or shards + index; then the files of the other layout, left by an earlier save, go."""
    shards = _split_shards(tensors, max_shard_size)
    names = [WEIGHTS] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                 for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        with atomic_write(out_dir / name, "wb") as f:
            f.write(safetensors_bytes(shard, metadata={"format": "pt"}))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(out_dir / INDEX, {"metadata": {"total_size": total},
                                     "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}})
    stale = [out_dir / INDEX] if len(shards) == 1 else [out_dir / WEIGHTS]
    stale += [p for p in out_dir.glob("model-*-of-*.safetensors") if p.name not in names]
    for path in stale:
        path.unlink(missing_ok=True)


def _write_model_files(model: Transformer, out_dir: Path, tokenizer_from: str | os.PathLike | None,
                       dtype: torch.dtype, max_shard_size: int) -> None:
    cfg = model.config
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    _write_weights({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, out_dir, max_shard_size)
    copied = set()
    if tokenizer_from is not None:
        for name in COPIED_FILES:
            src = Path(tokenizer_from) / name
            if src.is_file():
                data = src.read_bytes()
                with atomic_write(out_dir / name, "wb") as f:
                    f.write(data)
                copied.add(name)
    if "generation_config.json" not in copied:
        ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
        write_json(out_dir / "generation_config.json", ids)
    hf_config = {k: v for k, v in cfg.to_hf().items() if k not in ("dtype", "torch_dtype")}  # stale if cast
    write_json(out_dir / "config.json", {**hf_config, "torch_dtype": str(dtype).removeprefix("torch.")})
