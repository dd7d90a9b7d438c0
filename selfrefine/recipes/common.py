"""What the recipes share: flags, device and precision choice, model (+ adapter) loading, outputs."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

from .. import distributed
from ..checkpoint import load_model, save_model
from ..errors import fail
from ..flags import device_name, fraction, nonneg_float, nonneg_int, positive_float, positive_int
from ..lora import LoRAConfig, inject_lora, load_adapter, merge_and_unload, save_adapter
from ..tokenizer import Tokenizer
from ..trainer import Interrupted, TrainConfig

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)"
                   + ("" if required else " (required unless --compare)"))
    p.add_argument("--adapter", help="LoRA adapter directory to apply on top of --model")
    p.add_argument("--device", default="auto", type=device_name, help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", *WEIGHT_DTYPES],
                   help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")


def add_training_args(p: argparse.ArgumentParser, lora_dropout: float = 0.05) -> None:
    g = p.add_argument_group("training (shared by train_sft.py and train_dpo.py)")
    g.add_argument("--out", required=True, help="run folder: run.json, metrics.jsonl, checkpoint.pt, adapter/, merged/")
    g.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    g.add_argument("--lora-r", type=positive_int, default=16)
    g.add_argument("--lora-alpha", type=positive_float, default=32)
    g.add_argument("--lora-dropout", type=fraction, default=lora_dropout)
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    g.add_argument("--epochs", type=positive_float, default=1.0)
    g.add_argument("--max-steps", type=nonneg_int, default=0, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--lr", type=positive_float, default=2e-4)
    g.add_argument("--batch-size", type=positive_int, default=8, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=positive_int, default=1)
    g.add_argument("--max-len", type=positive_int, default=512, help="prompt + completion tokens")
    g.add_argument("--warmup", type=nonneg_int, default=10, help="linear warmup steps before the cosine decay")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    g.add_argument("--max-grad-norm", type=positive_float, default=1.0,
                   help="clip the gradient norm to this (> 0)")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--save-every", type=nonneg_int, default=0, help="checkpoint every K steps (always at the end)")
    g.add_argument("--precision", default="auto", choices=["auto", "float32"],
                   help="auto: bfloat16 autocast on CUDA (float16 + grad scaler without bf16), float32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--fsdp", action="store_true",
                   help="with --full under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    g.add_argument("--merge", action="store_true", help="also write OUT/merged/, a full model directory")
    g.add_argument("--val-fraction", type=fraction, default=0.0, help="held-out share of the data for a final val loss")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--allow-config-change", action="store_true", help="resume even if the flags differ")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def check_training_args(args: argparse.Namespace) -> None:
    """What one flag cannot check alone (each flag's range is checked when parsed: `selfrefine.flags`)."""
    if args.fsdp and not args.full:
        fail("--fsdp shards full fine-tuning; LoRA's few trainable weights need only DDP (drop --fsdp)")


def refuse_past_context(lengths: list[tuple[int | None, int]], ctx: int, what: str, source: str) -> None:
    """(line, tokens) per record: past the model's context the position embeddings are untrained, so refuse
    (never cut silently), naming the first such line."""
    if too_long := [line for line, n in lengths if n > ctx]:
        fail(f"{len(too_long)} {what}(s) longer than the model's max_position_embeddings ({ctx} tokens; the first "
             f"here): set --max-len {ctx} or less to cut them", source, too_long[0])


def pick_device(name: str) -> torch.device:
    """Under torchrun a CUDA device is the rank's own (LOCAL_RANK), whatever index was asked for."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name.startswith("cuda") and distributed.launched():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, training: bool) -> torch.dtype:
    """Inference: bfloat16 weights on CUDA. Training keeps float32 master weights (autocast does the bf16 math)."""
    if name != "auto":
        return WEIGHT_DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" and not training else torch.float32


def load(args: argparse.Namespace, training: bool = False) -> tuple[torch.nn.Module, Tokenizer, torch.device]:
    """Model (with --adapter applied; merged into the weights for training) and tokenizer."""
    device = pick_device(args.device)
    distributed.init(device)
    model = load_model(args.model, dtype=pick_dtype(args.dtype, device, training), device=device)
    tok = Tokenizer.from_dir(args.model)
    if tok.vocab_size > model.config.vocab_size:  # ids past the embedding table would crash (or read garbage on CUDA)
        fail(f"tokenizer.json has {tok.vocab_size} tokens but config.json's vocab_size is "
             f"{model.config.vocab_size}: they belong to different models", Path(args.model) / "tokenizer.json")
    if args.adapter:
        load_adapter(model, args.adapter)
        if training:  # start the new stage from base+adapter as plain weights
            model = merge_and_unload(model)
    return model, tok, device


def make_trainable(model: torch.nn.Module, args: argparse.Namespace) -> LoRAConfig | None:
    if args.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    torch.manual_seed(args.seed)  # the adapter's initialisation is part of the run's seeded state
    cfg = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    wrapped = inject_lora(model, cfg)
    if not wrapped:
        fail(f"--lora-targets {args.lora_targets!r} matched no linear layer of the model")
    return cfg


def save_outputs(model: torch.nn.Module, lora: LoRAConfig | None, args: argparse.Namespace, out: Path) -> None:
    """OUT/adapter/ for LoRA; OUT/merged/ (a full model directory) with --merge or after full fine-tuning.

    Under torchrun rank 0 writes them (after FSDP, from the gathered full weights)."""
    model = distributed.gathered_model(model)
    if model is not None and lora is not None:
        save_adapter(model, out / "adapter", lora)
        print(f"adapter -> {out / 'adapter'}")
    if model is not None and (lora is None or args.merge):
        merged = merge_and_unload(model) if lora is not None else model
        save_model(merged, out / "merged", tokenizer_from=args.model)
        print(f"merged model -> {out / 'merged'}")
    distributed.barrier()  # ranks finish together: one leaving while rank 0 writes can abort its teardown


def run_training(fn, *a, **kw):
    """Call the trainer; an interruption has already checkpointed, so exit quietly with 130."""
    try:
        return fn(*a, **kw)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(130)
