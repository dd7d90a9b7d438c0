"""Continuous-batching autoregressive sampling over a preallocated per-slot KV cache.

A fixed number of decoding slots (`batch_size`), each row at its own length, RoPE position and key mask:
one token per busy slot per step, in one forward. When a row finishes, its slot takes the next waiting
(prompt, sample) at once; the waiting prompts are prefilled together, each prompt once for all its n
samples (its keys/values copied into their slots), and the token prefix all prompts share (the chat
template's system turn) once for the whole run. Nothing is recomputed, no cache row moves.

Determinism: each (prompt, sample) row draws from its own generator seeded by (seed, prompt, sample), so
the same seed gives the same samples at any slot count, and running any subset of rows (sharding over
processes) gives exactly the samples of a full run for those rows. That needs the same bits as well as the same
draws: a row's numbers must not depend on the rows it shares a forward with, which in floating point is not
free (`PAD_TO`, `MIN_ROWS`). Stop strings are checked on the new text only (`StopScanner`).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from .attention import KVCache, SlotCache
from .chunks import chunk_rows
from .decode_step import EagerStep, StaticStep
from .errors import fail
from .log import quiet
from .model import Transformer
from .packed_linear import packed_linears
from .progress import progress_bar

# A decode step (and a prefill's head) runs at least this many rows: oneDNN's one-row product rounds differently
# from its many-row one (bfloat16, the 135M model's down projection, 1536 -> 576: for some rows, the row alone got
# other bits than the same row in products of 2 to 512 rows, which all agree; measured on a 2-core AMD EPYC), so a
# row's tokens changed with whether it happened to decode alone (a run's tail, one slot). The head's 576 -> 49152
# product agreed at 1-64 rows there, but need not on another CPU.
MIN_ROWS = 2
PAD_TO = 8  # a prompt's prefill is right-padded to a multiple of this many tokens (after the shared prefix)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    n: int = 1  # samples per prompt
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "n"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                fail(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p"):
            if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name)):
                fail(f"{name} must be a finite number, got {getattr(self, name)!r}")
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
        logits = logits.masked_fill(~top_p_keep(logits, top_p), float("-inf"))
    return logits


TOP_P_CANDIDATES = 256  # the likeliest tokens top-p looks at first (a full sort only if their mass is below p)


def top_p_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) bool: the tokens top-p keeps, those whose likelier tokens hold less than p of the mass (the top
    token always). Sorting the whole vocabulary costs more than the model's forward at 64 rows on a CPU, so
    the mass is first taken over the `TOP_P_CANDIDATES` likeliest tokens only: where it reaches p in every
    row the nucleus lies among them and the rest of the vocabulary is dropped unsorted."""
    k = min(TOP_P_CANDIDATES, logits.shape[-1])
    top, ids = torch.topk(logits, k, dim=-1)  # descending
    probs = (top - logits.logsumexp(-1, keepdim=True)).exp()  # their share of the whole distribution
    if k < logits.shape[-1] and not bool((probs.sum(-1) >= top_p).all()):
        top, ids = torch.sort(logits, dim=-1, descending=True)
        probs = top.softmax(-1)
    likelier = probs.cumsum(-1) - probs
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, ids, likelier < top_p)


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


def row_rng(seed: int, prompt: int, sample: int) -> np.random.Generator:
    """The generator of one (prompt, sample) row, its seed mixed from (seed, prompt, sample): a row draws the
    same numbers whichever slot, step or process runs it."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, prompt, sample])))


def next_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: list[float] | None) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) token ids: argmax when greedy, else inverse-CDF draws from the filtered
    distribution, row b at its own uniform `uniforms[b]` in [0, 1) (so a row's token depends on its own
    generator only, not on the rows beside it). Drawn a chunk of rows at a time (`chunks.chunk_rows`): the
    filter and the float64 CDF make several (rows, V) tensors, 230 MB a step for 128 rows at once, page-faulted
    in afresh on a CPU; every step is row by row, so the chunks give the same tokens."""
    if params.temperature == 0:
        return logits.argmax(-1)
    rows = chunk_rows(32 * logits.shape[-1], logits.device)  # about 32 bytes per row and vocabulary entry
    return torch.cat([_draw(logits[i:i + rows], params, uniforms[i:i + rows])
                      for i in range(0, logits.shape[0], rows)])


def _draw(logits: torch.Tensor, params: SamplingParams, uniforms: list[float]) -> torch.Tensor:
    """`next_tokens` of a chunk of rows when sampling."""
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.tensor(uniforms, dtype=torch.float64, device=logits.device)[:, None] * cdf[:, -1:]
    # The first token whose cumulative mass passes u: never a removed token (its mass adds nothing); the
    # clamp to the last token with mass covers u * total rounding up to the total.
    return torch.minimum(torch.searchsorted(cdf, u, right=True).squeeze(1), cdf.argmax(-1))


def completion(ids: list[int], reason: str, decode: Callable[[list[int]], str] | None,
               stop_strings: tuple[str, ...] = ()) -> Completion:
    text = decode(ids) if decode else ""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return Completion(ids, text[:min(cuts)] if cuts else text, reason)


class StopScanner:
    """Says, token by token, whether `decode(ids)` now contains a stop string, decoding only the last few tokens.

    The text is tracked as committed text (up to token `read`, kept as its last max(len(stop)) - 1 characters)
    plus the pending text after it, decoded with the tokens from `prefix` (one commit back) as context, so
    decoders that strip a leading space or merge bytes into characters decode it as they would in the whole
    completion; pending text ending in an unfinished character (U+FFFD) is rechecked, not committed, until
    the character completes. Only text that overlaps the pending part can hold a new match.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...]) -> None:
        self.decode, self.stops = decode, stop_strings
        self.keep = max(map(len, stop_strings)) - 1
        self.prefix = self.read = 0
        self.tail = ""

    def hit(self, ids: list[int]) -> bool:
        """`ids`: the whole completion so far, one token longer than at the last call."""
        before = self.decode(ids[self.prefix:self.read])
        pending = self.decode(ids[self.prefix:])[len(before):]
        window = self.tail + pending
        if any(s in window for s in self.stops):
            return True
        if pending and not pending.endswith("\ufffd"):
            self.tail = window[max(len(window) - self.keep, 0):]
            self.prefix, self.read = self.read, len(ids)
        return False


@dataclass
class _Row:
    prompt: int
    sample: int
    budget: int  # new tokens allowed
    rng: np.random.Generator | None
    scanner: StopScanner | None
    length: int = 0  # tokens in this row's cache slot
    out: list[int] = field(default_factory=list)


def kv_cache_bytes(layers: int, slots: int, kv_heads: int, head_dim: int, positions: int, elem: int) -> int:
    """Bytes of the slot cache: K and V for every layer, slot, key/value head and position."""
    return 2 * layers * slots * kv_heads * head_dim * positions * elem


def generate_rows(model: Transformer, prompts: list[list[int]], rows: list[tuple[int, int]], params: SamplingParams,
                  stop_ids: set[int], decode: Callable[[list[int]], str] | None, slots: int, seed: int,
                  on_row: Callable[[tuple[int, int], Completion], None], log: Callable[[str], None] | None = None,
                  static: bool = False) -> None:
    """Continuous batching: `rows` ((prompt, sample), in this order) run through `slots` decoding slots.

    Each step samples one token for every busy slot and feeds them in one forward over a `SlotCache`
    (per-row write index, RoPE position and mask). A finished row is handed to `on_row` and its slot
    refilled at once from the waiting rows (`_Waiting`). Nothing is padded or recomputed, and no cache row
    moves when a row finishes. Row (i, j) draws from `row_rng(seed, i, j)`, so its tokens do not depend
    on `slots`, the order or the company of `rows`. `static`: the fixed-shape decode step (`decode_step`),
    captured as a CUDA graph on CUDA.
    """
    ctx, device = model.config.max_position_embeddings, model.model.embed_tokens.weight.device
    budget = {i: min(params.max_new_tokens, ctx - len(prompts[i])) for i, _ in rows}  # never outgrow the context
    fit = min(slots, len(rows))
    slots = max(fit, MIN_ROWS)  # a spare slot where one row would run alone
    cache = _slot_cache(model, slots, max(len(prompts[i]) + budget[i] - 1 for i, _ in rows), log, slots - fit)
    logits = torch.zeros(slots, model.config.vocab_size, device=device)  # row s: slot s's next-token logits
    step = StaticStep(model, cache, logits, device.type == "cuda") if static else EagerStep(model, cache, logits)
    waiting = _Waiting(model, prompts, rows)
    busy: list[_Row | None] = [None] * slots
    while True:
        if waiting.rows:  # fill the free slots: at the start, then as soon as rows finish
            for s, (i, j) in waiting.admit([s for s in range(slots) if busy[s] is None], cache, logits):
                busy[s] = _Row(i, j, budget[i], row_rng(seed, i, j) if params.temperature else None,
                               StopScanner(decode, params.stop_strings) if params.stop_strings else None,
                               length=len(prompts[i]))
        active = [s for s in range(slots) if busy[s] is not None]
        if not active:
            break
        hi = active[-1] + 1
        uniforms = [busy[s].rng.random() if busy[s] is not None else 0.0 for s in range(hi)] \
            if params.temperature else None
        tokens = next_tokens(logits[:hi], params, uniforms).tolist()
        for s in active:
            row = busy[s]
            c = _finished(row, tokens[s], stop_ids, decode, params.stop_strings)
            if c is not None:
                busy[s] = None
                on_row((row.prompt, row.sample), c)
        if any(row is not None for row in busy):
            _feed(step, busy, tokens)


def _slot_cache(model: Transformer, slots: int, positions: int, log: Callable[[str], None] | None,
                spare: int = 0) -> SlotCache:
    """An empty cache of `slots` rows of `positions` (a row's last token is never fed), its size logged first
    (with the `spare` slots `MIN_ROWS` added, so a user who asked for one slot is not puzzled by two)."""
    cfg, weight = model.config, model.model.embed_tokens.weight
    if log is not None:
        size = kv_cache_bytes(cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim, positions, weight.dtype.itemsize)
        why = f" ({spare} spare: no decode step runs at one row)" if spare else ""
        log(f"KV cache: {slots} slots{why} x {positions} positions x {cfg.num_layers} layers = {size / 2**20:,.1f} MiB")
    return SlotCache.empty(cfg.num_layers, slots, cfg.num_kv_heads, positions, cfg.head_dim, weight.dtype,
                           weight.device)


def padded_length(n: int) -> int:
    """The length a prompt of `n` tokens is prefilled at. A function of the prompt alone, not of the group it
    happens to share a forward with: in bfloat16 a padded row's keys and logits change with the padded length
    (attention's reductions over more keys split differently: 0.5 in a logit on GSM8K), so padding each group to
    its longest member made samples depend on the slot count and the sharding."""
    return -(-n // PAD_TO) * PAD_TO


def _prefill(model: Transformer, prompts: list[list[int]], prefix: KVCache | None = None,
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(keys, values, next-token logits) of each prompt, from forwards over groups of prompts of the same
    `padded_length`, each group as large as the device's chunk budget allows (`chunks.chunk_rows`: on a CPU, 128
    prompts at once made 46 MB tensors in every layer, page-faulted in afresh; 11 prompts at a time took 8.4 s
    instead of 13.2 s). With `prefix` (the keys/values of the first `prefix.length` tokens that every prompt
    starts with), only the rest of each prompt is computed."""
    start = prefix.length if prefix is not None else 0
    weight = model.model.embed_tokens.weight
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        buckets.setdefault(padded_length(len(p) - start), []).append(i)
    out: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for L, members in sorted(buckets.items()):
        # the MLP holds about four (tokens x intermediate) tensors at once: gate, up, the activation, their product
        rows = chunk_rows(4 * L * model.config.intermediate_size * weight.dtype.itemsize, weight.device)
        for g in range(0, len(members), rows):
            group = members[g:g + rows]
            for i, kv in zip(group, _prefill_group(model, [prompts[i] for i in group], prefix, L)):
                out[i] = kv
    return [out[i] for i in range(len(prompts))]


def _prefill_group(model: Transformer, prompts: list[list[int]], prefix: KVCache | None, L: int,
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`_prefill` of one group in one forward, every prompt right-padded to `L` tokens after the prefix (causal
    attention alone hides the padding)."""
    device = model.model.embed_tokens.weight.device
    start = prefix.length if prefix is not None else 0
    rest = [p[start:] for p in prompts]
    lens = [len(p) for p in rest]
    ids = torch.tensor([p + [0] * (L - len(p)) for p in rest], device=device)
    tmp = model.new_cache(len(prompts), start + L)
    if prefix is not None:
        tmp.k[:, :, :, :start], tmp.v[:, :, :, :start] = prefix.k, prefix.v  # broadcast over the prompts
        tmp.length = start
    positions = torch.arange(start, start + L, device=device).expand(len(prompts), L)
    hidden = model.hidden_states(ids, positions, None, tmp)
    ends = hidden[torch.arange(len(prompts), device=device), torch.tensor(lens, device=device) - 1]
    # the head at MIN_ROWS rows at least, as a decode step: a lone prompt's logits must not get one-row bits
    last = model.lm_head(ends.repeat(MIN_ROWS, 1) if len(prompts) < MIN_ROWS else ends)[:len(prompts)].float()
    return [(tmp.k[:, r:r + 1, :, :start + n], tmp.v[:, r:r + 1, :, :start + n], last[r]) for r, n in enumerate(lens)]


def _shared_prefix(model: Transformer, prompts: list[list[int]]) -> KVCache | None:
    """The keys/values of the longest token prefix all `prompts` share (the chat template's system turn, say),
    computed once; at least one token of each prompt is left to prefill. None for fewer than two prompts."""
    if len(prompts) < 2:
        return None
    n = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)
    if n < 1:
        return None
    cache = model.new_cache(1, n)
    model.hidden_states(torch.tensor([prompts[0][:n]], device=cache.k.device), cache=cache)
    return cache


class _Waiting:
    """The rows waiting for a slot, and their prompts' prefills: each prompt is prefilled once for all its
    samples, and a prompt whose samples do not all fit yet keeps its prefill until they do."""

    def __init__(self, model: Transformer, prompts: list[list[int]], rows: list[tuple[int, int]]) -> None:
        self.model, self.prompts, self.rows = model, prompts, list(rows)
        self.left = Counter(i for i, _ in rows)  # prompt -> its samples still waiting
        self.stash: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # prompt -> (k, v, logits)
        self.prefix = _shared_prefix(model, prompts)  # of every prompt, not just these rows: the same in each shard

    def admit(self, free: list[int], cache: SlotCache, logits: torch.Tensor) -> list[tuple[int, tuple[int, int]]]:
        """Moves the next rows into the `free` slots (their prompt's keys/values into `cache`, its next-token
        logits into `logits`), the new prompts among them prefilled together; returns (slot, row) pairs."""
        placed = list(zip(free, self.rows))
        del self.rows[:len(placed)]
        new = list(dict.fromkeys(i for _, (i, _) in placed if i not in self.stash))  # in the order they wait
        if new:
            self.stash.update(zip(new, _prefill(self.model, [self.prompts[i] for i in new], self.prefix)))
        by_prompt: dict[int, list[int]] = {}
        for s, (i, _) in placed:
            by_prompt.setdefault(i, []).append(s)
        for i, ss in by_prompt.items():
            k, v, lg = self.stash[i]
            idx = torch.tensor(ss, device=logits.device)
            cache.put(idx, k, v)  # one prefill, copied into every slot of its samples
            logits[idx] = lg
            self.left[i] -= len(ss)
            if not self.left[i]:
                del self.stash[i]
            elif i in new:  # samples still wait: keep this prompt's prefill, not the whole prefill batch
                self.stash[i] = (k.clone(), v.clone(), lg.clone())
        return placed


def _finished(row: _Row, tok: int, stop_ids: set[int], decode: Callable[[list[int]], str] | None,
              stop_strings: tuple[str, ...]) -> Completion | None:
    """The row's completion if `tok` ends it (a stop id, a stop string or the budget), else None; every token
    but a stop id joins the row's output."""
    if tok in stop_ids:
        return completion(row.out, "stop", decode)
    row.out.append(tok)
    if row.scanner is not None and row.scanner.hit(row.out):
        return completion(row.out, "stop", decode, stop_strings)
    if len(row.out) == row.budget:
        return completion(row.out, "length", decode)
    return None


def _feed(step: EagerStep | StaticStep, busy: list[_Row | None], tokens: list[int]) -> None:
    """One forward: every busy row's last token, at its own slot and position (a free slot below the last busy
    one, or up to `MIN_ROWS`, is fed token 0 at position 0); the new next-token logits go into the step's
    `logits`."""
    hi = max(max(s for s, row in enumerate(busy) if row is not None) + 1, MIN_ROWS)
    step([tokens[s] if busy[s] is not None else 0 for s in range(hi)],
         [busy[s].length if busy[s] is not None else 0 for s in range(hi)])
    for row in busy:
        if row is not None:
            row.length += 1


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, *, stop_ids: list[int],
             decode: Callable[[list[int]], str] | None = None, batch_size: int = 16, seed: int = 0,
             progress: bool = True, batches: Iterable[int] | None = None,
             on_batch: Callable[[list[tuple[int, int]], list[Completion]], None] | None = None,
             static: bool = False) -> list[list[Completion | None]]:
    """`params.n` completions for each prompt (token ids, no padding): result[prompt][sample].

    Runs `generate_rows` with `batch_size` decoding slots. `plan_batches` groups the rows into batches of
    `batch_size` for bookkeeping only: `batches` runs only the rows of those batch indices (the other entries
    stay None), and `on_batch(rows, completions)` sees each batch once all its rows are done. Row (i, j)'s
    sample depends only on (seed, i, j): the same for any `batch_size`, subset of batches or process.
    `static`: decode with `decode_step.StaticStep` (a CUDA graph on CUDA) instead of `EagerStep`.
    A prompt that leaves no room in the context raises UserError naming its index.
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
    results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
    rows = [row for b in todo for row in plan[b]]
    batch_of = {row: b for b in todo for row in plan[b]}
    unfinished = {b: len(plan[b]) for b in todo}
    new_tokens, start = 0, time.perf_counter()
    bar = progress_bar(total=len(rows), desc="sampling", unit="sample", enabled=progress)

    def on_row(row: tuple[int, int], c: Completion) -> None:
        nonlocal new_tokens
        results[row[0]][row[1]] = c
        new_tokens += len(c.token_ids)
        bar.update(1)
        bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.1f} new tok/s", refresh=False)
        b = batch_of[row]
        unfinished[b] -= 1
        if not unfinished[b] and on_batch is not None:
            on_batch(plan[b], [results[i][j] for i, j in plan[b]])

    if rows:
        with packed_linears(model):
            generate_rows(model, prompts, rows, params, set(stop_ids), decode, batch_size, seed, on_row,
                          log=tqdm.write if progress and not quiet() else None, static=static)
    bar.close()
    return results
