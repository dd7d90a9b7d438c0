"""Stage 1, instruction-tuning: supervised fine-tuning on the teacher's chain-of-thought demonstrations."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch

from ..data import encode_sft, pad_batch, read_sft
from ..config import setting
from ..log import logger
from ..losses import mean_nll
from ..paths import check_outputs
from ..runs import start_run
from ..trainer import held_out_loss, train
from .common import (TrainingOptions, completion_logps, hold_out, load, make_trainable, parse_command_line,
                     refuse_past_context, run_training, save_outputs)


@dataclass
class SFTConfig(TrainingOptions):
    data: str | None = setting(None, 'JSONL of {"prompt", "completion"} (strings, or TRL\'s message lists) or '
                               '{"messages": [...]} records',
                               required=True, group="data")


def sft_step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
    return mean_nll(*completion_logps(model, batch)), {}, batch["n_tokens"]


def completion_tokens(batch: dict) -> int:
    """The denominator of `sft_loss`: the tokens it scores (labels past the shift that are not ignored)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def main(argv: list[str] | None = None) -> dict:
    return run(parse_command_line(SFTConfig, argv, "train_sft.py", __doc__))


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
        logger.warning(f"warning: {n_trunc} completion(s) cut at --max-len {cfg.max_len} (their end-of-turn token is "
                       "lost)")
    lora = cfg.lora_config()
    make_trainable(model, lora, cfg.seed)
    out, commit = start_run(cfg.out, asdict(cfg), cfg.resume, cfg.allow_config_change,  # after every check
                            inputs={"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data})
    train_set, val = hold_out(examples, cfg.val_fraction, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"SFT: {len(train_set)} train / {len(val)} val examples, {n_params:,} trainable parameters, "
                f"device {device}")
    collate = partial(pad_batch, pad_id=tok.pad_id)
    validate = (lambda m: held_out_loss(m, val, collate, sft_step, cfg.batch_size, completion_tokens)) if val else None
    last = run_training(train, model, train_set, collate, sft_step, cfg.train_config(), out, device,
                        resume=cfg.resume, desc="sft", loss_weight=completion_tokens, on_start=commit,
                        validate=validate)
    save_outputs(model, lora, cfg.merge, cfg.model, out, cfg.save_dtype)
    return last
