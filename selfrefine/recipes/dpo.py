"""Stage 2, self-refine: DPO of the instructed student on preference pairs from its own samples,
against a frozen reference (the same weights with the new adapter switched off, or a frozen copy with --full)."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..checkpoint import load_config, load_model
from ..config import setting
from ..data import EXPORT_FORMATS, TokenizedPair, collate_pairs, encode_pair, exported, pack_pairs, record_messages
from ..errors import fail
from ..files import read_jsonl, write_jsonl
from ..fingerprint import code_version, digest, model_digest
from ..flags import fraction, nonneg_float, positive_float, positive_int
from ..log import logger
from ..lora import adapter_disabled
from ..losses import dpo_loss
from ..paths import check_outputs
from ..preference import STRATEGIES, build_pairs, format_stats, load_demos, load_pairs, load_samples
from ..progress import progress_bar
from ..runs import start_run
from ..tokenizer import Tokenizer
from ..trainer import autocast_context, held_out_loss, train
from .common import (TRAINING, TrainingOptions, completion_logps, hold_out, load, make_trainable, packed_pair_logps,
                     parse_command_line, refuse_past_context, run_training, save_outputs)

REF_CACHE = "reference_logps.jsonl"


PAIRS = "pairs: --pairs, or --samples (+ --demos) to build them first"
LOSS = "DPO"
PAIR_LAYOUTS = {"packed": pack_pairs, "padded": collate_pairs}  # --pair-layout: how a batch holds its pairs
Collate = Callable[[list[TokenizedPair]], dict]


def resolve_pair_layout(choice: str, device: torch.device) -> str:
    """`--pair-layout auto`: packed on a CPU, where it was measured (25% less DPO step time on the demo's pairs);
    padded on CUDA, whose causal rows keep SDPA's flash kernel, where a mask with grouped-query heads may fall back
    to the math kernel and its (T x T) scores: untested there for lack of a GPU."""
    return choice if choice != "auto" else "padded" if device.type == "cuda" else "packed"


@dataclass
class DPOConfig(TrainingOptions):
    pairs: str | None = setting(None, 'JSONL of {"prompt", "chosen", "rejected"} records (or TRL\'s conversational '
                                'forms)', group=PAIRS)
    samples: str | None = setting(None, "sample.py output on the training questions (cot and direct)", group=PAIRS)
    demos: str | None = setting(None, "teacher demonstrations {id, prompt, completion}, chosen where the student "
                                "has none", group=PAIRS)
    strategy: str = setting("paper", "how pairs are built from the samples", choices=STRATEGIES, group=PAIRS)
    pairs_per_question: int = setting(1, "pairs built per question", parse=positive_int, group=PAIRS)
    keep_truncated: bool = setting(False, "reject samples cut at the token limit (encoded without an end-of-turn "
                                   "token) instead of dropping them; they are never chosen", group=PAIRS)
    pair_prompt: str = setting("cot", "the prompt of the pairs built from --samples: the CoT prompt the answers were "
                               "sampled with, or the direct one (the plain question: reasoning becomes the default "
                               "answer)", choices=["cot", "direct"], group=PAIRS)
    task: str | None = setting(None, "refuse a samples file of another task", group=PAIRS)
    export_format: str = setting("default", "form of the pairs built from --samples (OUT/pairs.jsonl): ours, or TRL's "
                                 "conversational one (prompt and answers as chat messages)", choices=EXPORT_FORMATS,
                                 group=PAIRS)
    beta: float = setting(0.1, "strength of the pull towards the reference (> 0)", parse=positive_float, group=LOSS)
    loss: str = setting("sigmoid", "DPO's logistic loss, IPO's squared loss or the hinge",
                        choices=["sigmoid", "ipo", "hinge"], group=LOSS)
    label_smoothing: float = setting(0.0, "in [0, 0.5); > 0 gives conservative DPO (sigmoid loss only)",
                                     parse=nonneg_float, group=LOSS)
    nll_weight: float = setting(0.0, "weight of the NLL of the chosen answers (IRPO)", parse=nonneg_float, group=LOSS)
    average_logps: bool = setting(False, "mean instead of sum of token log-probs per answer", group=LOSS)
    precompute_ref: bool = setting(False, "score the reference once before training", group=LOSS)
    ref_model: str | None = setting(None, "the reference: this model directory (frozen; the same tokenizer) instead "
                                    "of --model (+ --adapter) itself, e.g. the SFT model in a later self-refine "
                                    "round", group=LOSS)
    lr: float = setting(5e-5, "peak learning rate", parse=positive_float, group=TRAINING)
    lora_dropout: float = setting(0.0, "dropout on the LoRA input: must be 0 for DPO (policy and reference score "
                                  "with one network)", parse=fraction, group=TRAINING)
    pair_layout: str = setting("auto", "a pair in a batch: packed = one row, the prompt once and a mask keeping "
                               "each answer from the other (~30% fewer tokens on short answers); padded = chosen "
                               "and rejected as two right-padded rows; auto = packed on a CPU, padded on CUDA",
                               choices=["auto", *PAIR_LAYOUTS], group=TRAINING)

    def check(self) -> None:
        super().check()
        if self.label_smoothing >= 0.5:
            fail(f"--label-smoothing must be in [0, 0.5) (0.5 makes chosen and rejected equal), got "
                 f"{self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            fail(f"--label-smoothing applies to --loss sigmoid only, not {self.loss}")
        if self.lora_dropout and not self.full:
            fail("--lora-dropout must be 0 for DPO: policy and reference must score with the same network")
        if not self.pairs and not self.samples:
            fail("give --pairs, or --samples (and --demos) to build them")
        if self.pairs and self.pair_prompt != "cot":
            fail("--pair-prompt applies to the pairs built from --samples; --pairs already have their prompts")
        if self.pairs and self.export_format != "default":
            fail("--export-format is the form of the pairs built from --samples; --pairs are read, not written")


@dataclass(frozen=True)
class Objective:
    """What one DPO step minimises (the loss settings of `DPOConfig`)."""

    beta: float
    loss: str
    label_smoothing: float
    nll_weight: float
    average_logps: bool

    @classmethod
    def of(cls, cfg: DPOConfig) -> "Objective":
        return cls(cfg.beta, cfg.loss, cfg.label_smoothing, cfg.nll_weight, cfg.average_logps)


class DPOStep:
    """One micro-batch: chosen and rejected through one forward pass, reference from cache or on the fly."""

    def __init__(self, objective: Objective, reference: torch.nn.Module | None) -> None:
        self.objective, self.reference = objective, reference

    def logps(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) log-probs of the answers, chosen first, and their token counts, from either layout."""
        score = packed_pair_logps if "score_at" in batch else completion_logps
        return score(model, batch, average=self.objective.average_logps)

    @torch.no_grad()
    def reference_logps(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """(B, 2) reference log-probs of (chosen, rejected), float32 on the model's device."""
        if batch["ref_logps"] is not None:
            return batch["ref_logps"].to(next(model.parameters()).device, non_blocking=True)
        ctx = adapter_disabled(model) if self.reference is None else nullcontext()
        with ctx:
            logps, _ = self.logps(self.reference or model, batch)
        half = logps.shape[0] // 2
        return torch.stack([logps[:half], logps[half:]], dim=1).float()

    def __call__(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
        ref = self.reference_logps(model, batch)
        logps, counts = self.logps(model, batch)
        half = logps.shape[0] // 2
        pc, pr = logps[:half], logps[half:]
        o = self.objective
        losses, r_c, r_r = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], beta=o.beta, label_smoothing=o.label_smoothing,
                                    loss_type=o.loss)
        loss = losses.mean()
        if o.nll_weight:
            nll = -(pc if o.average_logps else pc / counts[:half]).mean()
            loss = loss + o.nll_weight * nll
        metrics = {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
                   "rewards/accuracy": (r_c > r_r).float().mean().item(),
                   "rewards/margin": (r_c - r_r).mean().item(),
                   "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}
        return loss, metrics, batch["n_tokens"]


def build_pairs_from_samples(cfg: DPOConfig) -> list[dict]:
    """Pairs from --samples (and --demos), checked before anything is written."""
    samples = load_samples(cfg.samples, task=cfg.task)
    demos = load_demos(cfg.demos) if cfg.demos else []
    pairs, stats = build_pairs(samples, demos, cfg.strategy, cfg.pairs_per_question, cfg.seed, cfg.keep_truncated,
                               cfg.pair_prompt)
    logger.info(format_stats(stats))
    if not pairs:
        fail("no preference pairs could be built from these samples", cfg.samples)
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


def reference_key(cfg: DPOConfig, records: list[dict], device: torch.device) -> str:
    """What the cached reference log-probs depend on: the pair records (settings included), the model (and the
    --adapter merged into it), how pairs are encoded (max_len) and scored (average_logps, dtype, precision), which
    network is the reference (the policy with its adapter off, or a frozen copy with --full), the device type
    (kernels differ) and the library's code. Any change gives another key, and the cache is recomputed."""
    return digest({
        "pairs": records,
        "model": model_digest(cfg.model),
        "adapter": model_digest(cfg.adapter) if cfg.adapter else None,
        "max_len": cfg.max_len,
        "pair_layout": resolve_pair_layout(cfg.pair_layout, device),
        "average_logps": cfg.average_logps,
        "dtype": cfg.dtype,
        "precision": cfg.precision,
        "reference": model_digest(cfg.ref_model) if cfg.ref_model else "frozen-copy" if cfg.full else "adapter-off",
        "device": device.type,
        "code": code_version(),
    })


def score_reference(step: DPOStep, model: torch.nn.Module, pairs: list[TokenizedPair], collate: Collate,
                    batch_size: int, precision: str) -> None:
    """Set each pair's reference log-probs, scored in chunks of `batch_size` in list order under `precision`:
    the batches and kernels of a validation pass, so the numbers are the ones it would compute itself."""
    was_training = model.training
    model.eval()
    amp, _ = autocast_context(next(model.parameters()).device, precision)
    for i in progress_bar(range(0, len(pairs), batch_size), desc="reference log-probs"):
        chunk = pairs[i:i + batch_size]
        with amp:
            ref = step.reference_logps(model, collate(chunk))
        for p, (c, r) in zip(chunk, ref.tolist()):
            p.ref_logps = (c, r)
    model.train(was_training)


def precompute_reference(step: DPOStep, model: torch.nn.Module, pairs: list[TokenizedPair], collate: Collate,
                         batch_size: int, precision: str, out_dir: Path, key: str) -> None:
    """Reference log-probs for every pair (scored under the training steps' `precision`), cached in OUT for
    resumes; reused only under the same `key` (`reference_key`), else recomputed and the cache rewritten."""
    cache = out_dir / REF_CACHE
    if cache.exists():
        rows = [r for _, r in read_jsonl(cache, allow_empty=True)]
        if len(rows) == len(pairs) and all(r.get("key") == key for r in rows):
            for p, r in zip(pairs, rows):
                p.ref_logps = (r["chosen"], r["rejected"])
            return
    score_reference(step, model, pairs, collate, batch_size, precision)
    if distributed.is_main():  # every rank computed the same numbers; one writes them
        write_jsonl(cache, [{"key": key, "chosen": p.ref_logps[0], "rejected": p.ref_logps[1]} for p in pairs])


def prepare_pairs(cfg: DPOConfig, tok: Tokenizer) -> tuple[list[tuple[int | None, dict]], list[TokenizedPair],
                                                            list[dict] | None]:
    """(pair records with their lines, encoded pairs, pairs built from --samples or None), all checked before the
    model loads: a bad record costs no model load."""
    if cfg.pairs:
        records, skipped = load_pairs(cfg.pairs)
        built = None
        if skipped["count"]:
            logger.info(f"skipped {skipped['count']} unusable pair(s): empty at lines {skipped['empty']}, "
                        f"chosen == rejected at lines {skipped['identical']}")
    else:  # the builder already dropped empty and identical pairs; pairs.jsonl is written once the run starts
        built = build_pairs_from_samples(cfg)
        records = [(None, r) for r in built]
    source = cfg.pairs or cfg.samples
    pairs, cut = encode_pairs(tok, records, cfg.max_len, source)
    refuse_past_context([(line, max(len(p.chosen.input_ids), len(p.rejected.input_ids)))
                         for (line, _), p in zip(records, pairs)],
                        load_config(cfg.model).max_position_embeddings, "pair", source)
    if warning := truncation_warning(cut, cfg.max_len):
        logger.warning(warning)
    return records, pairs, built


def load_reference(path: str, model: torch.nn.Module, tok: Tokenizer, device: torch.device) -> torch.nn.Module:
    """A frozen reference from its own directory, in the policy's dtype; its token ids must mean the policy's."""
    if Tokenizer.from_dir(path).tok.get_vocab() != tok.tok.get_vocab():
        fail("--ref-model has another tokenizer than --model: their log-probs would score different tokens",
             Path(path) / "tokenizer.json")
    dtype = next(model.parameters()).dtype
    return load_model(path, dtype=dtype, device=device).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_command_line(DPOConfig, argv, "train_dpo.py", __doc__))


def run(cfg: DPOConfig) -> dict:
    """Train; returns the last logged metrics."""
    check_outputs({"--model": cfg.model, "--adapter": cfg.adapter, "--pairs": cfg.pairs, "--samples": cfg.samples,
                   "--demos": cfg.demos, "--ref-model": cfg.ref_model}, {"--out": cfg.out},
                  folders=["--out"])  # before anything loads
    out_dir = Path(cfg.out)
    tok = Tokenizer.from_dir(cfg.model, cfg.chat_format)
    records, pairs, built = prepare_pairs(cfg, tok)
    model, tok, device = load(cfg, training=True, tok=tok)
    reference = load_reference(cfg.ref_model, model, tok, device) if cfg.ref_model else \
        copy.deepcopy(model).eval().requires_grad_(False) if cfg.full else None
    lora = cfg.lora_config()
    make_trainable(model, lora, cfg.seed)
    _, commit = start_run(out_dir, asdict(cfg), cfg.resume, cfg.allow_config_change,  # after every check
                          inputs={"model": cfg.model, "adapter": cfg.adapter, "pairs": cfg.pairs,
                                  "samples": cfg.samples, "demos": cfg.demos, "ref_model": cfg.ref_model})
    if built is not None:
        write_jsonl(out_dir / "pairs.jsonl", exported(built, ("chosen", "rejected"), cfg.export_format))
    step = DPOStep(Objective.of(cfg), reference)
    layout = resolve_pair_layout(cfg.pair_layout, device)
    collate = partial(PAIR_LAYOUTS[layout], pad_id=tok.pad_id)
    if cfg.precompute_ref:
        key = reference_key(cfg, [r for _, r in records], device)
        precompute_reference(step, model, pairs, collate, cfg.batch_size, cfg.precision, out_dir, key)
    train_pairs, val = hold_out(pairs, cfg.val_fraction, cfg.seed) if cfg.val_fraction else (pairs, [])  # file order
    if val and not cfg.precompute_ref:  # the reference never changes: score the held-out pairs once, not per pass
        score_reference(step, model, val, collate, cfg.batch_size, cfg.precision)
    logger.info(f"DPO: {len(train_pairs)} train / {len(val)} val pairs, beta {cfg.beta}, loss {cfg.loss}, "
                f"pairs {layout}, device {device}")
    validate = (lambda m: held_out_loss(m, val, collate, step, cfg.batch_size)) if val else None
    last = run_training(train, model, train_pairs, collate, step, cfg.train_config(), out_dir, device,
                        resume=cfg.resume, desc="dpo", on_start=commit, validate=validate)
    save_outputs(model, lora, cfg.merge, cfg.model, out_dir, cfg.save_dtype)
    return last
