"""What the recipes share: flags, device and precision choice, model (+ adapter) loading, outputs."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

import torch

from .. import distributed
from ..answers import Question, load_questions
from ..checkpoint import config_dtype, load_model, resolve_dtype, save_model
from ..config import Settings, UsageError, parse, setting
from ..errors import fail
from ..flags import device_name, fraction, nonneg_float, nonneg_int, positive_float, positive_int
from ..log import logger, set_level
from ..losses import grouped_sums, scored_positions, scored_targets, sequence_sums
from ..lora import (LoRAConfig, inject_lora, load_adapter, merge_and_unload, merge_rounding, record_merge,
                    refuse_merged_twice, save_adapter)
from ..tokenizer import CHAT_FORMATS, Tokenizer
from ..trainer import REPORT_TO, Interrupted, TrainConfig, bf16_native

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LogOptions(Settings):
    """How much a script says (`selfrefine.log`): every script's flags, set by `parse_command_line`."""

    quiet: bool = setting(False, "warnings and results only: no progress lines or bars")
    verbose: bool = setting(False, "also debugging detail: what loads where, each metrics record")

    def __post_init__(self) -> None:
        super().__post_init__()  # here, not in `check`: the subclasses' own checks replace it
        if self.quiet and self.verbose:
            raise UsageError("--quiet and --verbose contradict each other: give one")


S = TypeVar("S", bound=LogOptions)


def parse_command_line(cls: type[S], argv: list[str] | None, prog: str, description: str | None = None,
                       formatter_class: type = argparse.HelpFormatter) -> S:
    """A script's config from its command line (`config.parse`), with the messages set to its --quiet/--verbose.
    Only here: a config built by a library caller (the pipeline) leaves the caller's level alone."""
    cfg = parse(cls, argv, prog, description, formatter_class)
    set_level(cfg.quiet, cfg.verbose)
    return cfg


@dataclass
class ModelOptions(LogOptions):
    """Which model a recipe loads, where, and in what dtype."""

    model: str | None = setting(None, "Hugging Face model directory (config.json, *.safetensors, tokenizer.json)",
                                required=True, group="model")
    adapter: str | None = setting(None, "LoRA adapter directory to apply on top of --model", group="model")
    device: str = setting("auto", "auto (cuda if available), cpu or cuda[:N]", parse=device_name, group="model")
    dtype: str = setting("auto", "weights dtype; auto = bfloat16 where the device has native bf16 (CUDA, "
                         "AVX512-BF16/AMX CPUs measured faster in bf16), else float32", choices=["auto", *WEIGHT_DTYPES], group="model")
    chat_format: str | None = setting(None, "how chats are written: template (the model's own chat template, the "
                                      f"default where it has one), {', '.join(CHAT_FORMATS)}, or a .jinja file",
                                      metavar="NAME|FILE.jinja", group="model")


QUESTIONS = "questions"


@dataclass
class QuestionOptions(Settings):
    """Which questions of a task: shared by sampling and the demonstrations from rationales."""

    task: str | None = setting(None, "a task name (see selfrefine.tasks), or raw for {id, prompt} JSONL",
                               required=True, group=QUESTIONS)
    data: str | None = setting(None, "the task's data file (the embedded arith tasks need none)", group=QUESTIONS)
    split: str | None = setting(None, "train or test (default: test; train for demonstrations from rationales)",
                                group=QUESTIONS)
    size: int | None = setting(None, "embedded tasks: number of generated questions", parse=positive_int,
                               group=QUESTIONS)
    data_seed: int = setting(0, "embedded tasks: generator seed", parse=nonneg_int, group=QUESTIONS)
    limit: int | None = setting(None, "first N questions only", parse=positive_int, group=QUESTIONS)

    def questions(self, split: str) -> tuple[list[Question], str | None]:
        """The questions and the task's kind (`answers.load_questions`), `split` unless --split says otherwise."""
        return load_questions(self.task, self.data, self.split or split, self.size, self.data_seed, self.limit)


TRAINING = "training (shared by train_sft.py and train_dpo.py)"


@dataclass
class TrainingOptions(ModelOptions):
    """What train_sft.py and train_dpo.py share: the run folder, LoRA or full fine-tuning, the optimisation."""

    out: str | None = setting(None, "run folder: run.json, metrics.jsonl, checkpoint.pt, adapter/, merged/",
                              required=True, group=TRAINING)
    full: bool = setting(False, "full fine-tuning instead of LoRA", group=TRAINING)
    lora_r: int = setting(16, "LoRA rank", parse=positive_int, group=TRAINING)
    lora_alpha: float = setting(32.0, "LoRA scale numerator (scale = alpha / r)", parse=positive_float, group=TRAINING)
    lora_dropout: float = setting(0.05, "dropout on the LoRA input, in [0, 1)", parse=fraction, group=TRAINING)
    lora_targets: str = setting("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                "comma-separated names of the linear layers that get an adapter", group=TRAINING)
    epochs: float = setting(1.0, "passes over the data", parse=positive_float, group=TRAINING)
    max_steps: int = setting(0, "optimizer steps; overrides --epochs when > 0", parse=nonneg_int, group=TRAINING)
    lr: float = setting(2e-4, "peak learning rate", parse=positive_float, group=TRAINING)
    batch_size: int = setting(8, "examples per micro-batch", parse=positive_int, group=TRAINING)
    grad_accum: int = setting(1, "micro-batches per optimizer step", parse=positive_int, group=TRAINING)
    max_len: int = setting(512, "prompt + completion tokens", parse=positive_int, group=TRAINING)
    warmup: int = setting(10, "linear warmup steps before the cosine decay", parse=nonneg_int, group=TRAINING)
    weight_decay: float = setting(0.0, "AdamW weight decay", parse=nonneg_float, group=TRAINING)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (> 0)", parse=positive_float, group=TRAINING)
    seed: int = setting(0, "seed of the adapter's initialisation, data order and dropout", parse=nonneg_int,
                        group=TRAINING)
    save_every: int = setting(0, "checkpoint every K steps (always at the end)", parse=nonneg_int, group=TRAINING)
    precision: str = setting("auto", "auto: bfloat16 autocast where the device has native bf16 (CUDA, "
                             "AVX512-BF16/AMX CPUs measured faster in bf16), float16 + grad scaler on other GPUs, else float32",
                             choices=["auto", "float32"], group=TRAINING)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward", group=TRAINING)
    fsdp: bool = setting(False, "with --full under torchrun: shard weights, gradients and optimizer state (FSDP2) "
                         "instead of DDP", group=TRAINING)
    merge: bool = setting(False, "also write OUT/merged/, a full model directory", group=TRAINING)
    save_dtype: str = setting("auto", "dtype of OUT/merged/; auto = the base model's (its config.json torch_dtype)",
                              choices=["auto", *WEIGHT_DTYPES], group=TRAINING)
    val_fraction: float = setting(0.0, "held-out share of the data: its loss every --eval-every steps and after the "
                                  "last; the weights with the lowest are kept", parse=fraction, group=TRAINING)
    eval_every: int = setting(0, "validation every N steps (0: after the last only)", parse=nonneg_int, group=TRAINING)
    resume: bool = setting(False, "continue from OUT/checkpoint.pt", group=TRAINING)
    allow_config_change: bool = setting(False, "resume even if the settings differ", group=TRAINING)
    report_to: str = setting("none", "tensorboard: also write the metrics as TensorBoard scalars to OUT/tensorboard/ "
                             "(needs the tensorboard package); wandb: also log them to a W&B run in OUT, offline "
                             "unless WANDB_MODE is set (needs the wandb package)", choices=list(REPORT_TO),
                             group=TRAINING)

    def check(self) -> None:
        if self.fsdp and not self.full:
            fail("--fsdp shards full fine-tuning; LoRA's few trainable weights need only DDP (drop --fsdp)")
        self.train_config()  # its own checks too, before anything loads (--report-to tensorboard/wandb: the package)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    def lora_config(self) -> LoRAConfig | None:
        """None for full fine-tuning."""
        if self.full:
            return None
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))


def completion_logps(model: torch.nn.Module, batch: dict, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum (or mean) of the completion tokens' log-probs and their counts, (B,) each, for a batch of
    `input_ids` and `labels`: the one forward both training stages score with (`sequence_sums` of
    `model(..., targets=...)`, which never holds (positions x vocab) logits)."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    token = model(batch["input_ids"].to(device), logits_at=scored_positions(labels), targets=scored_targets(labels))
    return sequence_sums(token, labels, average=average)


def packed_pair_logps(model: torch.nn.Module, batch: dict, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logps` of a `data.pack_pairs` batch: (2B,) sums (or means) and counts, chosen answers first."""
    device = next(model.parameters()).device
    owner = batch["owner"].to(device)
    token = model(batch["input_ids"].to(device), batch["positions"].to(device), batch["attn_mask"].to(device),
                  logits_at=batch["score_at"].to(device), targets=batch["targets"].to(device))
    return grouped_sums(token, owner, 2 * batch["input_ids"].shape[0], average=average)


def hold_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of `items` held out, the rest in that random order. A
    fraction that rounds to no item still holds one out (of two or more), so that "the lowest validation loss is
    kept" means the same thing at every data size (a study over 16 to 400 demonstrations, say)."""
    n_val = max(int(len(items) * fraction), 1 if fraction > 0 and len(items) > 1 else 0)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


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
    """Inference: bfloat16 weights where bf16 math is native and faster (`bf16_native`: CUDA, CPUs where it is
    measured faster). Training keeps float32 master weights (autocast does the bf16 math)."""
    if name != "auto":
        return WEIGHT_DTYPES[name]
    return torch.bfloat16 if not training and bf16_native(device) else torch.float32


def load(opts: ModelOptions, training: bool = False,
         tok: Tokenizer | None = None) -> tuple[torch.nn.Module, Tokenizer, torch.device]:
    """Model (with --adapter applied; merged into the weights for training) and tokenizer (`tok` if already read)."""
    device = pick_device(opts.device)
    distributed.init(device)
    dtype = pick_dtype(opts.dtype, device, training)
    logger.debug(f"loading {opts.model} as {dtype} on {device}")
    model = load_model(opts.model, dtype=dtype, device=device)
    tok = tok or Tokenizer.from_dir(opts.model, opts.chat_format)
    if tok.vocab_size > model.config.vocab_size:  # ids past the embedding table would crash (or read garbage on CUDA)
        fail(f"tokenizer.json has {tok.vocab_size} tokens but config.json's vocab_size is "
             f"{model.config.vocab_size}: they belong to different models", Path(opts.model) / "tokenizer.json")
    if opts.adapter:
        refuse_merged_twice(opts.model, opts.adapter)
        load_adapter(model, opts.adapter)
        if training:  # start the new stage from base+adapter as plain weights
            model = merge_and_unload(model)
    return model, tok, device


def make_trainable(model: torch.nn.Module, lora: LoRAConfig | None, seed: int) -> None:
    """Every weight trainable (lora None: full fine-tuning), or a fresh adapter on the `lora.targets` layers."""
    if lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    torch.manual_seed(seed)  # the adapter's initialisation is part of the run's seeded state
    if not inject_lora(model, lora):
        fail(f"--lora-targets {','.join(lora.targets)!r} matched no linear layer of the model")


def save_outputs(model: torch.nn.Module, lora: LoRAConfig | None, merge: bool, base: str, out: Path,
                 save_dtype: str = "auto") -> None:
    """OUT/adapter/ for LoRA; OUT/merged/ (a full model directory) with --merge or after full fine-tuning, in
    `save_dtype` ("auto": the base's config.json dtype, else the training dtype).

    Under torchrun rank 0 writes them (after FSDP, from the gathered full weights)."""
    model = distributed.gathered_model(model)
    if model is not None and lora is not None:
        save_adapter(model, out / "adapter", lora, base_model=base)
        logger.info(f"adapter -> {out / 'adapter'}")
    if model is not None and (lora is None or merge):
        dtype = config_dtype(base) if save_dtype == "auto" else save_dtype
        warn_merge_rounding(model, lora, dtype, out / "merged")
        merged = merge_and_unload(model) if lora is not None else model
        save_model(merged, out / "merged", tokenizer_from=base, dtype=dtype)
        if lora is not None:
            record_merge(out / "merged", base, out / "adapter")
        logger.info(f"merged model -> {out / 'merged'}")
    distributed.barrier()  # ranks finish together: one leaving while rank 0 writes can abort its teardown


MERGE_ROUNDING_WARN = 0.5  # warn when rounding the merged weights changes them by half the adapter's own change


def warn_merge_rounding(model: torch.nn.Module, lora: LoRAConfig | None, dtype: torch.dtype | str | None,
                        out: Path) -> None:
    """Warn when an adapter merged into 16-bit weights would be mostly rounded away (`lora.merge_rounding`); the
    adapter itself is saved in full and stays usable unmerged."""
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    if lora is None or dtype not in (torch.bfloat16, torch.float16):
        return
    share = merge_rounding(model, dtype)
    if share > MERGE_ROUNDING_WARN:
        logger.warning(f"{out}: merged into {str(dtype).removeprefix('torch.')} weights, the adapter's change is "
                       f"rounded by {share:.0%} of its own size, so the merged model is mostly the one before "
                       "training; use the adapter unmerged (--adapter) or save float32 (--save-dtype float32)")


def run_training(fn, *a, **kw):
    """Call the trainer; an interruption has already checkpointed, so exit quietly with 130."""
    try:
        return fn(*a, **kw)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(130)
