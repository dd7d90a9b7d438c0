"""What the benchmarks share: model shapes, the same random weights for us and for `transformers`, timing,
memory, MFU, and the report (markdown table, JSON, and a last line `ratio_vs_hf=X.XX`).

`transformers` / `peft` are benchmark peers only: they are imported here, in bench/, never in selfrefine/.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from selfrefine.checkpoint import save_model
from selfrefine.files import write_json
from selfrefine.lora import LoRAConfig, inject_lora
from selfrefine.model import ModelConfig, Transformer
from selfrefine.rope import inverse_frequencies
from selfrefine.trainer import TrainConfig, autocast_context, make_optimizer

# Llama-family shapes of the models the paper's students come from; "tiny" is for smoke tests.
SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 tie_word_embeddings=True),
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                 num_kv_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
               num_kv_heads=32, tie_word_embeddings=False),
}
QUICK_LAYERS = 8  # --quick keeps the 135m widths (vocab, hidden, heads) but fewer layers, to fit CI time
LORA = LoRAConfig(r=16, alpha=32, dropout=0.0)  # dropout 0 on both sides: same math, fair timing
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"CI size: 135m widths with {QUICK_LAYERS} layers, batch 4, seq 128, 3 steps (flags given win)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--shape", default="135m", choices=list(SHAPES))
    p.add_argument("--layers", type=int, help="override the shape's layer count")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--batch", type=int, help="sequences per step (DPO: pairs per step); default 4")
    p.add_argument("--seq", type=int, help="tokens per sequence; default 256 (128 with --quick)")
    p.add_argument("--steps", type=int, help="timed steps per contender, median reported; default 5 (3 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender first")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weights dtype (float32 weights train under --precision's autocast, as the trainer does)")
    p.add_argument("--precision", default="auto", choices=["auto", "float32"],
                   help="the trainer's --precision: auto is bf16 autocast where native; float32 for exact comparisons")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 dense bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    defaults = {"batch": 4, "seq": 128 if args.quick else 256, "steps": 3 if args.quick else 5}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.shape, args.layers = "135m", args.layers or QUICK_LAYERS
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    kw = dict(SHAPES[args.shape], max_position_embeddings=max(2048, args.seq), bos_token_id=1, eos_token_id=2)
    if args.layers:
        kw["num_layers"] = args.layers
    return ModelConfig(**kw)


@torch.no_grad()
def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> Transformer:
    """HF-style init (N(0, 0.02) weights, unit norms), built directly on `device` in `dtype`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    for name, p in model.named_parameters():
        p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    # `.to(dtype)` also rounded the RoPE frequencies (a float buffer); put the float32 ones back, as load_model has them
    model.inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    return model


def build_models(args: argparse.Namespace, cfg: ModelConfig) -> tuple[Transformer, torch.nn.Module]:
    """Ours and `transformers`' (+ PEFT) on the same weights and the same adapter init, in train mode."""
    dtype = DTYPES[args.dtype]
    ours = random_model(cfg, dtype, args.device, args.seed)
    hf = hf_model(ours, dtype, args.device)
    if args.gradient_checkpointing:
        ours.gradient_checkpointing = True
        enable = getattr(hf, "activation_checkpointing_enable", None)  # the new name (5.25 has it, 5.17 not yet)
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.full:
        inject_lora(ours, LORA)
        hf = hf_lora(hf, LORA)
        copy_lora(ours, hf)
    return ours.train(), hf.train()


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def new_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Our trainer's AdamW (fused on CUDA), for both sides."""
    return make_optimizer(trainable(model), TrainConfig(lr=1e-4), device)


def hf_model(ours: Transformer, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The same weights as a `transformers` model: written with our `save_model`, read by `from_pretrained`."""
    import transformers

    # the dtype at load time: casting afterwards would round HF's RoPE buffer too
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype)
    return hf.to(device)


def hf_lora(hf: torch.nn.Module, lora: LoRAConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                        bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT calls a method transformers 5 deprecates; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(hf, config)


@torch.no_grad()
def copy_lora(ours: torch.nn.Module, peft_model: torch.nn.Module) -> None:
    """Give PEFT's adapter our A matrices (B is zero on both), so both sides compute the very same numbers
    and their losses can be compared step by step."""
    theirs = dict(peft_model.named_parameters())
    for name, p in ours.named_parameters():
        if name.endswith(".lora_A"):
            theirs[f"base_model.model.{name}.default.weight"].copy_(p)


def optimizer_step(compute_loss: Callable[[], torch.Tensor], params: list[torch.nn.Parameter],
                   opt: torch.optim.Optimizer, amp) -> float:
    """forward + loss (under `amp`), backward, clip to norm 1, AdamW step: the trainer's step, for either side."""
    with amp:
        loss = compute_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the device before timing starts, for both sides alike."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_params(model: torch.nn.Module) -> int:
    """Weights that take part in a matmul per token (every nn.Linear incl. the LM head, not the embedding lookup)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_flops_per_token(cfg: ModelConfig, n_matmul: int, seq: int) -> float:
    """6N + attention (PaLM, Chowdhery et al. 2022, App. B: 12 * layers * heads * head_dim * seq).

    The usual convention, even for LoRA (which skips the base weights' gradients): MFU compares runs of the
    same mode, not LoRA against full fine-tuning.
    """
    return 6 * n_matmul + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes that live between steps: unique parameters and optimizer states (grads are freed each step)."""
    tensors = {id(p): p for p in model.parameters()}
    for state in opt.state.values():
        tensors.update({id(t): t for t in state.values() if torch.is_tensor(t)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Contender:
    """One implementation of the benchmarked step: `step()` runs it once and returns its loss."""

    name: str
    step: Callable[[], float]
    tokens: int  # tokens processed per step
    resident: Callable[[], int] = lambda: 0
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    transient: int = 0

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def contender(name: str, model: torch.nn.Module, compute_loss: Callable[[], torch.Tensor], tokens: int,
              device: torch.device, precision: str) -> Contender:
    """Wrap a loss closure into a full optimizer step with its own AdamW, under the trainer's autocast."""
    opt, params = new_optimizer(model, device), trainable(model)
    amp, _ = autocast_context(device, precision)
    return Contender(name, lambda: optimizer_step(compute_loss, params, opt, amp), tokens,
                     resident=lambda: resident_bytes(model, opt))


def run_step(c: Contender, device: torch.device) -> float:
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    loss = c.step()
    sync(device)
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        c.transient = max(c.transient, torch.cuda.max_memory_allocated(device) - before)
    c.losses.append(loss)
    return dt


def measure(contenders: list[Contender], steps: int, warmup: int, device: torch.device) -> None:
    """Warm up each, then time `steps` rounds, interleaved (and in alternating order) so that noise from a
    shared machine hits all alike."""
    for _ in range(warmup):
        for c in contenders:
            run_step(c, device)
    for i in range(steps):
        for c in contenders[::-1] if i % 2 else contenders:
            c.times.append(run_step(c, device))
        gc.collect()


def peak_memory_gib(c: Contender, device: torch.device) -> float | None:
    """Resident (weights, optimizer) + the step's transient peak, on CUDA; None where not measurable."""
    return (c.resident() + c.transient) / 2**30 if device.type == "cuda" else None


def result_row(c: Contender, cfg: ModelConfig, args: argparse.Namespace, n_matmul: int) -> dict:
    tok_s = c.tokens / c.seconds
    mfu = None
    if args.device.type == "cuda":
        mfu = 100 * train_flops_per_token(cfg, n_matmul, args.seq) * tok_s / (args.peak_tflops * 1e12)
    return {"impl": c.name, "ms/step": 1000 * c.seconds, "best ms": 1000 * min(c.times), "tokens/s": tok_s,
            "peak GiB": peak_memory_gib(c, args.device), "MFU %": mfu, "first loss": c.losses[0],
            "times_ms": [round(1000 * t, 1) for t in c.times], "losses": c.losses}


def report(title: str, rows: list[dict], args: argparse.Namespace, extra: dict, ratio: float) -> None:
    """Markdown table, optional JSON, and the last line `ratio_vs_hf=X.XX`."""
    cols = [c for c in rows[0] if c not in ("times_ms", "losses")]
    print(f"\n### {title}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    print()
    if args.json:
        config = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
        write_json(args.json, {"title": title, "config": config, "rows": rows, **extra, "ratio_vs_hf": ratio})
    print(f"ratio_vs_hf={ratio:.2f}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def describe(args: argparse.Namespace, cfg: ModelConfig) -> str:
    mode = "full" if args.full else f"LoRA r={LORA.r}"
    return (f"{args.shape} shape ({cfg.num_layers} layers), {mode}, batch {args.batch} x seq {args.seq}, "
            f"{args.dtype}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"median of {args.steps}")
