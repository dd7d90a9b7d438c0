"""Batched autoregressive sampling over the model's preallocated KV cache.

Prompts of different lengths share a batch by LEFT padding, so every row's next token sits in the
same cache slot: one prefill forward for the whole batch, then one token per step. Rows that finish
are dropped from the batch (their cache rows removed), so they cost nothing afterwards.

Determinism: rows are planned into batches from the prompt lengths alone, and each batch draws from
its own generator seeded by (seed, batch index). The same seed gives the same samples, and running
any subset of batches (sharding over processes) gives exactly the samples of a full run for those rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from .errors import fail
from .model import Transformer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    n: int = 1  # samples per prompt
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            fail(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            fail(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            fail(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            fail(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop_strings):
            fail("stop strings must be non-empty")


@dataclass
class Completion:
    """One sample. `token_ids` are the generated ids without the stop id that ended them (a stop
    string's tokens are kept); `text` is their decoding, cut before the first stop string."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop id or stop string) | "length" (max_new_tokens or the context)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (Hugging Face's order); removed tokens get -inf.

    temperature 0 (greedy) and 1 leave the scale alone. Top-k keeps every token tied with the k-th;
    top-p keeps the smallest set of most likely tokens whose mass reaches p, and always the top token.
    """
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(logits, dim=-1)
        # Drop the least likely tokens while the mass dropped stays <= 1 - p; never drop the top one.
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def plan_batches(lengths: list[int], n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(prompt index, sample index) rows in batches of `batch_size`, longest prompts first.

    Similar lengths share a batch, so little padding; the largest batch comes first, so running
    out of memory shows at once. Depends only on the lengths, so every process plans the same batches.
    """
    if batch_size < 1:
        fail(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows = [(i, j) for i in order for j in range(n)]
    return [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]


def batch_generator(seed: int, batch: int, device: torch.device) -> torch.Generator:
    """A generator for one batch, its seed mixed from (seed, batch) so batches draw independently."""
    state = np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2**63 - 1))


def next_tokens(logits: torch.Tensor, params: SamplingParams, g: torch.Generator) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) token ids: argmax when greedy, else a draw from the filtered distribution."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=g).squeeze(1)


def completion(ids: list[int], reason: str, decode: Callable[[list[int]], str] | None,
               stop_strings: tuple[str, ...] = ()) -> Completion:
    text = decode(ids) if decode else ""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return Completion(ids, text[:min(cuts)] if cuts else text, reason)


def generate_batch(model: Transformer, prompts: list[list[int]], params: SamplingParams, stop_ids: set[int],
                   decode: Callable[[list[int]], str] | None, g: torch.Generator) -> list[Completion]:
    """Sample one completion per prompt (row) of one batch."""
    ctx = model.config.max_position_embeddings
    device = model.model.embed_tokens.weight.device
    B, L = len(prompts), max(map(len, prompts))
    budgets = [min(params.max_new_tokens, ctx - len(p)) for p in prompts]  # a row never outgrows the context
    slots = L + max(budgets) - 1  # the last token is sampled, never fed
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)
    slot = torch.arange(slots, device=device)
    # Padding keys are hidden; RoPE positions count from each row's first real token.
    key_mask = slot[None] >= pad[:, None] if pad.any() else None
    positions = (slot[None] - pad[:, None]).clamp(min=0)
    cache = model.new_cache(B, slots)
    hidden = model.hidden_states(ids, positions[:, :L], None if key_mask is None else key_mask[:, :L], cache)
    logits = model.lm_head(hidden[:, -1])  # the last slot is every row's last prompt token

    rows = list(range(B))  # batch row -> prompt row, shrinking as rows finish
    out: list[list[int]] = [[] for _ in range(B)]
    done: dict[int, Completion] = {}
    for step in range(max(budgets)):
        tokens = next_tokens(logits.float(), params, g)
        keep = []
        for k, (r, tok) in enumerate(zip(rows, tokens.tolist())):
            if tok in stop_ids:
                done[r] = completion(out[r], "stop", decode)
                continue
            out[r].append(tok)
            # Re-decoding the whole completion: a stop string may span tokens, and bytes merge into characters.
            if params.stop_strings and any(s in decode(out[r]) for s in params.stop_strings):
                done[r] = completion(out[r], "stop", decode, params.stop_strings)
            elif len(out[r]) == budgets[r]:
                done[r] = completion(out[r], "length", decode)
            else:
                keep.append(k)
        if not keep:
            break
        if len(keep) < len(rows):  # drop finished rows: they would cost a full row of compute every step
            idx = torch.tensor(keep, device=device)
            cache.k, cache.v = cache.k.index_select(1, idx), cache.v.index_select(1, idx)
            tokens, positions = tokens[idx], positions[idx]
            key_mask = None if key_mask is None else key_mask[idx]
            rows = [rows[k] for k in keep]
        end = L + step + 1
        logits = model(tokens[:, None], positions[:, end - 1:end],
                       None if key_mask is None else key_mask[:, :end], cache)[:, -1]
    return [done[r] for r in range(B)]  # every row ends by its budget at the latest


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, *, stop_ids: list[int],
             decode: Callable[[list[int]], str] | None = None, batch_size: int = 16, seed: int = 0,
             progress: bool = True, batches: Iterable[int] | None = None,
             on_batch: Callable[[list[tuple[int, int]], list[Completion]], None] | None = None,
             ) -> list[list[Completion | None]]:
    """`params.n` completions for each prompt (token ids, no padding): result[prompt][sample].

    `batches` runs only those batch indices of `plan_batches` (the other entries stay None) and gives
    the same samples for those rows as a full run; `on_batch(rows, completions)` sees each batch as it
    finishes. A prompt that leaves no room in the context raises UserError naming its index.
    """
    if params.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    ctx = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if not p:
            fail(f"prompt {i} is empty")
        if len(p) >= ctx:
            fail(f"prompt {i} has {len(p)} tokens, but the model's context is {ctx} tokens "
                 "(max_position_embeddings): no room to generate")
    plan = plan_batches([len(p) for p in prompts], params.n, batch_size)
    todo = range(len(plan)) if batches is None else sorted(set(batches))
    for b in todo:
        if not 0 <= b < len(plan):
            fail(f"batch index {b} out of range: the plan has {len(plan)} batches")
    device = model.model.embed_tokens.weight.device
    results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
    new_tokens, start = 0, time.perf_counter()
    bar = tqdm(todo, desc="sampling", unit="batch", disable=not progress)
    for b in bar:
        rows = plan[b]
        completions = generate_batch(model, [prompts[i] for i, _ in rows], params, set(stop_ids), decode,
                                     batch_generator(seed, b, device))
        for (i, j), c in zip(rows, completions):
            results[i][j] = c
        new_tokens += sum(len(c.token_ids) for c in completions)
        bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.1f} new tok/s")
        if on_batch is not None:
            on_batch(rows, completions)
    return results
