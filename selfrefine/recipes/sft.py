"""Stage 1, instruction-tuning: supervised fine-tuning on the teacher's chain-of-thought demonstrations."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .. import distributed
from ..data import encode_sft, pad_batch, read_sft
from ..config import parse, setting
from ..files import append_jsonl
from ..paths import check_outputs
from ..losses import packed_sft_loss, scored_positions
from ..runs import start_run
from ..trainer import METRICS, train
from .common import TrainingOptions, load, make_trainable, refuse_past_context, run_training, save_outputs


@dataclass
class SFTConfig(TrainingOptions):
    data: str | None = setting(None, 'JSONL of {"prompt", "completion"} or {"messages": [...]} records',
                               required=True, group="data")


def sft_step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    logits = model(batch["input_ids"].to(device), logits_at=scored_positions(labels))
    return packed_sft_loss(logits, labels), {}, batch["n_tokens"]


def completion_tokens(batch: dict) -> int:
    """The denominator of `sft_loss`: the tokens it scores (labels past the shift that are not ignored)."""
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def mean_loss(model: torch.nn.Module, examples: list, pad_id: int, batch_size: int) -> float:
    """Token-weighted completion loss over held-out examples."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = pad_batch(examples[i:i + batch_size], pad_id)
        n = completion_tokens(batch)
        total += sft_step(model, batch)[0].item() * n
        count += n
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> dict:
    return run(parse(SFTConfig, argv, "train_sft.py", __doc__))


def run(cfg: SFTConfig) -> dict:
    """Train; returns the last logged metrics (with `val_loss` when --val-fraction holds data out)."""
    check_outputs({"--model": cfg.model, "--adapter": cfg.adapter, "--data": cfg.data}, {"--out": cfg.out},
                  folders=["--out"])  # before anything loads: the run folder must not hold or replace an input
    model, tok, device = load(cfg, training=True)
    rows = read_sft(cfg.data)
    examples, n_trunc = encode_sft(tok, rows, cfg.max_len, cfg.data)
    refuse_past_context([(row[0], len(ex.input_ids)) for row, ex in zip(rows, examples)],
                        model.config.max_position_embeddings, "example", cfg.data)
    if n_trunc:
        print(f"warning: {n_trunc} completion(s) cut at --max-len {cfg.max_len} (their end-of-turn token is lost)")
    lora = cfg.lora_config()
    make_trainable(model, lora, cfg.seed)
    out, commit = start_run(cfg.out, asdict(cfg), cfg.resume, cfg.allow_config_change,  # after every check
                            inputs={"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data})
    n_val = int(len(examples) * cfg.val_fraction)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    val, train_set = [examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:]]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"SFT: {len(train_set)} train / {len(val)} val examples, {n_params:,} trainable parameters, device {device}")
    last = run_training(train, model, train_set, lambda b: pad_batch(b, tok.pad_id), sft_step, cfg.train_config(),
                        out, device, resume=cfg.resume, desc="sft", loss_weight=completion_tokens,
                        on_start=commit)
    if val:
        last["val_loss"] = mean_loss(model, val, tok.pad_id, cfg.batch_size)
        if distributed.is_main():
            append_jsonl(out / METRICS, {"step": last.get("step"), "val_loss": last["val_loss"],
                                         "val_ppl": math.exp(min(last["val_loss"], 50))})
        print(f"val loss {last['val_loss']:.4f}")
    save_outputs(model, lora, cfg.merge, cfg.model, out)
    return last
