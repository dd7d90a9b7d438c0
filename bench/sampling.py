"""New tokens/s of batched greedy generation, ours (`selfrefine.sampling.generate`) against
`transformers`' `generate`, on the same random weights of SmolLM2-135M's shape and the same prompts.

The weights are written once with our `save_model` and read by both `load_model` and
`AutoModelForCausalLM.from_pretrained`. Prompts are random token ids of varied lengths (left-padded with an
attention mask for `transformers`), no early stop, so both sides produce batch x new tokens. Each size runs
once untimed, then is timed interleaved (ours, theirs) and the best of `--repeats` is kept: the
least-disturbed run on a shared machine. The decode step time, (t(new) - t(1)) / (new - 1), is printed
beside its bandwidth floor: bytes of weights + KV cache read per step / memory bandwidth.
Last line: `ratio_vs_hf=X.XX` (our tokens/s over theirs at batch 8).

Then the two real workloads of `bench/workloads.py` (self-refine sampling and greedy evaluation on the
packaged SmolLM2), each with its own `workload NAME: ratio_vs_hf=X.XX` line (best transformers time over ours), and
the bound on that ratio: the best transformers time over the minimal work at the matmul ceiling measured in the run.

    python bench/sampling.py --quick                      (micro-run only)
    python bench/sampling.py --workloads selfrefine eval  (the real workloads only)
    python bench/sampling.py --device cuda --dtype bfloat16 --json sampling.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/sampling.py` from anywhere

import torch

from bench import workloads
from bench.common import DTYPES, SHAPES, random_model, report, sync
from bench.workloads import WORKLOADS
from selfrefine.checkpoint import load_model, save_model
from selfrefine.decode_step import GRAPH_CHOICES, use_static_step
from selfrefine.files import write_json
from selfrefine.model import ModelConfig
from selfrefine.recipes.common import pick_dtype
from selfrefine.sampling import SamplingParams, generate

RATIO_BATCH = 8


def memcpy_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes/s moved by a large tensor copy (each byte read once and written once), best of 5."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


def decode_bytes(model: torch.nn.Module, cfg: ModelConfig, batch: int, slots: float) -> float:
    """Bytes one decode step must read: every weight once (the tied head included once) and the K and V
    of `slots` cache slots for every row."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    return weights + 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * slots * elem


def prompts_for(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 81, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def ours_fn(model, prompts: list[list[int]], static: bool) -> Callable[[int], list[list[int]]]:
    def run(new: int) -> list[list[int]]:
        res = generate(model, prompts, SamplingParams(max_new_tokens=new), stop_ids=[], batch_size=len(prompts),
                       progress=False, static=static)
        return [r[0].token_ids for r in res]
    return run


def hf_fn(hf, prompts: list[list[int]], device: torch.device) -> Callable[[int], list[list[int]]]:
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run(new: int) -> list[list[int]]:
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        return out[:, L:].tolist()
    return run


def timed(fn: Callable[[int], list[list[int]]], new: int, device: torch.device) -> tuple[float, list[list[int]]]:
    sync(device)
    t0 = time.perf_counter()
    out = fn(new)
    sync(device)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(prog="bench/sampling.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="32 new tokens, one timed run per size")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights dtype of both sides; auto: the recipes' choice for inference (bfloat16 where native)")
    p.add_argument("--new-tokens", type=int, help="default 128 (32 with --quick)")
    p.add_argument("--repeats", type=int, help="timed runs per size and side, best kept (default 2, 1 with --quick)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 8 32 (+64 on cuda)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the floor (default: measured memcpy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", nargs="+", choices=["micro", *WORKLOADS],
                   help="what to run (default: all; micro only with --quick)")
    p.add_argument("--slots", type=int, default=128, help="our decoding slots in the real workloads")
    p.add_argument("--questions", type=int, default=64, help="arith training questions of the selfrefine workload")
    p.add_argument("--eval-questions", type=int, default=100, help="arith test questions of the eval workload")
    p.add_argument("--cuda-graphs", default="auto", choices=GRAPH_CHOICES,
                   help="our decode step: auto = a CUDA graph on CUDA, eager elsewhere; on = the fixed-shape step "
                        "anywhere (captured on CUDA only); off = eager")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.workloads = args.workloads or (["micro"] if args.quick else ["micro", *WORKLOADS])
    args.device = torch.device(args.device)
    args.static = use_static_step(args.cuda_graphs, args.device)
    if args.dtype == "auto":  # the recipes' own choice for inference
        args.dtype = str(pick_dtype("auto", args.device, training=False)).removeprefix("torch.")
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.batch_sizes or ([1, 8, 32, 64] if args.device.type == "cuda" else [1, 8, 32])
    extra: dict = {}
    if any(w in WORKLOADS for w in args.workloads):
        extra = real_workloads(args)
    if "micro" not in args.workloads:
        if args.json:
            write_json(args.json, {"config": {k: str(v) for k, v in vars(args).items()}, **extra})
        return extra["workload_ratios"][args.workloads[-1]]
    if RATIO_BATCH not in sizes or args.new_tokens < 2:
        raise SystemExit(f"error: batch size {RATIO_BATCH} and --new-tokens >= 2 are needed for the ratio")

    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(**SHAPES["135m"], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(random_model(cfg, dtype, torch.device("cpu"), args.seed), tmp)
        ours = load_model(tmp, dtype, args.device)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
    hf.generation_config.eos_token_id = None  # no early stop: every row makes all its new tokens
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else memcpy_bandwidth(args.device)

    rows, tok_s = [], {}
    for b in sizes:
        prompts = prompts_for(b, cfg.vocab_size, args.seed + b)
        sides = {"ours": ours_fn(ours, prompts, args.static), "transformers": hf_fn(hf, prompts, args.device)}
        for fn in sides.values():  # warm-up: allocator, kernels, lazy init
            fn(2)
        full = {name: [] for name in sides}
        first = {name: [] for name in sides}
        outs = {}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                t, outs[name] = timed(fn, args.new_tokens, args.device)
                full[name].append(t)
                first[name].append(timed(fn, 1, args.device)[0])
        assert all(len(o) == args.new_tokens for out in outs.values() for o in out), "a row stopped early"
        agree = sum(a == h for a, h in zip(outs["ours"], outs["transformers"])) / b
        slots = max(map(len, prompts)) + args.new_tokens / 2  # mean cache length over the decode steps
        floor_ms = 1e3 * decode_bytes(ours, cfg, b, slots) / bandwidth
        for name in sides:
            t, t1 = min(full[name]), min(first[name])
            tok_s[name, b] = b * args.new_tokens / t
            rows.append({"batch": b, "impl": name, "new tok/s": tok_s[name, b], "total s": t,
                         "decode ms/step": 1e3 * max(t - t1, 0.0) / (args.new_tokens - 1),
                         "floor ms/step": floor_ms, "same greedy rows %": 100 * agree})
    ratio = tok_s["ours", RATIO_BATCH] / tok_s["transformers", RATIO_BATCH]
    title = (f"greedy generation, 135m shape, {args.new_tokens} new tokens, prompts 16-80 tokens, {args.dtype}, "
             f"{args.device}, our decode step {step_name(args)}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, best of {args.repeats}; "
             f"floor at {bandwidth / 1e9:.1f} GB/s")
    report(title, rows, args, {"bandwidth_gbs": bandwidth / 1e9, **extra}, ratio)
    return ratio


def step_name(args: argparse.Namespace) -> str:
    return ("CUDA graph" if args.device.type == "cuda" else "static, uncaptured") if args.static else "eager"


def real_workloads(args: argparse.Namespace) -> dict:
    """Runs bench/workloads.py's workloads, prints their table and ratio lines; the part of the JSON they fill."""
    names = [w for w in args.workloads if w in WORKLOADS]
    rows, ratios, ceiling = workloads.run(args.device, DTYPES[args.dtype], args.slots, args.questions,
                                          args.eval_questions, names, args.static)
    cols = list(rows[0])
    print(f"\n### real workloads, packaged SmolLM2-135M-Instruct, {args.dtype}, {args.device}, "
          f"our decode step {step_name(args)}, "
          f"{torch.get_num_threads()} threads; matmul ceiling {ceiling:.0f} GFLOP/s\n")
    print("| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    bounds = {}
    for name, ratio in ratios.items():
        bounds[name] = workloads.ratio_bound([r for r in rows if r["workload"] == name], ceiling)
        print(f"workload {name}: ratio_vs_hf={ratio:.2f} (bound at the matmul ceiling: {bounds[name]:.2f})")
    return {"workloads": rows, "workload_ratios": ratios, "workload_ratio_bounds": bounds,
            "matmul_ceiling_gflops": ceiling}


if __name__ == "__main__":
    main()
