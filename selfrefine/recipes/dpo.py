"""Stage 2, self-refine: DPO of the instructed student on preference pairs from its own samples,
against a frozen reference (the same weights with the new adapter switched off, or a frozen copy with --full)."""

from __future__ import annotations

import argparse
import copy
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data import TokenizedPair, record_messages, collate_pairs, encode_pair
from ..errors import fail
from ..flags import Parser, nonneg_float, positive_float, positive_int
from ..fingerprint import code_version, digest, model_digest
from ..files import read_jsonl, write_jsonl
from ..lora import adapter_disabled
from ..paths import check_outputs
from ..losses import dpo_loss, packed_sequence_logps, scored_positions
from ..preference import STRATEGIES, build_pairs, format_stats, load_demos, load_pairs, load_samples
from ..runs import start_run
from ..trainer import autocast_context, train
from .common import (add_model_args, add_training_args, check_training_args, load, make_trainable,
                     refuse_past_context, run_training, save_outputs, train_config)

REF_CACHE = "reference_logps.jsonl"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="train_dpo.py", description=__doc__)
    add_model_args(p)
    src = p.add_argument_group("pairs: --pairs, or --samples (+ --demos) to build them first")
    src.add_argument("--pairs", help='JSONL of {"prompt", "chosen", "rejected"} records')
    src.add_argument("--samples", help="sample.py output on the training questions (cot and direct)")
    src.add_argument("--demos", help="teacher demonstrations {id, prompt, completion}, chosen where the student has none")
    src.add_argument("--strategy", default="paper", choices=STRATEGIES)
    src.add_argument("--pairs-per-question", type=positive_int, default=1)
    src.add_argument("--keep-truncated", action="store_true",
                     help="reject samples cut at the token limit (encoded without an end-of-turn token) instead of "
                          "dropping them; they are never chosen")
    src.add_argument("--task", help="refuse a samples file of another task")
    d = p.add_argument_group("DPO")
    d.add_argument("--beta", type=positive_float, default=0.1, help="> 0")
    d.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "hinge"])
    d.add_argument("--label-smoothing", type=nonneg_float, default=0.0,
                   help="in [0, 0.5); > 0 gives conservative DPO (sigmoid loss only)")
    d.add_argument("--nll-weight", type=nonneg_float, default=0.0, help="weight of the NLL of the chosen answers (IRPO)")
    d.add_argument("--average-logps", action="store_true", help="mean instead of sum of token log-probs per answer")
    d.add_argument("--precompute-ref", action="store_true", help="score the reference once before training")
    add_training_args(p, lora_dropout=0.0)
    p.set_defaults(lr=5e-5)
    return p


class DPOStep:
    """One micro-batch: chosen and rejected through one forward pass, reference from cache or on the fly."""

    def __init__(self, args: argparse.Namespace, reference: torch.nn.Module | None) -> None:
        self.args, self.reference = args, reference

    def logps(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        labels = batch["labels"].to(device)
        logits = model(batch["input_ids"].to(device), logits_at=scored_positions(labels))
        return packed_sequence_logps(logits, labels, average=self.args.average_logps)

    @torch.no_grad()
    def reference_logps(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """(B, 2) reference log-probs of (chosen, rejected)."""
        if batch["ref_logps"] is not None:
            return batch["ref_logps"]
        ctx = adapter_disabled(model) if self.reference is None else nullcontext()
        with ctx:
            logps, _ = self.logps(self.reference or model, batch)
        half = logps.shape[0] // 2
        return torch.stack([logps[:half], logps[half:]], dim=1).float().cpu()

    def __call__(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
        ref = self.reference_logps(model, batch)
        logps, counts = self.logps(model, batch)
        half = logps.shape[0] // 2
        pc, pr = logps[:half], logps[half:]
        rc, rr = ref[:, 0].to(pc.device), ref[:, 1].to(pc.device)
        a = self.args
        losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=a.beta, label_smoothing=a.label_smoothing, loss_type=a.loss)
        loss = losses.mean()
        if a.nll_weight:
            nll = -(pc if a.average_logps else pc / counts[:half]).mean()
            loss = loss + a.nll_weight * nll
        metrics = {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
                   "rewards/accuracy": (r_c > r_r).float().mean().item(),
                   "rewards/margin": (r_c - r_r).mean().item(),
                   "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}
        return loss, metrics, batch["n_tokens"]


def build_pairs_from_samples(args: argparse.Namespace) -> list[dict]:
    """Pairs from --samples (and --demos), checked before anything is written."""
    if not args.samples:
        fail("give --pairs, or --samples (and --demos) to build them")
    samples = load_samples(args.samples, task=args.task)
    demos = load_demos(args.demos) if args.demos else []
    pairs, stats = build_pairs(samples, demos, args.strategy, args.pairs_per_question, args.seed, args.keep_truncated)
    print(format_stats(stats))
    if not pairs:
        fail("no preference pairs could be built from these samples", args.samples)
    return pairs


def encode_pairs(tok, records: list[tuple[int | None, dict]], max_len: int,
                 path) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Encoded pairs, fitted into `max_len` (`data.fit_pair`), and how many had their prompt or an answer cut."""
    out, cut = [], {"prompt": 0, "answer": 0}
    for line, rec in records:
        prompt = record_messages(rec["prompt"], path, line, "prompt")
        pair, prompt_cut, answer_cut = encode_pair(tok, prompt, rec, max_len, path, line)
        out.append(pair)
        cut["prompt"] += prompt_cut
        cut["answer"] += answer_cut
    return out, cut


def truncation_warning(cut: dict[str, int], max_len: int) -> str | None:
    if not cut["prompt"] and not cut["answer"]:
        return None
    return (f"warning: {cut['prompt']} pair(s) had their prompt cut from the start and {cut['answer']} "
            f"pair(s) an answer cut at the end to fit --max-len {max_len} (a cut answer loses its end-of-turn token)")


def reference_key(args: argparse.Namespace, records: list[dict], device: torch.device) -> str:
    """What the cached reference log-probs depend on: the pair records (flags included), the model (and the
    --adapter merged into it), how pairs are encoded (max_len) and scored (average_logps, dtype, precision), which
    network is the reference (the policy with its adapter off, or a frozen copy with --full), the device type
    (kernels differ) and the library's code. Any change gives another key, and the cache is recomputed."""
    return digest({
        "pairs": records,
        "model": model_digest(args.model),
        "adapter": model_digest(args.adapter) if args.adapter else None,
        "max_len": args.max_len,
        "average_logps": args.average_logps,
        "dtype": args.dtype,
        "precision": args.precision,
        "reference": "frozen-copy" if args.full else "adapter-off",
        "device": device.type,
        "code": code_version(),
    })


def precompute_reference(step: DPOStep, model: torch.nn.Module, pairs: list[TokenizedPair], pad_id: int,
                         batch_size: int, out_dir: Path, key: str) -> None:
    """Reference log-probs for every pair, cached in OUT for resumes; reused only under the same `key`
    (`reference_key`), else recomputed and the cache rewritten."""
    cache = out_dir / REF_CACHE
    if cache.exists():
        rows = [r for _, r in read_jsonl(cache, allow_empty=True)]
        if len(rows) == len(pairs) and all(r.get("key") == key for r in rows):
            for p, r in zip(pairs, rows):
                p.ref_logps = (r["chosen"], r["rejected"])
            return
    was_training = model.training
    model.eval()
    amp, _ = autocast_context(next(model.parameters()).device, step.args.precision)  # the same precision as the training steps
    for i in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs"):
        chunk = pairs[i:i + batch_size]
        with amp:
            ref = step.reference_logps(model, collate_pairs(chunk, pad_id))
        for p, (c, r) in zip(chunk, ref.tolist()):
            p.ref_logps = (c, r)
    model.train(was_training)
    if distributed.is_main():  # every rank computed the same numbers; one writes them
        write_jsonl(cache, [{"key": key, "chosen": p.ref_logps[0], "rejected": p.ref_logps[1]} for p in pairs])


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    check_outputs({"--model": args.model, "--adapter": args.adapter, "--pairs": args.pairs, "--samples": args.samples,
                   "--demos": args.demos}, {"--out": args.out}, folders=["--out"])  # before anything loads
    check_training_args(args)
    if args.label_smoothing >= 0.5:
        fail(f"--label-smoothing must be in [0, 0.5) (0.5 makes chosen and rejected equal), got {args.label_smoothing}")
    if args.label_smoothing and args.loss != "sigmoid":
        fail(f"--label-smoothing applies to --loss sigmoid only, not {args.loss}")
    if args.lora_dropout and not args.full:
        fail("--lora-dropout must be 0 for DPO: policy and reference must score with the same network")
    out_dir = Path(args.out)
    model, tok, device = load(args, training=True)
    if args.pairs:
        pairs_path, built = Path(args.pairs), None
        records, skipped = load_pairs(pairs_path)
    else:  # the builder already dropped empty and identical pairs; pairs.jsonl is written once the run starts
        pairs_path, built = out_dir / "pairs.jsonl", build_pairs_from_samples(args)
        records, skipped = [(None, r) for r in built], {"count": 0}
    pairs, cut = encode_pairs(tok, records, args.max_len, args.pairs or args.samples)
    refuse_past_context([(line, max(len(p.chosen.input_ids), len(p.rejected.input_ids)))
                         for (line, _), p in zip(records, pairs)],
                        model.config.max_position_embeddings, "pair", args.pairs or args.samples)
    if warning := truncation_warning(cut, args.max_len):
        print(warning)
    if skipped["count"]:
        print(f"skipped {skipped['count']} unusable pair(s): empty at lines {skipped['empty']}, "
              f"chosen == rejected at lines {skipped['identical']}")
    reference = None
    if args.full:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    lora = make_trainable(model, args)
    _, commit = start_run(out_dir, vars(args), args.resume, args.allow_config_change,  # after every check
                          inputs={"model": args.model, "adapter": args.adapter, "pairs": args.pairs,
                                  "samples": args.samples, "demos": args.demos})
    if built is not None:
        write_jsonl(pairs_path, built)
    pad_id = tok.pad_id
    step = DPOStep(args, reference)
    if args.precompute_ref:
        key = reference_key(args, [r for _, r in records], device)
        precompute_reference(step, model, pairs, pad_id, args.batch_size, out_dir, key)
    print(f"DPO: {len(pairs)} pairs, beta {args.beta}, loss {args.loss}, device {device}")
    last = run_training(train, model, pairs, lambda b: collate_pairs(b, pad_id), step, train_config(args),
                        out_dir, device, resume=args.resume, desc="dpo", on_start=commit)
    save_outputs(model, lora, args, out_dir)
    return last
