"""The two real sampling workloads of a self-refine run, ours against `transformers.generate`, on the packaged
SmolLM2-135M-Instruct with its chat template and stop tokens (rows end at <|im_end|> or at the token budget):

  (a) selfrefine: `--questions` (64) arith training questions, 4 CoT samples + 1 direct answer each at
      temperature 0.8, top-p 0.95, 64 new tokens (what `sample.py --prompt both` does in the pipeline);
  (b) eval: `--eval-questions` (100) arith test questions, greedy, 96 new tokens (what `eval.py` does).

Whole wall time, prefill included. Ours runs with `--slots` decoding slots (continuous batching, each prompt
prefilled once for all its samples); `transformers` runs length-sorted, left-padded batches of 8, 32, 64 and 128
rows (`num_return_sequences=4` for the CoT samples) and its best batch size is the peer. Both get the same
prompt ids, budgets and stop ids. GFLOP/s is the work a minimal implementation must do (each distinct prompt
prefilled once, each new token once; 2 x matmul weights per token) over the wall time, beside the matmul
ceiling measured in the same run (a 256-row matmul of the model's widths, the best case of these kernels).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch

from bench.common import sync
from selfrefine.checkpoint import load_model
from selfrefine.convert_gguf import convert, default_gguf_path
from selfrefine.sampling import SamplingParams, generate
from selfrefine.tasks import get_task, render_prompt
from selfrefine.tokenizer import Tokenizer

HF_BATCHES = (8, 32, 64, 128)  # the 8/32/64, and our slot count: the strongest peer
WORKLOADS = ("selfrefine", "eval")


@dataclass(frozen=True)
class Part:
    """One generate call of a workload: prompts, how many samples each, and the sampling settings."""

    prompts: list[list[int]]
    params: SamplingParams
    seed: int


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    parts: tuple[Part, ...]


def workloads(tok: Tokenizer, questions: int, eval_questions: int) -> list[Workload]:
    def prompts(split: str, n: int, ptype: str) -> list[list[int]]:
        return [tok.encode_chat(render_prompt(e, "math", ptype))
                for e in get_task("arith").load(split=split, limit=n)]

    sampled = dict(temperature=0.8, top_p=0.95, max_new_tokens=64)
    return [
        Workload("selfrefine", f"{questions} arith train q x (4 CoT + 1 direct), T=0.8, top-p 0.95, 64 new tokens",
                 (Part(prompts("train", questions, "cot"), SamplingParams(n=4, **sampled), 0),
                  Part(prompts("train", questions, "direct"), SamplingParams(n=1, **sampled), 1))),
        Workload("eval", f"{eval_questions} arith test q, greedy, 96 new tokens",
                 (Part(prompts("test", eval_questions, "cot"), SamplingParams(max_new_tokens=96), 0),)),
    ]


def run_ours(model, tok: Tokenizer, part: Part, slots: int, static: bool) -> list[int]:
    """New tokens of every row (its stop token not counted)."""
    res = generate(model, part.prompts, part.params, stop_ids=tok.stop_ids, decode=tok.decode, batch_size=slots,
                   seed=part.seed, progress=False, static=static)
    return [len(c.token_ids) for row in res for c in row]


def run_hf(hf, tok: Tokenizer, part: Part, batch: int, device: torch.device) -> list[int]:
    """New tokens of every row (in prompt order, like ours), `transformers.generate` over length-sorted
    left-padded batches of `batch` rows."""
    n, p = part.params.n, part.params
    order = sorted(range(len(part.prompts)), key=lambda i: -len(part.prompts[i]))
    per_call = max(batch // n, 1)
    stops, counts = set(tok.stop_ids), {}
    for k in range(0, len(order), per_call):
        chunk = [part.prompts[i] for i in order[k:k + per_call]]
        L = max(map(len, chunk))
        ids = torch.tensor([[0] * (L - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (L - len(c)) + [1] * len(c) for c in chunk], device=device)
        kw = dict(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=0) if p.temperature else \
            dict(do_sample=False)
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=p.max_new_tokens,
                          num_return_sequences=n, eos_token_id=list(stops), pad_token_id=0, **kw)
        for r, row in enumerate(out[:, L:].tolist()):
            counts[order[k + r // n], r % n] = next((j for j, t in enumerate(row) if t in stops), len(row))
    return [counts[i, j] for i in range(len(part.prompts)) for j in range(n)]


def matmul_ceiling(hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> float:
    """GFLOP/s of the best case of this model's matmuls here: 256 rows x (hidden -> intermediate), the best of
    20 timings of 10 products each, after 0.5 s of warm-up (CPU clocks and thread pools ramp up)."""
    a = torch.randn(256, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, inter, dtype=dtype, device=device)
    t_end = time.perf_counter() + 0.5
    while time.perf_counter() < t_end:
        a @ b
    best = float("inf")
    for _ in range(20):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * 256 * hidden * inter / best / 1e9


def measure(w: Workload, sides: dict[tuple[str, int], Callable[[Part], list[int]]], device: torch.device,
            body: int, head: int) -> list[dict]:
    """One timed run of each side (after a two-prompt warm-up), in the order given: a table row each, printed as
    it is measured. On greedy parts every side must make the same number of tokens per row as the first."""
    print(f"workload {w.name}: {w.what}", flush=True)
    prefill = sum(len(p) for part in w.parts for p in part.prompts)
    rows, first = [], None
    for (impl, batch), fn in sides.items():
        fn(Part(w.parts[0].prompts[:2], SamplingParams(max_new_tokens=4), 0))
        sync(device)
        t0 = time.perf_counter()
        counts = [(c, part.params.max_new_tokens, not part.params.temperature) for part in w.parts for c in fn(part)]
        sync(device)
        t = time.perf_counter() - t0
        new = sum(c for c, _, _ in counts)
        greedy = [c for c, _, is_greedy in counts if is_greedy]
        first = greedy if first is None else first
        rows.append({"workload": w.name, "impl": impl, "batch": batch, "s": t, "new tok/s": new / t,
                     "new tokens": new, "at budget %": 100 * sum(c >= b for c, b, _ in counts) / len(counts),
                     "GFLOP/s": (2 * body * (prefill + new) + 2 * head * new) / t / 1e9,
                     "same greedy lengths %": 100 * sum(a == b for a, b in zip(greedy, first)) / len(greedy)
                     if greedy else None})
        print(" | ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
              flush=True)
    return rows


def ratio_bound(rows: list[dict], ceiling: float) -> float:
    """The highest ratio_vs_hf any implementation could reach on one workload (`measure`'s rows, ours first): the
    best transformers time over the time of the minimal work (GFLOP/s x s of our row) at the matmul ceiling."""
    return min(r["s"] for r in rows[1:]) / (rows[0]["GFLOP/s"] * rows[0]["s"] / ceiling)


def run(device: torch.device, dtype: torch.dtype, slots: int, questions: int, eval_questions: int,
        names: list[str], static: bool = False) -> tuple[list[dict], dict[str, float], float]:
    """(table rows, {workload: ratio_vs_hf (best transformers time / ours)}, matmul ceiling GFLOP/s); `static`:
    our fixed-shape decode step (a CUDA graph on CUDA)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        convert(default_gguf_path(), Path(tmp))
        model = load_model(tmp, dtype, device)
        tok = Tokenizer.from_dir(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    sides = {("ours", slots): lambda part: run_ours(model, tok, part, slots, static)}
    sides.update({("transformers", b): (lambda part, b=b: run_hf(hf, tok, part, b, device)) for b in HF_BATCHES})
    rows, ratios = [], {}
    for w in workloads(tok, questions, eval_questions):
        if w.name in names:
            with torch.inference_mode():
                got = measure(w, sides, device, body, head)
            rows += got
            ratios[w.name] = min(r["s"] for r in got[1:]) / got[0]["s"]
    return rows, ratios, matmul_ceiling(cfg.hidden_size, cfg.intermediate_size, dtype, device)
