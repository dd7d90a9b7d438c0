"""The training loop shared by SFT and DPO: AdamW, cosine schedule with warmup, clipping, accumulation,
mixed precision (bfloat16 where the device has it), atomic checkpoints with exact resume, clean stops on SIGINT/SIGTERM
and on NaN.

A stage supplies only `step_fn(model, batch) -> (loss, metrics, n_tokens)`; everything else is here once.
Under torchrun each rank takes its slice of every global micro-batch (`batch_size` examples per rank), so N
ranks compute what one process computes with `batch_size * N` (see `selfrefine.distributed`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from . import distributed
from .errors import UserError, fail
from .files import append_jsonl, atomic_write, drop_torn_tail, read_json, write_jsonl
from .log import logger
from .progress import progress_bar
from .runs import RUN_FILE
from .schedule import MicroBatchOrder, cosine_lr, total_steps

StepFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float], int]]
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
BEST = "best.pt"  # the trainable weights with the lowest validation loss so far
TENSORBOARD = "tensorboard"  # the event files of report_to="tensorboard"
WANDB = "wandb"
WANDB_ID = "wandb_id"  # OUT's W&B run id, so that a resumed run goes on in the same W&B run
REPORT_TO = ("none", TENSORBOARD, WANDB)


@dataclass
class TrainConfig:
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0
    eval_every: int = 0  # validation every N steps (and after the last); 0: after the last only
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 autocast where native (`bf16_native`), else float16 + scaler on GPUs; float32
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    report_to: str = "none"  # the metrics also as TensorBoard scalars (OUT/tensorboard/) or to a W&B run: `MetricsLog`

    def __post_init__(self) -> None:
        """The command-line flags are checked when parsed (`selfrefine.flags`); this guards library callers."""
        checks = {"lr": self.lr > 0, "epochs": self.epochs > 0, "max_steps": self.max_steps >= 0,
                  "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1, "warmup": self.warmup >= 0,
                  "weight_decay": self.weight_decay >= 0, "max_grad_norm": self.max_grad_norm > 0,
                  "save_every": self.save_every >= 0, "eval_every": self.eval_every >= 0}
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or isinstance(value, bool) or not math.isfinite(value):
                raise UserError(f"training setting {name} = {value!r} is out of range or not finite")
        if self.report_to not in REPORT_TO:
            raise UserError(f"training setting report_to = {self.report_to!r}: must be one of {', '.join(REPORT_TO)}")
        if self.report_to == TENSORBOARD:  # a missing package is refused with the config, not once training started
            summary_writer()
        elif self.report_to == WANDB:
            wandb_module()


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step has been written."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint saved, rerun with --resume to continue")
        self.step = step


BF16_MIN_SPEEDUP = 1.2  # a CPU's bf16 matmul must beat float32 by this much for `auto` to pick bf16


def bf16_native(device: torch.device) -> bool:
    """Whether `auto` precision takes bfloat16 on `device`: CUDA with bf16; a CPU with bf16 instructions (AVX512-BF16
    or AMX) only where its bf16 matmuls are measured faster than float32 ones (`cpu_bf16_speedup`). The flags alone
    do not say: two 2-core Xeons with the same AVX512-BF16 flag ran this project's bf16 at 1.8x and at 0.7x float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_math() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def cpu_bf16_math() -> bool:
    """Whether the CPU has bf16 instructions (torch.cpu's own private checks, hence getattr)."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                      "_is_amx_tile_supported"))


@functools.cache
def cpu_bf16_speedup() -> float:
    """float32 time over bfloat16 time of a matmul of a small LM's widths (256 x 576 @ 576 x 1536, the best of 5
    timings of 4 products each, after warm-up); measured once per process (about 0.1 s) and logged."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(256, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append(time.perf_counter() - t0)
        return min(times[2:])

    speedup = best(torch.float32) / best(torch.bfloat16)
    choice = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
    logger.info(f"precision auto: bf16 matmuls measured {speedup:.2f}x float32 on this CPU -> {choice} "
                "(--dtype / --precision force one)")
    return speedup


def autocast_context(device: torch.device, precision: str = "auto") -> tuple[contextlib.AbstractContextManager, bool]:
    """(autocast context, needs a grad scaler): bfloat16 where the device has it natively (`bf16_native`), float16 +
    scaler on CUDA without it, float32 on other CPUs. The weights and the optimizer stay float32 either way."""
    if precision == "float32" or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext(), False
    if bf16_native(device):
        return torch.autocast(device.type, dtype=torch.bfloat16), False
    if device.type == "cpu":
        return contextlib.nullcontext(), False
    return torch.autocast("cuda", dtype=torch.float16), True


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=fused)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.set = False

    def __enter__(self) -> "_StopFlag":
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def save_checkpoint(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    scaler: torch.amp.GradScaler | None) -> None:
    """Trainable parameters, optimizer, step and RNG states, in one atomically replaced file.

    Under torchrun every rank takes part (FSDP shards are gathered, each rank's RNG state is kept); rank 0 writes.
    """
    rngs = distributed.all_gather_object(
        (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    trainable, optim = distributed.trainable_state(model), distributed.optimizer_state(model, optimizer)
    if not distributed.is_main():
        return
    state = {
        "step": step,
        "world": len(rngs),
        "trainable": trainable,
        "optimizer": optim,
        "rng_cpu": rngs[0][0],
        "rng_cuda": rngs[0][1],
        "rng_ranks": rngs if len(rngs) > 1 else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    with atomic_write(out_dir / CHECKPOINT, "wb") as f:
        torch.save(state, f)


def load_checkpoint(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None) -> int:
    path = out_dir / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file is the user's to fix, not a crash
        raise UserError(f"cannot read checkpoint ({type(e).__name__}); delete it to start over", path) from None
    if state.get("world", 1) != distributed.world():
        raise UserError(f"checkpoint was written by {state.get('world', 1)} process(es), this run has "
                        f"{distributed.world()}: resume with the same number (the data order depends on it)", path)
    params = dict(model.named_parameters())
    missing = [n for n in state["trainable"] if n not in params]
    if missing or set(state["trainable"]) != {n for n, p in params.items() if p.requires_grad}:
        raise UserError(f"checkpoint does not match this model/adapter (e.g. {(missing or ['trainable set'])[0]})", path)
    for n, saved in state["trainable"].items():
        if tuple(saved.shape) != tuple(params[n].shape):
            raise UserError(f"checkpoint does not match this model/adapter ({n} has shape {tuple(saved.shape)} there, "
                            f"{tuple(params[n].shape)} here)", path)
    distributed.load_training_state(model, optimizer, state["trainable"], state["optimizer"])
    rng_cpu, rng_cuda = state["rng_ranks"][distributed.rank()] if state.get("rng_ranks") else (
        state["rng_cpu"], state["rng_cuda"])
    torch.set_rng_state(rng_cpu)
    if rng_cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng_cuda)
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def _trim_metrics(out_dir: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again; step 0 when
    there is no checkpoint yet), and a last line torn by a kill mid-append."""
    path = out_dir / METRICS
    if torn := drop_torn_tail(path):
        logger.info(f"{path}: dropped a torn last line ({torn} bytes) left by an interrupted write")
    if path.exists():
        lines = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        write_jsonl(path, [r for r in lines if r.get("step", 0) <= step])


def summary_writer() -> type:
    """torch's TensorBoard `SummaryWriter`; the tensorboard package it needs is optional (the `tracking` extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        fail("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter


def wandb_module() -> ModuleType:
    """The wandb package; optional (the `tracking` extra), so imported only for --report-to wandb."""
    try:
        import wandb
    except ImportError:
        fail("--report-to wandb needs the wandb package: pip install wandb (or the tracking extra: "
             "pip install '.[tracking]')")
    return wandb


def wandb_run(out_dir: Path, config: dict[str, Any]) -> Any:
    """A W&B run in OUT, offline unless WANDB_MODE says otherwise (nothing leaves the machine unasked; `wandb sync
    OUT/wandb/...` uploads later). Its id is kept in OUT/wandb_id, so a resumed run continues the same W&B run."""
    id_file = out_dir / WANDB_ID
    if id_file.exists():
        run_id = id_file.read_text(encoding="utf-8").strip()
    else:
        run_id = uuid.uuid4().hex[:16]
        with atomic_write(id_file) as f:
            f.write(run_id)
    return wandb_module().init(id=run_id, resume="allow", dir=str(out_dir), name=out_dir.name, config=config,
                               mode=os.environ.get("WANDB_MODE", "offline"))


class MetricsLog:
    """Where the metrics records go: each is a line of OUT/metrics.jsonl and, with report_to "tensorboard", one
    scalar per key against its step in OUT/tensorboard/, for TensorBoard's curves, or with "wandb" one `log` of the
    record at its step in a W&B run (`wandb_run`) that has the run's settings as its config (`config`: those of
    OUT/run.json when the recipe wrote one). Only rank 0 writes. A run resumed from step `start` purges the
    TensorBoard events logged after it, as `_trim_metrics` drops those lines; W&B keeps its own and ignores a
    record at a step it has passed."""

    def __init__(self, out_dir: Path, report_to: str = "none", start: int = 0,
                 config: dict[str, Any] | None = None) -> None:
        self.path = out_dir / METRICS
        self.board = self.wandb = None
        if not distributed.is_main():
            return
        if report_to == TENSORBOARD:
            self.board = summary_writer()(str(out_dir / TENSORBOARD), purge_step=start + 1)
        elif report_to == WANDB:
            run_file = out_dir / RUN_FILE
            self.wandb = wandb_run(out_dir, read_json(run_file)["config"] if run_file.exists() else config or {})

    def __call__(self, record: dict[str, float]) -> None:
        if not distributed.is_main():
            return
        append_jsonl(self.path, record)
        logger.debug(f"{self.path}: {json.dumps(record)}")
        if self.board is not None:
            for name, value in record.items():
                if name != "step":
                    self.board.add_scalar(name, value, record["step"])
            self.board.flush()  # as the jsonl line: the curves stay current, and a kill loses at most this record
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self.board is not None:
            self.board.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if exc_type is None else 1)  # an interrupted or failed run shows as such


def train(model: torch.nn.Module, examples: list, collate: Callable[[list], Any], step_fn: StepFn,
          cfg: TrainConfig, out_dir: Path, device: torch.device, resume: bool = False,
          desc: str = "train", loss_weight: Callable[[Any], float] | None = None,
          on_start: Callable[[], None] | None = None,
          validate: Callable[[torch.nn.Module], float] | None = None) -> dict[str, float]:
    """Run optimizer steps up to the configured total; returns the last logged metrics.

    `loss_weight(batch)` is the denominator of the batch's mean loss (completion tokens for a token-mean
    loss; None: the number of examples, right for a per-example mean). One optimizer step minimises the mean
    over ALL its examples' scored units: each micro-batch's loss is weighted by its share of the denominator
    summed over the step's micro-batches and all ranks (one all-reduce per step), so that batch B x accum A
    on N processes gives the gradient of batch B * A * N in one go, whatever the micro-batches' lengths
    (DDP averages gradients over ranks, hence the factor `world`). The logged loss and metrics are the same
    weighted means over the step. `on_start` runs once the checkpoint (if any) has loaded: a resume records
    itself only when it can go on. `validate(model)` is the held-out loss (`held_out_loss`), taken every
    `eval_every` steps and after the last; the weights with the lowest one are those the model ends with.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = distributed.rank(), distributed.world()
    engine = distributed.wrap(model, device, cfg.fsdp)  # FSDP swaps in sharded parameters: wrap first
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    amp, needs_scaler = autocast_context(device, cfg.precision)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ across ranks, as across the rows of one batch
    start = _resume(out_dir, model, optimizer, scaler) if resume else 0
    best = _lowest_val_loss(out_dir) if validate is not None else None
    if on_start is not None:
        on_start()
    total = total_steps(len(examples), cfg.batch_size * world, cfg.grad_accum, cfg.epochs, cfg.max_steps)
    order = MicroBatchOrder(len(examples), cfg.batch_size * world, cfg.seed)
    model.train()
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.gradient_checkpointing
    last: dict[str, float] = {}
    t_start = time.perf_counter()
    with _StopFlag() as stop, MetricsLog(out_dir, cfg.report_to, start, asdict(cfg)) as log, progress_bar(
            total=total, initial=start, desc=desc, dynamic_ncols=True, enabled=distributed.is_main()) as bar:
        for step in range(start, total):
            t0 = time.perf_counter()
            lr = cosine_lr(step, cfg.lr, cfg.warmup, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Collate the step's micro-batches first: every micro-batch's loss is weighted by the denominator of
            # the whole step (all micro-batches, all ranks), known only once they are all in hand.
            ks = range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)
            micro = _collate_step([order.micro_batch(k) for k in ks], examples, collate, loss_weight, rank, world)
            (total_weight,) = distributed.all_reduce_sum([sum(w for _, _, w in micro)])
            sums: dict[str, float] = {}
            n_tokens, bad = 0, False
            for j, (has_examples, batch, weight) in enumerate(micro):
                with distributed.no_sync(engine, skip=j + 1 < len(micro)):
                    with amp:
                        loss, metrics, tokens = step_fn(engine, batch)
                    bad = bad or not bool(torch.isfinite(loss))  # checked with the step's last all-reduce
                    # This micro-batch's share of the step's denominator: 1 with one process and no accumulation,
                    # 0 on a rank without examples. Times `world` because DDP divides the gradient sum by it.
                    share = weight / total_weight if total_weight else 0.0
                    scaled = loss * (share * world)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                n_tokens += tokens if has_examples else 0
                for name, v in {"loss": loss.item(), **metrics}.items():
                    sums[name] = sums.get(name, 0.0) + v * share
            names = list(sums)
            *values, n_tokens, stopping, bad = distributed.all_reduce_sum(
                [sums[n] for n in names] + [n_tokens, stop.set, bad])
            if bad:  # some rank met a non-finite loss: its gradients are NaN, the optimizer has not run yet
                raise TrainingDiverged(out_dir, step, "loss")
            sums, n_tokens = dict(zip(names, values)), int(n_tokens)
            grad_norm = _optimizer_step(params, optimizer, scaler, cfg.max_grad_norm, out_dir, step)
            dt = time.perf_counter() - t0
            last = {"step": step + 1, **sums, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                    "tokens_per_s": n_tokens / dt, "elapsed_s": time.perf_counter() - t_start}
            log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:.0f}")
            done = step + 1 == total
            if validate is not None and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                last["val_loss"], best = _validate(model, engine, validate, amp, out_dir, step + 1, best, log)
            if done or stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                save_checkpoint(out_dir, model, optimizer, step + 1, scaler)
            if stopping and not done:
                raise Interrupted(step + 1)
    if start >= total:
        logger.info(f"{desc}: already at step {start} of {total}; nothing to train")
    if validate is not None and (out_dir / BEST).exists():
        last.update(_keep_best(model, out_dir, desc))
    return last


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, examples: list, collate: Callable[[list], Any], step_fn: StepFn,
                  batch_size: int, loss_weight: Callable[[Any], float] | None = None) -> float:
    """The training loss over held-out examples, weighted as in a step (`loss_weight`, else per example)."""
    total = count = 0.0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size])
        w = len(examples[i:i + batch_size]) if loss_weight is None else float(loss_weight(batch))
        total += step_fn(model, batch)[0].item() * w
        count += w
    return total / max(count, 1.0)


def _lowest_val_loss(out_dir: Path) -> float | None:
    """The lowest validation loss so far, kept in BEST by an earlier part of this run (read once, at the start)."""
    path = out_dir / BEST
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["val_loss"] if path.exists() else None


def _validate(model: torch.nn.Module, engine: torch.nn.Module, validate: Callable[[torch.nn.Module], float],
              amp: contextlib.AbstractContextManager, out_dir: Path, step: int,
              best: float | None, log: MetricsLog) -> tuple[float, float | None]:
    """(the held-out loss after `step`, the lowest so far), logged; the trainable weights kept in BEST when it is
    the lowest. The loss is averaged over ranks, so every rank takes the same decision (and joins the gather)."""
    engine.eval()
    with torch.no_grad(), amp:
        val = float(validate(engine))
    engine.train()
    val = distributed.all_reduce_sum([val])[0] / distributed.world()
    improved = best is None or val < best
    trainable = distributed.trainable_state(model) if improved else None  # every rank: a collective under FSDP
    if distributed.is_main():
        if improved:
            with atomic_write(out_dir / BEST, "wb") as f:
                torch.save({"step": step, "val_loss": val, "trainable": trainable}, f)
        log({"step": step, "val_loss": val})
    distributed.barrier()
    return val, val if improved else best


def _keep_best(model: torch.nn.Module, out_dir: Path, desc: str) -> dict[str, float]:
    """Loads BEST's weights into the model, the checkpoint the run keeps (the paper's stage-2 rule)."""
    best = torch.load(out_dir / BEST, map_location="cpu", weights_only=True)
    distributed.load_trainable(model, best["trainable"])
    logger.info(f"{desc}: keeping the weights of step {best['step']}, the lowest validation loss "
                f"({best['val_loss']:.4f})")
    return {"best_step": best["step"], "best_val_loss": best["val_loss"]}


def _resume(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None) -> int:
    """The step to go on from (0 without a checkpoint yet), metric lines logged after it dropped."""
    start = load_checkpoint(out_dir, model, optimizer, scaler) if (out_dir / CHECKPOINT).exists() else 0
    if distributed.is_main():
        _trim_metrics(out_dir, start)
    return start


def _collate_step(global_batches: list[list[int]], examples: list, collate: Callable[[list], Any],
                  loss_weight: Callable[[Any], float] | None, rank: int, world: int) -> list[tuple[bool, Any, float]]:
    """(has examples, batch, weight) of this rank's slice of each of the step's global micro-batches.

    A rank left without examples (a short last batch) runs one with weight 0: backward must still meet the
    other ranks in the gradient all-reduce.
    """
    micro = []
    for global_batch in global_batches:
        mine = global_batch[rank::world]
        batch = collate([examples[i] for i in mine or global_batch[:1]])
        weight = 0.0 if not mine else len(mine) if loss_weight is None else float(loss_weight(batch))
        micro.append((bool(mine), batch, weight))
    return micro


def _optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, max_grad_norm: float, out_dir: Path, step: int) -> float:
    """Clip and step; returns the gradient norm. Raises TrainingDiverged on a non-finite gradient (a scaler
    skips those steps itself) or update, the update undone first: the weights in memory stay the last good ones."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = distributed.full(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)).item()
    if not math.isfinite(grad_norm) and scaler is None:
        raise TrainingDiverged(out_dir, step, "gradient")
    before = _snapshot(params, optimizer)
    try:
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
        overflow = False
    except RuntimeError as e:  # an lr past float32's range: "cannot be converted ... without overflow"
        if "overflow" not in str(e):
            raise
        overflow = True  # a rank meeting it skips the rest of its step; all ranks still meet below
    optimizer.zero_grad(set_to_none=True)
    (n_bad,) = distributed.all_reduce_sum([overflow or _count_non_finite(params)])
    if n_bad:  # e.g. an overflowing lr: undo the step
        _restore(params, optimizer, before)
        raise TrainingDiverged(out_dir, step, "update")
    return grad_norm


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard: this rank's part


def _snapshot(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> tuple[list, dict]:
    """Copies of the trainable parameters and the optimizer state, to undo a step that left non-finite weights
    (cheap for LoRA; full fine-tuning pays one copy of weights + moments for the guarantee)."""
    with torch.no_grad():
        weights = [_local(p).clone() for p in params]
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}
    return weights, state


def _restore(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, saved: tuple[list, dict]) -> None:
    weights, state = saved
    with torch.no_grad():
        for p, w in zip(params, weights):
            _local(p).copy_(w)
    optimizer.state.clear()
    optimizer.state.update(state)


def _count_non_finite(params: list[torch.nn.Parameter]) -> int:
    """How many trainable tensors hold a NaN or inf (one device sync for all of them)."""
    if not params:
        return 0
    return int(torch.stack([~torch.isfinite(_local(p)).all() for p in params]).sum())


class TrainingDiverged(UserError):
    """A non-finite loss or gradient (stopped before the optimizer writes NaN into the weights), or a non-finite
    update (the step is undone). Exit code 3, told apart from bad input (2)."""

    exit_code = 3

    def __init__(self, out_dir: Path, step: int, what: str) -> None:
        ckpt = out_dir / CHECKPOINT
        kept = f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written"
        done = ("the update made weights non-finite and was undone" if what == "update"
                else "stopped before updating the weights")
        super().__init__(f"non-finite {what} at step {step + 1}; {done}, {kept} "
                         "(try a lower --lr or --max-grad-norm)", out_dir)
        self.step = step + 1
