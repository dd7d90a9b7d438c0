"""The batched KV-cache sampler against plain full recomputation, hand-built distributions and
transformers' logits warpers."""

from __future__ import annotations

import pytest
import torch

from selfrefine.errors import UserError
from selfrefine.model import ModelConfig, Transformer
from selfrefine.sampling import (MIN_ROWS, TOP_P_CANDIDATES, Completion, SamplingParams, StopScanner, filter_logits,
                                 generate, generate_rows, plan_batches)

VOCAB = 32


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than nn.Linear's default: peaked logits, no near-ties in greedy
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [5, 1, 17, 9, 3, 12, 30, 2, 8, 8, 21, 4, 6, 15, 11, 7]


@torch.no_grad()
def greedy_by_recomputation(model: Transformer, prompt: list[int], max_new: int, stop_ids=()) -> list[int]:
    """The oracle: no cache, no padding, the whole sequence re-run for every token."""
    seq, out = list(prompt), []
    for _ in range(max_new):
        tok = int(model(torch.tensor([seq]))[0, -1].argmax())
        if tok in stop_ids:
            break
        seq.append(tok)
        out.append(tok)
    return out


def decode_letters(ids: list[int]) -> str:
    return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.mark.parametrize("stop_ids", [[], [3, 7, 11]])
def test_greedy_with_cache_matches_full_recomputation(model, stop_ids):
    prompts = prompts_of(LENGTHS)
    res = generate(model, prompts, SamplingParams(max_new_tokens=16), stop_ids=stop_ids, batch_size=5, progress=False)
    stopped = 0
    for p, (c,) in zip(prompts, res):
        ref = greedy_by_recomputation(model, p, 16, stop_ids)
        assert c.token_ids == ref
        assert c.finish_reason == ("length" if len(ref) == 16 else "stop")
        stopped += c.finish_reason == "stop"
    if stop_ids:
        assert 3 <= stopped <= 13  # rows left the batch at different steps: compaction was exercised


def test_prompt_in_mixed_batch_equals_prompt_alone(model):
    prompts = prompts_of(LENGTHS)
    params = SamplingParams(max_new_tokens=12)
    batched = generate(model, prompts, params, stop_ids=[5], batch_size=16, progress=False)
    for i in (1, 6, 10):
        (alone,), = generate(model, [prompts[i]], params, stop_ids=[5], progress=False)
        assert batched[i][0] == alone


def test_positions_and_masks_per_slot(model, monkeypatch):
    """RoPE is shift-invariant, so outputs cannot show wrong positions; they matter for the context limit."""
    calls = []
    inner = model.hidden_states

    def spy(ids, positions=None, key_mask=None, cache=None):
        calls.append((ids.clone(), positions.clone(), None if key_mask is None else key_mask.clone()))
        return inner(ids, positions, key_mask, cache)

    monkeypatch.setattr(model, "hidden_states", spy)
    prompts = prompts_of([2, 4])
    generate(model, prompts, SamplingParams(max_new_tokens=3), stop_ids=[], progress=False)
    (ids0, pos0, mask0), (_, pos1, mask1), (_, pos2, mask2) = calls
    # One prefill, both prompts right-padded to PAD_TO tokens and plainly causal (no mask), in the order they wait:
    # the plan puts the longer prompt first, in slot 0.
    assert ids0.tolist() == [prompts[1] + [0] * 4, prompts[0] + [0] * 6] and mask0 is None
    assert pos0.tolist() == [list(range(8))] * 2
    # Decode steps: each slot at its own position, seeing its own keys only, over the whole cache (4 + 3 - 1 positions).
    assert pos1.tolist() == [[4], [2]] and pos2.tolist() == [[5], [3]]
    assert mask1[:, 0, 0].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    assert mask2[:, 0, 0].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


def test_plan_batches_sorted_longest_first_with_n_rows_per_prompt():
    plan = plan_batches([2, 5, 3, 5], n=2, batch_size=3)
    assert plan == [[(1, 0), (1, 1), (3, 0)], [(3, 1), (2, 0), (2, 1)], [(0, 0), (0, 1)]]


def test_seeds_and_subsets_of_batches(model):
    prompts = prompts_of(LENGTHS[:6])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.95, n=3)
    kw = dict(stop_ids=[3], batch_size=4, progress=False)
    seen = []
    a = generate(model, prompts, params, seed=7, on_batch=lambda rows, cs: seen.append((rows, cs)), **kw)
    assert generate(model, prompts, params, seed=7, **kw) == a
    b = generate(model, prompts, params, seed=8, **kw)
    assert [c.token_ids for r in a for c in r] != [c.token_ids for r in b for c in r]
    # n samples of one prompt differ (each row draws its own tokens).
    assert len({tuple(c.token_ids) for c in a[0]}) > 1
    # Running batches 1 and 3 alone reproduces exactly those rows; the rest stay None.
    plan = plan_batches([len(p) for p in prompts], 3, 4)
    part = generate(model, prompts, params, seed=7, batches=[3, 1], **kw)
    ran = {row for b_ in (1, 3) for row in plan[b_]}
    for i in range(len(prompts)):
        for j in range(3):
            assert part[i][j] == (a[i][j] if (i, j) in ran else None)
    assert sorted(rows for rows, _ in seen) == sorted(plan)  # each batch once, when its last row is done
    assert all(a[i][j] == c for rows, cs in seen for (i, j), c in zip(rows, cs))
    with pytest.raises(UserError, match="batch index 5 out of range"):
        generate(model, prompts, params, batches=[5], **kw)


def test_first_token_follows_the_filtered_distribution(model):
    """4000 samples of one token: empirical frequencies within 4.5 sigma of softmax(filter(logits))."""
    prompt = prompts_of([6])[0]
    n, params = 4000, SamplingParams(max_new_tokens=1, temperature=0.7, top_k=8, n=4000)
    res = generate(model, [prompt], params, stop_ids=[], batch_size=n, progress=False)
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in res[0]]), minlength=VOCAB).double()
    with torch.no_grad():
        probs = filter_logits(model(torch.tensor([prompt]))[0, -1], 0.7, 8, 1.0).softmax(-1).double()
    assert counts[probs == 0].sum() == 0
    sigma = (n * probs * (1 - probs)).sqrt().clamp(min=1.0)
    assert ((counts - n * probs).abs() <= 4.5 * sigma).all(), (counts, n * probs)


def test_filter_logits_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(filter_logits(x, 0.5, 0, 1.0), torch.tensor([[2.0, 4.0, 6.0]]))
    assert torch.equal(filter_logits(x, 0.0, 0, 1.0), x)  # greedy: the caller takes argmax of unscaled logits
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    kept = filter_logits(logits, 1.0, 7, 1.0).isfinite()
    assert (kept.sum(-1) == 7).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(7).indices, True))
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    for p, expect in [(0.4, [1]), (0.75, [1, 3]), (0.85, [1, 2, 3]), (0.99, [0, 1, 2, 3]), (1e-6, [1])]:
        kept = filter_logits(probs.log(), 1.0, 0, p).isfinite()[0]
        assert kept.nonzero().flatten().tolist() == expect, p


@pytest.mark.parametrize("vocab,scale,peak", [(100, 3.0, 0.0), (2000, 0.5, 0.0), (2000, 3.0, 12.0)])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 10, 0.9), (1.3, 0, 0.5), (1.0, 3, 1.0), (0.5, 40, 0.3),
                                                     (0.8, 0, 0.95), (1.0, 600, 0.99)])
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p, vocab, scale, peak, monkeypatch):
    """Flat logits over a large vocabulary need the full sort; peaked ones (a few dozen likely tokens, as a trained
    model's) are decided among the top-p candidates alone, without sorting: the same kept tokens either way."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = scale * torch.randn(8, vocab, generator=torch.Generator().manual_seed(1))
    logits[:, :40] += peak
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = warpers(torch.zeros(8, 1, dtype=torch.long), logits.clone())
    sorts = []
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or SORT(*a, **k))
    torch.testing.assert_close(filter_logits(logits, temperature, top_k, top_p), expected, rtol=0, atol=0)
    if top_p < 1 and vocab > TOP_P_CANDIDATES:  # sorted only when the candidates hold less than p in some row
        warped = LogitsProcessorList(warpers[:-1])(torch.zeros(8, 1, dtype=torch.long), logits.clone())
        held = warped.softmax(-1).topk(TOP_P_CANDIDATES).values.sum(-1)
        assert len(sorts) == int(bool((held < top_p).any()))
        assert len(sorts) == int(not peak and not 0 < top_k <= TOP_P_CANDIDATES)  # both cases occur here


SORT = torch.sort


def test_stop_strings_stop_ids_and_max_new_tokens(model):
    prompts = prompts_of([4, 9, 13])
    free = generate(model, prompts, SamplingParams(max_new_tokens=20), stop_ids=[], decode=decode_letters,
                    progress=False)
    for (c,) in free:
        assert len(c.token_ids) == 20 and c.finish_reason == "length" and c.text == decode_letters(c.token_ids)
    ref = free[1][0].token_ids
    stop = decode_letters(ref[5:7])  # a two-letter string that occurs in prompt 1's continuation
    first = decode_letters(ref).find(stop)
    res = generate(model, prompts, SamplingParams(max_new_tokens=20, stop_strings=("zzzz", stop)), stop_ids=[],
                   decode=decode_letters, progress=False)
    c = res[1][0]
    assert (c.finish_reason, c.text, c.token_ids) == ("stop", decode_letters(ref)[:first], ref[:first + 2])
    # A stop id ends the row and is not part of the completion.
    sid = free[2][0].token_ids[4]
    c = generate(model, [prompts[2]], SamplingParams(max_new_tokens=20), stop_ids=[sid], decode=decode_letters,
                 progress=False)[0][0]
    cut = free[2][0].token_ids.index(sid)
    assert (c.finish_reason, c.token_ids, c.text) == ("stop", ref_ids := free[2][0].token_ids[:cut],
                                                      decode_letters(ref_ids))
    with pytest.raises(ValueError, match="decode"):
        generate(model, prompts, SamplingParams(stop_strings=("a",)), stop_ids=[], progress=False)


def test_context_limit(model):
    ctx = model.config.max_position_embeddings
    prompts = prompts_of([ctx - 3, 5])
    res = generate(model, prompts, SamplingParams(max_new_tokens=10), stop_ids=[], progress=False)
    assert len(res[0][0].token_ids) == 3 and res[0][0].finish_reason == "length"  # prompt + new = context
    assert res[0][0].token_ids == greedy_by_recomputation(model, prompts[0], 3)
    assert len(res[1][0].token_ids) == 10
    with pytest.raises(UserError, match="prompt 1 has 64 tokens"):
        generate(model, prompts_of([3, ctx]), SamplingParams(), stop_ids=[], progress=False)
    with pytest.raises(UserError, match="prompt 0 is empty"):
        generate(model, [[]], SamplingParams(), stop_ids=[], progress=False)
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_packaged_smollm2_greedy_matches_recomputation(smollm2_dir):
    from selfrefine.checkpoint import load_model
    from selfrefine.tokenizer import Tokenizer

    model, tok = load_model(smollm2_dir).eval(), Tokenizer.from_dir(smollm2_dir)
    questions = ["What is 7 times 8?", "Name a primary colour.",
                 "If I have 3 apples and eat one, how many are left? Think step by step.", "Hi"]
    prompts = [tok.encode_chat(q) for q in questions]
    res = generate(model, prompts, SamplingParams(max_new_tokens=16), stop_ids=tok.stop_ids, decode=tok.decode,
                   batch_size=4, progress=False)
    for p, (c,) in zip(prompts, res):
        ref = greedy_by_recomputation(model, p, 16, tok.stop_ids)
        assert c.token_ids == ref
        assert c.text == tok.decode(ref) and c.text.strip()


# ---- continuous batching: slots, shared prefill, per-row generators, incremental stop strings ----------------

@torch.no_grad()
def reference(model: Transformer, prompt: list[int], max_new: int, stop_ids=(), decode=None, stops=()) -> Completion:
    """The old sampler's rules on full recomputation: a stop id ends the row (not kept); after each kept token the
    WHOLE completion is re-decoded and searched for the stop strings; the text is cut before the first one."""
    seq, out = list(prompt), []
    for _ in range(min(max_new, model.config.max_position_embeddings - len(prompt))):
        tok = int(model(torch.tensor([seq]))[0, -1].argmax())
        if tok in stop_ids:
            return Completion(out, decode(out) if decode else "", "stop")
        seq.append(tok)
        out.append(tok)
        if stops and any(s in decode(out) for s in stops):
            text = decode(out)
            return Completion(out, text[:min(i for i in (text.find(s) for s in stops) if i >= 0)], "stop")
    return Completion(out, decode(out) if decode else "", "length")


@pytest.mark.parametrize("slots", [1, 3, 64])
@pytest.mark.parametrize("stop_ids,with_strings", [([], False), ([3, 7, 11], False), ([], True), ([3, 7], True)])
def test_greedy_continuous_batching_matches_recomputation(model, slots, stop_ids, with_strings):
    prompts = prompts_of(LENGTHS)
    stops = ()
    if with_strings:  # two-letter strings from three prompts' free continuations: rows stop at different steps
        free = [reference(model, prompts[i], 16) for i in (0, 2, 5)]
        stops = tuple(decode_letters(c.token_ids[k:k + 2]) for c, k in zip(free, (3, 6, 9)))
    params = SamplingParams(max_new_tokens=16, n=2, stop_strings=stops)
    res = generate(model, prompts, params, stop_ids=stop_ids, decode=decode_letters, batch_size=slots, progress=False)
    lengths = set()
    for p, cs in zip(prompts, res):
        ref = reference(model, p, 16, stop_ids, decode_letters, stops)
        assert cs == [ref, ref]
        lengths.add(len(ref.token_ids))
    if stop_ids or stops:
        assert len(lengths) >= 4  # rows finished at different steps: slots were refilled mid-run


@pytest.mark.parametrize("slots", [4, 64])
def test_sampled_rows_do_not_depend_on_slot_count(model, slots):
    prompts = prompts_of(LENGTHS[:7])
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95, n=3, stop_strings=("ab",))
    kw = dict(stop_ids=[3], decode=decode_letters, seed=5, progress=False)
    one = generate(model, prompts, params, batch_size=1, **kw)
    assert generate(model, prompts, params, batch_size=slots, **kw) == one
    assert len({len(c.token_ids) for r in one for c in r}) > 2 and len({tuple(c.token_ids) for c in one[0]}) > 1


def test_a_lone_prompt_never_runs_a_one_row_product(model, monkeypatch):
    """Its prefill's head and its decode steps run at `MIN_ROWS` rows at least, as in any company: some one-row
    products round differently from many-row ones (oneDNN, bfloat16), which made samples depend on the slot count."""
    heads, steps = [], []
    head, inner = model.lm_head.forward, model.hidden_states

    def spy_head(x):
        heads.append(x.shape[0])
        return head(x)

    def spy(ids, positions=None, key_mask=None, cache=None):
        if ids.shape[1] == 1:
            steps.append(ids.shape[0])
        return inner(ids, positions, key_mask, cache)

    monkeypatch.setattr(model.lm_head, "forward", spy_head)
    monkeypatch.setattr(model, "hidden_states", spy)
    out = generate(model, prompts_of([5]), SamplingParams(max_new_tokens=4), stop_ids=[], batch_size=1,
                   progress=False)
    assert len(out[0][0].token_ids) == 4 and len(steps) == 3
    assert heads == [MIN_ROWS] and steps == [MIN_ROWS] * 3


@torch.inference_mode()
def test_packaged_smollm2_bf16_samples_do_not_depend_on_slot_count(smollm2_dir):
    """In bfloat16 rounding shows any dependence on the company a row keeps (its prefill group, how many rows
    decode with it): the packaged model's greedy and sampled rows for 10 arith questions, the same at 1, 3 and 32
    slots. (Prefill groups padded to their longest member, and rows decoding alone, changed about half the sampled
    rows of 24 GSM8K questions between 1 or 3 slots and 32.)"""
    from selfrefine.checkpoint import load_model
    from selfrefine.tasks import get_task, render_prompt
    from selfrefine.tokenizer import Tokenizer

    model, tok = load_model(smollm2_dir, torch.bfloat16).eval(), Tokenizer.from_dir(smollm2_dir)
    prompts = [tok.encode_chat(render_prompt(e, "math", "cot")) for e in get_task("arith").load(split="test", limit=10)]
    assert len({len(p) for p in prompts}) > 4
    for params in (SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, temperature=0.8, n=2)):
        runs = [[[c.token_ids for c in row] for row in generate(model, prompts, params, stop_ids=tok.stop_ids,
                                                                  batch_size=slots, seed=2, progress=False)]
                for slots in (1, 3, 32)]
        assert runs[0] == runs[1] == runs[2]


def test_shared_prefill_equals_separate_prefills(model, monkeypatch):
    """n samples of a prompt: one prefill (kept while its samples wait for slots), the same samples as
    each (prompt, sample) row run alone with its own prefill."""
    prompts = prompts_of([7, 3, 12])
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=10, n=5)
    prefilled = []
    inner = model.hidden_states

    def spy(ids, positions=None, key_mask=None, cache=None):
        if key_mask is None:  # a prefill
            prefilled.append(ids.shape[0])
        return inner(ids, positions, key_mask, cache)

    monkeypatch.setattr(model, "hidden_states", spy)
    for slots in (2, 7, 64):
        prefilled.clear()
        shared = generate(model, prompts, params, stop_ids=[4], batch_size=slots, seed=3, progress=False)
        assert sum(prefilled) == len(prompts)  # every prompt prefilled exactly once
        for i in range(len(prompts)):
            for j in range(params.n):
                alone = {}
                with torch.inference_mode():
                    generate_rows(model, prompts, [(i, j)], params, {4}, None, 1, 3, alone.__setitem__)
                assert alone == {(i, j): shared[i][j]}
    assert len({tuple(c.token_ids) for c in shared[0]}) > 1


def test_common_prompt_prefix_prefilled_once(model, monkeypatch):
    """Prompts that share a token prefix (a chat template's system turn): the prefix runs once, each prompt's
    prefill starts after it, and the greedy rows equal full recomputation, at any slot count and when a single
    row runs alone (the prefix is taken over all the prompts, so a shard computes the same one)."""
    head = prompts_of([6], seed=7)[0]
    prompts = [head + tail for tail in prompts_of([1, 5, 9, 2, 14, 3], seed=8)]
    widths = []
    inner = model.hidden_states

    def spy(ids, positions=None, key_mask=None, cache=None):
        if key_mask is None:
            widths.append((ids.shape[0], ids.shape[1], int(positions[0, 0]) if positions is not None else 0))
        return inner(ids, positions, key_mask, cache)

    monkeypatch.setattr(model, "hidden_states", spy)
    refs = [reference(model, p, 10, [3]) for p in prompts]
    for slots in (2, 64):
        widths.clear()
        res = generate(model, prompts, SamplingParams(max_new_tokens=10), stop_ids=[3], batch_size=slots,
                       progress=False)
        assert [c for (c,) in res] == refs
        assert widths[0] == (1, len(head), 0)  # the prefix, once
        assert all(start == len(head) for _, _, start in widths[1:]) and sum(b for b, _, _ in widths[1:]) == 6
    alone = {}
    with torch.inference_mode():
        generate_rows(model, prompts, [(4, 0)], SamplingParams(max_new_tokens=10), {3}, None, 1, 0,
                      alone.__setitem__)
    assert alone == {(4, 0): refs[4]}


def test_stop_scanner_matches_full_decoding():
    """Byte-level BPE with random ids (partial UTF-8 bytes included): the scanner fires at the same token as
    searching the whole re-decoded completion, for stop strings taken from the decoded text."""
    from tokenizers import Tokenizer

    from helpers import tiny_tokenizer_json

    tok = Tokenizer.from_str(tiny_tokenizer_json())

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    g = torch.Generator().manual_seed(0)
    V, checked = tok.get_vocab_size(), 0
    byte_ids = [tok.token_to_id(c) for c in "ÃĤ"]  # bytes 0xC3 / 0xA4 of the byte-level alphabet: 'ä' = C3 A4
    for trial in range(300):
        ids = torch.randint(0, V, (40,), generator=g).tolist()
        if trial % 3 == 0:  # multi-byte characters split across tokens
            for k in range(3, 40, 7):
                ids[k:k + 2] = byte_ids
        text = decode(ids)
        a = int(torch.randint(0, max(len(text) - 4, 1), (1,), generator=g))
        stops = (text[a:a + 1 + trial % 4], "zzqq\u00e4")
        first = next((k for k in range(1, 41) if any(s in decode(ids[:k]) for s in stops)), None)
        scanner = StopScanner(decode, stops)
        got = next((k for k in range(1, 41) if scanner.hit(ids[:k])), None)
        assert got == first, (ids, stops)
        checked += first is not None
    assert checked > 250


def test_packaged_smollm2_continuous_batching_with_stop_strings(smollm2_dir):
    from selfrefine.checkpoint import load_model
    from selfrefine.tokenizer import Tokenizer

    model, tok = load_model(smollm2_dir).eval(), Tokenizer.from_dir(smollm2_dir)
    questions = ["What is 7 times 8?", "Name a primary colour.", "Hi",
                 "If I have 3 apples and eat one, how many are left? Think step by step."]
    prompts = [tok.encode_chat(q) for q in questions]
    stops = ("\n", ". ")
    params = SamplingParams(max_new_tokens=16, stop_strings=stops)
    res = generate(model, prompts, params, stop_ids=tok.stop_ids, decode=tok.decode, batch_size=2, progress=False)
    for p, (c,) in zip(prompts, res):
        assert c == reference(model, p, 16, tok.stop_ids, tok.decode, stops)
    assert any(c.finish_reason == "stop" and c.text != tok.decode(c.token_ids) for (c,) in res)  # a string hit


def test_kv_cache_size_is_logged_before_allocation(model, monkeypatch):
    """The logged size is the bytes of the cache actually allocated (K and V, every layer and slot)."""
    from selfrefine import sampling

    allocated, logged = [], []
    empty = sampling.SlotCache.empty

    def spy(*args):
        cache = empty(*args)
        allocated.append(cache.kt.nbytes + cache.v.nbytes)
        return cache

    monkeypatch.setattr(sampling.SlotCache, "empty", spy)
    prompts = prompts_of([5, 9])
    with torch.inference_mode():
        generate_rows(model, prompts, [(0, 0), (1, 0)], SamplingParams(max_new_tokens=6), set(), None, 8, 0,
                      lambda *_: None, log=logged.append)
    cfg = model.config
    expected = sampling.kv_cache_bytes(cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim, 9 + 6 - 1, 4)
    assert allocated == [expected] and logged == [
        f"KV cache: 2 slots x 14 positions x {cfg.num_layers} layers = {expected / 2**20:,.1f} MiB"]
    with torch.inference_mode():  # one slot asked: the second, MIN_ROWS's, is said to be a spare
        generate_rows(model, prompts, [(0, 0)], SamplingParams(max_new_tokens=6), set(), None, 1, 0,
                      lambda *_: None, log=logged.append)
    expected = sampling.kv_cache_bytes(cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim, 5 + 6 - 1, 4)
    assert logged[1] == (f"KV cache: 2 slots (1 spare: no decode step runs at one row) x 10 positions x "
                         f"{cfg.num_layers} layers = {expected / 2**20:,.1f} MiB")
