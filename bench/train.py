"""Tokens/s of one SFT optimizer step, ours against `transformers` + `peft` on the same weights and batch.

The step is the trainer's: forward, completion-masked cross-entropy, backward, clip, AdamW. Ours is
`selfrefine.recipes.sft.sft_step` on our `Transformer` + LoRA; theirs is the idiomatic
`model(input_ids, attention_mask, labels=labels).loss` on `AutoModelForCausalLM` + `get_peft_model`.
Both adapters start from the same A matrices, so their losses must agree step by step (printed as a check
that the two sides do the same work). Last line: `ratio_vs_hf=X.XX` (our tokens/s over theirs).

    python bench/train.py --quick
    python bench/train.py --device cuda --shape 1b --batch 8 --seq 1024 --json train.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/train.py` from anywhere

import torch

from bench.common import (Contender, add_args, build_models, contender, describe, matmul_params, measure, model_config,
                          report, resolve_args, result_row, to_device)
from selfrefine.data import IGNORE
from selfrefine.recipes.sft import sft_step


def sft_batch(vocab: int, batch: int, seq: int, seed: int) -> dict:
    """Random full-length rows whose first quarter is prompt (label IGNORE), like the SFT collator's output."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = IGNORE
    return {"input_ids": ids, "labels": labels, "n_tokens": batch * seq}


def contenders(args: argparse.Namespace) -> tuple[list[Contender], int]:
    cfg = model_config(args)
    ours, hf = build_models(args, cfg)
    batch = to_device(sft_batch(cfg.vocab_size, args.batch, args.seq, args.seed), args.device)
    ids, labels = batch["input_ids"], batch["labels"]
    mask = torch.ones_like(ids)
    tokens = args.batch * args.seq
    out = [contender("ours", ours, lambda: sft_step(ours, batch)[0], tokens, args.device, args.precision),
           contender("transformers" if args.full else "transformers+peft", hf,
                     lambda: hf(input_ids=ids, attention_mask=mask, labels=labels).loss, tokens, args.device,
                     args.precision)]
    return out, matmul_params(ours)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(prog="bench/train.py", description=__doc__.split("\n\n")[0])
    add_args(p)
    args = resolve_args(p.parse_args(argv))
    cfg = model_config(args)
    cs, n_matmul = contenders(args)
    measure(cs, args.steps, args.warmup, args.device)
    rows = [result_row(c, cfg, args, n_matmul) for c in cs]
    ours, hf = cs
    ratio = hf.seconds / ours.seconds
    loss_diff = max(abs(a - b) for a, b in zip(ours.losses, hf.losses))
    print(f"loss agreement ours vs HF over {len(ours.losses)} steps: max |diff| = {loss_diff:.2e}")
    report(f"SFT step: {describe(args, cfg)}", rows, args, {"max_loss_diff": loss_diff}, ratio)
    return ratio


if __name__ == "__main__":
    main()
