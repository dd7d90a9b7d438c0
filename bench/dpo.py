"""Time per DPO step, ours against `transformers` + `peft` written as TRL does it, on the same weights and pairs.

The step: policy log-probs of chosen + rejected in one forward, reference log-probs, sigmoid DPO loss,
backward, clip, AdamW. Ours lays out its pairs as train_dpo.py's default --pair-layout does: on a CPU one packed
row per pair, the prompt once (`data.pack_pairs`; here the prompt is a quarter of each side, so it scores 7/8 of
TRL's tokens), on CUDA two rows as TRL does. Three contenders:
  ours (precomputed ref)  `selfrefine.recipes.dpo.DPOStep` with `--precompute-ref` semantics: the reference
                          log-probs arrive with the batch, so the step has no reference forward;
  ours (ref on the fly)   the same `DPOStep`, reference scored each step with the adapter switched off
                          (a frozen copy of the model with --full);
  transformers+peft       TRL's default with PEFT: a separate no-grad reference forward under
                          `model.disable_adapter()` (a frozen copy with --full), TRL's selective log-softmax.
All three start from the same adapter, so their losses agree step by step. Last line: `ratio_vs_hf=X.XX`,
HF's time per step over ours with the precomputed reference.

    python bench/dpo.py --quick
    python bench/dpo.py --device cuda --shape 1b --batch 4 --seq 1024 --json dpo.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/dpo.py` from anywhere

import torch
import torch.nn.functional as F

from bench.common import (Contender, add_args, build_models, contender, describe, matmul_params, measure, model_config,
                          report, resolve_args, result_row, to_device)
from selfrefine.data import IGNORE, TokenizedPair, TokenizedText, collate_pairs
from selfrefine.recipes.dpo import PAIR_LAYOUTS, DPOStep, resolve_pair_layout
from selfrefine.trainer import autocast_context

BETA = 0.1


def pairs(vocab: int, n: int, seq: int, seed: int) -> list[TokenizedPair]:
    """Random pairs: a shared prompt (the first quarter) and two different completions, all `seq` tokens."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = seq // 4
    out = []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        rows = []
        for _ in range(2):
            completion = torch.randint(3, vocab, (seq - prompt_len,), generator=g).tolist()
            rows.append(TokenizedText(prompt + completion, [IGNORE] * prompt_len + completion))
        out.append(TokenizedPair(*rows))
    return out


def trl_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed completion log-probs as TRL's `concatenated_forward` computes them (float32 selective log-softmax:
    gathered logit minus a per-row logsumexp)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    labels = labels[:, 1:]
    loss_mask = labels != IGNORE
    index = labels.masked_fill(~loss_mask, 0)
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return (logps * loss_mask).sum(-1)


def hf_dpo_loss(policy: torch.nn.Module, reference: torch.nn.Module | None, batch: dict) -> torch.Tensor:
    """TRL's sigmoid DPO loss; the reference is the policy under `disable_adapter()`, or a frozen copy."""
    ids, labels = batch["input_ids"], batch["labels"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if reference is None:
            with policy.disable_adapter():
                ref = trl_logps(policy, ids, mask, labels)
        else:
            ref = trl_logps(reference, ids, mask, labels)
    pol = trl_logps(policy, ids, mask, labels)
    half = ids.shape[0] // 2
    logits = (pol[:half] - pol[half:]) - (ref[:half] - ref[half:])
    return -F.logsigmoid(BETA * logits).mean()


def contenders(args: argparse.Namespace) -> tuple[list[Contender], int]:
    cfg = model_config(args)
    ours, hf = build_models(args, cfg)
    step_args = argparse.Namespace(beta=BETA, label_smoothing=0.0, loss="sigmoid", nll_weight=0.0, average_logps=False)
    on_the_fly = copy.deepcopy(ours)
    frozen = (lambda m: copy.deepcopy(m).eval().requires_grad_(False)) if args.full else (lambda m: None)
    fly_step, hf_ref = DPOStep(step_args, frozen(ours)), frozen(hf)
    pre_step = DPOStep(step_args, None)
    examples = pairs(cfg.vocab_size, args.batch, args.seq, args.seed)
    batch = to_device(collate_pairs(examples, pad_id=0), args.device)  # TRL's rows: chosen, then rejected
    layout = PAIR_LAYOUTS[resolve_pair_layout("auto", args.device)]  # ours as train_dpo.py lays out its pairs
    ours_batch = to_device(layout(examples, pad_id=0), args.device)  # ref_logps None: scored on the fly
    amp, _ = autocast_context(args.device, args.precision)
    with amp:  # --precompute-ref: scored once, before training, with the numerics of the training step
        pre_batch = dict(ours_batch, ref_logps=fly_step.reference_logps(ours.eval(), ours_batch))
    ours.train()
    tokens = 2 * args.batch * args.seq
    sides = {"ours (precomputed ref)": (ours, lambda: pre_step(ours, pre_batch)[0]),
             "ours (ref on the fly)": (on_the_fly, lambda: fly_step(on_the_fly, ours_batch)[0]),
             f"transformers{'' if args.full else '+peft'} (TRL-style)": (hf, lambda: hf_dpo_loss(hf, hf_ref, batch))}
    out = [contender(name, m, loss, tokens, args.device, args.precision) for name, (m, loss) in sides.items()]
    return out, matmul_params(ours)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(prog="bench/dpo.py", description=__doc__.split("\n\n")[0])
    add_args(p)
    args = resolve_args(p.parse_args(argv))
    cfg = model_config(args)
    cs, n_matmul = contenders(args)
    measure(cs, args.steps, args.warmup, args.device)
    rows = [result_row(c, cfg, args, n_matmul) for c in cs]
    pre, fly, hf = cs
    ratio = hf.seconds / pre.seconds
    loss_diff = max(abs(a - b) for c in (pre, fly) for a, b in zip(c.losses, hf.losses))
    print(f"loss agreement ours vs HF over {len(hf.losses)} steps: max |diff| = {loss_diff:.2e}")
    extra = {"max_loss_diff": loss_diff, "ratio_on_the_fly_vs_hf": hf.seconds / fly.seconds}
    report(f"DPO step: {describe(args, cfg)}", rows, args, extra, ratio)
    return ratio


if __name__ == "__main__":
    main()
