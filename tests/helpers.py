"""Tiny but real model directories for end-to-end tests: a random Llama-family model saved with
`save_model` and a byte-level BPE tokenizer trained here, laid out like SmolLM2-Instruct."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from selfrefine.checkpoint import save_model
from selfrefine.model import ModelConfig, Transformer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
_TOKENIZER_JSON: str | None = None  # trained once per session


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = ("plus minus times divided by equals sum difference product total each more less than apples "
             "books coins has have had gives gave buys sold left how many much does what is the of and a "
             "question answer so then first next finally therefore because we know").split()
    lines = ["Let's think step by step.", "The answer is", "Question:", "Answer:", "True or False?",
             "You are a helpful assistant.", "Solve the problem and give the final answer."]
    for _ in range(400):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        op, sym, result = rng.choice([("plus", "+", a + b), ("minus", "-", a - b), ("times", "*", a * b)])
        lines.append(f"Question: Tom has {a} apples and buys {b} more. What is {a} {op} {b}?\n"
                     f"Answer: Let's think step by step. {a} {sym} {b} = {result}. The answer is {result}.")
        lines.append(" ".join(rng.choice(words) for _ in range(12)) + rng.choice(".,?!:;"))
    return lines


def tiny_tokenizer_json() -> str:
    """A byte-level BPE with ~512 tokens (serialised), trained on arithmetic word problems."""
    global _TOKENIZER_JSON
    if _TOKENIZER_JSON is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_corpus(), trainer)
        _TOKENIZER_JSON = tok.to_str()
    return _TOKENIZER_JSON


def write_tiny_tokenizer(path: str | Path, chat_template: str | None = CHATML_TEMPLATE) -> Path:
    """tokenizer.json + tokenizer_config.json (ChatML; eos <|im_end|>; pad = eos, like SmolLM2-Instruct)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": 2048,
              "tokenizer_class": "GPT2Tokenizer", **({"chat_template": chat_template} if chat_template else {})}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def tiny_config(arch: str = "LlamaForCausalLM", **overrides) -> ModelConfig:
    from tokenizers import Tokenizer

    kw = dict(vocab_size=Tokenizer.from_str(tiny_tokenizer_json()).get_vocab_size(), hidden_size=64,
              intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=2048,
              architecture=arch, attention_bias=arch == "Qwen2ForCausalLM", bos_token_id=1, eos_token_id=2,
              pad_token_id=2)
    return ModelConfig(**{**kw, **overrides})


def make_tiny_model_dir(path: str | Path, arch: str = "LlamaForCausalLM", seed: int = 0, **overrides) -> Path:
    """A random tiny model (HF-style init: N(0, 0.02) weights, unit norms) with the tiny tokenizer.

    `overrides` are ModelConfig fields (e.g. num_layers=1, tie_word_embeddings=False).
    """
    path = write_tiny_tokenizer(path)
    model = Transformer(tiny_config(arch, **overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    save_model(model, path)
    return path
