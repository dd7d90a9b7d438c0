"""train_dpo.py on a tiny model: policy == reference at step 0, frozen reference, precomputed reference,
and a short run that separates chosen from rejected."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from selfrefine.checkpoint import load_model
from selfrefine.data import IGNORE, collate_pairs, exported, fit_pair
from selfrefine.errors import UserError
from selfrefine.lora import LoRAConfig, inject_lora
from selfrefine.preference import load_pairs
from selfrefine.recipes import dpo
from selfrefine.tokenizer import Tokenizer
from selfrefine.trainer import TrainConfig, autocast_context, held_out_loss, train

from tests.helpers import make_tiny_model_dir

from .conftest import write_jsonl


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def objective(**kw) -> dpo.Objective:
    return dpo.Objective.of(dpo.DPOConfig(model="m", out="o", pairs="p", **kw))


def encoded(tiny_dir: Path, pairs: Path):
    tok = Tokenizer.from_dir(tiny_dir)
    records, _ = load_pairs(pairs)
    examples, cut = dpo.encode_pairs(tok, records, 128, pairs)
    assert cut == {"prompt": 0, "answer": 0}
    return tok, examples


def test_step0_rewards_exactly_zero_then_separates(tiny_dir: Path, pairs: Path, tmp_path: Path):
    out = tmp_path / "run"
    dpo.main(["--model", str(tiny_dir), "--pairs", str(pairs), "--out", str(out), "--max-steps", "25",
              "--batch-size", "3", "--lr", "1e-2", "--warmup", "0", "--lora-r", "8", "--beta", "0.5"])
    m = metrics(out)
    assert m[0]["rewards/chosen"] == 0.0 and m[0]["rewards/rejected"] == 0.0 and m[0]["rewards/margin"] == 0.0
    assert m[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    late = m[-4:]
    assert sum(r["rewards/margin"] for r in late) / 4 > 1.0
    assert sum(r["rewards/accuracy"] for r in late) / 4 > 0.9
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("full", [False, True])
def test_reference_weights_stay_bit_identical(tiny_dir: Path, pairs: Path, tmp_path: Path, full: bool):
    tok, examples = encoded(tiny_dir, pairs)
    model = load_model(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = None
    if full:
        import copy
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
    else:
        inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    step = dpo.DPOStep(objective(beta=0.5), reference)
    train(model, examples, lambda b: collate_pairs(b, tok.pad_id), step,
          TrainConfig(lr=1e-2, max_steps=4, batch_size=3, warmup=0), tmp_path, torch.device("cpu"))
    frozen = reference if full else model
    params = dict(frozen.named_parameters())
    for n, p in before.items():
        assert torch.equal(params[n], p), n
    if full:  # the policy itself did move
        assert not torch.equal(dict(model.named_parameters())["model.norm.weight"], before["model.norm.weight"])


def test_ref_model_is_the_reference(tiny_dir: Path, pairs: Path, tmp_path: Path):
    """--ref-model scores the reference with its own weights: the policy's own directory gives exactly the
    adapter-off run; another model (same tokenizer) gives step-0 rewards beta * (policy - reference) != 0."""
    args = ["--model", str(tiny_dir), "--pairs", str(pairs), "--max-steps", "1", "--batch-size", "3", "--lora-r", "4"]
    dpo.main(args + ["--out", str(tmp_path / "plain")])
    dpo.main(args + ["--out", str(tmp_path / "self"), "--ref-model", str(tiny_dir)])
    timing = {"tokens_per_s", "elapsed_s"}
    scores = [{k: v for k, v in metrics(tmp_path / run)[0].items() if k not in timing} for run in ("self", "plain")]
    assert scores[0] == scores[1] and "rewards/margin" in scores[0]
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    dpo.main(args + ["--out", str(tmp_path / "other_ref"), "--ref-model", str(other)])
    first = metrics(tmp_path / "other_ref")[0]
    assert first["rewards/chosen"] != 0.0 and first["rewards/rejected"] != 0.0


def test_ref_model_with_another_tokenizer_is_refused(tiny_dir: Path, pairs: Path, tmp_path: Path):
    other = make_tiny_model_dir(tmp_path / "other")
    vocab = json.loads((other / "tokenizer.json").read_text())
    first = next(iter(vocab["model"]["vocab"]))
    vocab["model"]["vocab"][first + "x"] = vocab["model"]["vocab"].pop(first)
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(UserError, match="another tokenizer"):
        dpo.main(["--model", str(tiny_dir), "--pairs", str(pairs), "--out", str(tmp_path / "o"), "--ref-model",
                  str(other)])


def test_precomputed_reference_matches_on_the_fly(tiny_dir: Path, pairs: Path, tmp_path: Path):
    tok, examples = encoded(tiny_dir, pairs)
    model = load_model(tiny_dir)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter, so "adapter off" matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    step = dpo.DPOStep(objective(), None)
    dpo.precompute_reference(step, model, examples, partial(collate_pairs, pad_id=tok.pad_id), 4, "auto", tmp_path,
                             key="k")
    batch = collate_pairs(examples[1:4], tok.pad_id)
    cached = batch["ref_logps"]
    batch["ref_logps"] = None
    with autocast_context(torch.device("cpu"), "auto")[0]:  # as the training step scores it
        on_the_fly = step.reference_logps(model, batch)
    assert torch.allclose(cached, on_the_fly, atol=1e-5)
    policy, _ = step.logps(model, batch)  # the adapter really was switched off for the reference
    assert not torch.allclose(policy[:3], on_the_fly[:, 0], atol=1e-3)
    assert (tmp_path / dpo.REF_CACHE).exists()


def test_held_out_reference_scored_once_gives_the_same_loss(tiny_dir: Path, pairs: Path):
    """The held-out pairs' reference is scored once before training (`score_reference`); a validation pass
    then gives exactly the loss it gives scoring the reference itself."""
    tok, examples = encoded(tiny_dir, pairs)
    model = load_model(tiny_dir)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    step = dpo.DPOStep(objective(), None)
    collate = partial(collate_pairs, pad_id=tok.pad_id)
    dpo.score_reference(step, model, examples, collate, 3, "auto")  # before the policy moves
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    amp = autocast_context(torch.device("cpu"), "auto")[0]
    with torch.no_grad(), amp:
        cached = held_out_loss(model, examples, collate, step, 3)
        for p in examples:
            p.ref_logps = None
        on_the_fly = held_out_loss(model, examples, collate, step, 3)
    assert cached == on_the_fly and cached != pytest.approx(math.log(2))  # the policy did move


def test_precompute_ref_run(tiny_dir: Path, pairs: Path, tmp_path: Path):
    out = tmp_path / "run"
    dpo.main(["--model", str(tiny_dir), "--pairs", str(pairs), "--out", str(out), "--max-steps", "2",
              "--batch-size", "3", "--precompute-ref", "--merge"])
    assert metrics(out)[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "merged" / "config.json").exists() and (out / dpo.REF_CACHE).exists()


def test_bad_pairs(tiny_dir: Path, tmp_path: Path):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"},
                                             {"prompt": "q", "chosen": "", "rejected": "b"}])
    with pytest.raises(UserError, match="p.jsonl"):
        dpo.main(["--model", str(tiny_dir), "--pairs", str(bad), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--lora-dropout must be 0"):
        dpo.main(["--model", str(tiny_dir), "--pairs", str(bad), "--out", str(tmp_path / "o"), "--lora-dropout", "0.1"])


# ---- TRL's conversational forms ------------------------------------------------------------------------------

def turn(role: str, content: str) -> list[dict]:
    return [{"role": role, "content": content}]


def test_trl_conversational_pairs_encode_as_ours_and_train(tiny_dir: Path, pairs: Path, tmp_path: Path):
    """A pairs file in TRL's conversational forms (explicit prompt; implicit prompt) gives the same token ids as ours,
    and trains."""
    rows = [rec for _, rec in load_pairs(pairs)[0]]
    explicit = write_jsonl(tmp_path / "explicit.jsonl", exported(rows, ("chosen", "rejected"), "trl"))
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": turn("user", r["prompt"]) + turn("assistant", r["chosen"]),
         "rejected": turn("user", r["prompt"]) + turn("assistant", r["rejected"])} for r in rows])
    ours = encoded(tiny_dir, pairs)[1]
    assert encoded(tiny_dir, explicit)[1] == ours and encoded(tiny_dir, implicit)[1] == ours
    out = tmp_path / "run"
    dpo.main(["--model", str(tiny_dir), "--pairs", str(implicit), "--out", str(out), "--max-steps", "2",
              "--batch-size", "3", "--lora-r", "4"])
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2] and m[0]["rewards/margin"] == 0.0
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def sample_records(n: int) -> list[dict]:
    """Graded samples of `n` questions: a correct and a wrong CoT answer each, so the paper strategy pairs them."""
    return [{"task": "arith", "id": f"q{i}", "sample": j, "prompt_type": "cot", "prompt": f"What is {i} plus 1?",
             "completion": f"{i} + 1 = {i + 1 + j}. The answer is {i + 1 + j}.", "finish_reason": "stop",
             "pred": str(i + 1 + j), "gold": str(i + 1), "correct": j == 0} for i in range(n) for j in (0, 1)]


def test_built_pairs_exported_for_trl_read_back_identically(tiny_dir: Path, tmp_path: Path):
    """--export-format trl writes OUT/pairs.jsonl as chat messages; read back, the same encoded pairs as built."""
    samples = write_jsonl(tmp_path / "samples.jsonl", sample_records(3))
    out = tmp_path / "run"
    argv = ["--model", str(tiny_dir), "--samples", str(samples), "--out", str(out), "--max-steps", "1",
            "--batch-size", "2", "--export-format", "trl"]
    dpo.main(argv)
    written = [json.loads(l) for l in (out / "pairs.jsonl").read_text().splitlines()]
    assert written[0]["prompt"] == turn("user", "What is 0 plus 1?")
    assert written[0]["chosen"] == turn("assistant", "0 + 1 = 1. The answer is 1.")
    built = dpo.build_pairs_from_samples(dpo.DPOConfig(model=str(tiny_dir), samples=str(samples), out="o"))
    tok = Tokenizer.from_dir(tiny_dir)
    back, _ = load_pairs(out / "pairs.jsonl")
    assert dpo.encode_pairs(tok, back, 128, "p") == dpo.encode_pairs(tok, [(None, r) for r in built], 128, "p")
    with pytest.raises(UserError, match="--export-format is the form of the pairs built from --samples"):
        dpo.DPOConfig(model="m", out="o", pairs="p.jsonl", export_format="trl")


def test_pair_prompt_direct_builds_the_pairs_under_the_direct_prompt(tiny_dir: Path, tmp_path: Path):
    """--pair-prompt direct: the CoT samples' answers, paired under the question's direct prompt; refused with
    --pairs, whose prompts are already written."""
    records = sample_records(2)
    direct = [{**r, "prompt_type": "direct", "sample": 9, "prompt": r["prompt"] + " Answer directly.",
               "completion": "The answer is 7.", "pred": "7", "correct": False} for r in records if r["sample"] == 0]
    samples = write_jsonl(tmp_path / "samples.jsonl", records + direct)
    built = {p: dpo.build_pairs_from_samples(dpo.DPOConfig(model=str(tiny_dir), samples=str(samples), out="o",
                                                           pair_prompt=p)) for p in ("cot", "direct")}
    assert [b["prompt"] for b in built["direct"]] == [f"What is {i} plus 1? Answer directly." for i in range(2)]
    assert [(b["chosen"], b["rejected"]) for b in built["direct"]] == [(b["chosen"], b["rejected"]) for b in built["cot"]]
    with pytest.raises(UserError, match="--pair-prompt applies to the pairs built from --samples"):
        dpo.DPOConfig(model="m", out="o", pairs="p.jsonl", pair_prompt="direct")


# ---- pairs longer than --max-len ---------------------------------------------------------------------------

def test_fit_pair_cuts_prompt_start_first_then_answer_ends():
    p, c, r = list(range(100, 110)), list(range(200, 204)), list(range(300, 302))
    assert fit_pair(p, c, r, 16) == (p, c, r, False, False)  # fits: untouched
    # the prompt alone gives way: its last 8 tokens stay, both answers whole
    assert fit_pair(p, c, r, 12) == (p[2:], c, r, True, False)
    # the prompt is cut no further than max_len // 2 = 6 tokens, then the longer answer loses its end
    long_c = list(range(200, 209))
    assert fit_pair(p, long_c, r, 12) == (p[4:], long_c[:6], r, True, True)
    # a prompt shorter than max_len // 2 is never cut: the answers give way
    assert fit_pair(p[:4], long_c * 3, r, 12) == (p[:4], (long_c * 3)[:8], r, False, True)
    # a prompt longer than max_len (fatal before): its last max_len // 2 tokens stay
    huge = list(range(1000, 1050))
    assert fit_pair(huge, c, long_c, 12) == (huge[-6:], c, long_c[:6], True, True)


def test_fit_pair_invariants_over_many_lengths():
    for max_len in (1, 2, 7, 12, 33):
        for n_p in (0, 1, 5, 20, 40):
            for n_c in (1, 3, 18, 50):
                for n_r in (1, 9, 40):
                    p, c, r = list(range(n_p)), list(range(100, 100 + n_c)), list(range(200, 200 + n_r))
                    p2, c2, r2, pc, ac = fit_pair(p, c, r, max_len)
                    assert len(p2) + max(len(c2), len(r2)) <= max_len
                    assert p2 == p[len(p) - len(p2):] and c2 == c[:len(c2)] and r2 == r[:len(r2)]
                    assert len(p2) >= min(len(p), max_len // 2) and c2 and r2
                    assert pc == (len(p2) < len(p)) and ac == (len(c2) < len(c) or len(r2) < len(r))
                    if ac:  # answers are cut only once the prompt is at its floor
                        assert len(p2) == min(len(p), max_len // 2)


Q3 = "Solve the problem and give the final answer. What is 3 times 3?"  # 41 tokens with its chat template


def test_encode_pairs_fits_long_pairs_and_counts_them(tiny_dir: Path, tmp_path: Path):
    tok = Tokenizer.from_dir(tiny_dir)
    long_prompt = "What is " + " plus ".join(str(i) for i in range(40)) + "?"
    records = [(1, {"prompt": "What is 2 times 2?", "chosen": "The answer is 4.", "rejected": "The answer is 5."}),
               (2, {"prompt": long_prompt, "chosen": "The answer is 780.", "rejected": "780."}),
               (3, {"prompt": Q3, "chosen": "3 * 3 = 9. " * 20 + "The answer is 9.",
                    "rejected": "The answer is 6."})]
    max_len = 48
    examples, cut = dpo.encode_pairs(tok, records, max_len, "p.jsonl")
    assert cut == {"prompt": 2, "answer": 1}  # pair 2 (prompt), pair 3 (prompt down to 24 tokens, then the answer)
    full_p, full_c = tok.encode_prompt_completion(long_prompt, "The answer is 780.")
    assert len(full_p) > max_len  # fatal before
    for ex in examples:
        for side in (ex.chosen, ex.rejected):
            assert len(side.input_ids) <= max_len and len(side.labels) == len(side.input_ids)
        n_prompt = ex.chosen.labels.index(next(t for t in ex.chosen.labels if t != IGNORE))
        assert ex.chosen.input_ids[:n_prompt] == ex.rejected.input_ids[:n_prompt]  # one prompt for both sides
        assert ex.rejected.labels[:n_prompt] == [IGNORE] * n_prompt and ex.rejected.labels[n_prompt] != IGNORE
    two = examples[1].chosen
    n_prompt = two.labels.count(IGNORE)
    assert two.input_ids == full_p[-n_prompt:] + full_c  # the prompt's end kept, the answer whole, with its EOT
    assert n_prompt == max_len - len(full_c)
    three_p, three_c = tok.encode_prompt_completion(Q3, records[2][1]["chosen"])
    assert max_len // 2 < len(three_p) < max_len
    three = examples[2].chosen
    assert three.labels.count(IGNORE) == min(len(three_p), max_len // 2)
    assert three.input_ids[three.labels.count(IGNORE):] == three_c[:max_len - max_len // 2]


def test_truncated_sample_side_has_no_end_of_turn(tiny_dir: Path):
    tok = Tokenizer.from_dir(tiny_dir)
    rec = {"prompt": "What is 2 times 2?", "chosen": "2 * 2 = 4. The answer is 4.", "rejected": "2 * 2 = 4 and so"}
    (plain,), _ = dpo.encode_pairs(tok, [(1, rec)], 128, "p.jsonl")
    (cut,), _ = dpo.encode_pairs(tok, [(1, {**rec, "rejected_truncated": True})], 128, "p.jsonl")
    assert plain.rejected.input_ids[-1] == tok.eot_id and plain.chosen.input_ids[-1] == tok.eot_id
    assert cut.rejected.input_ids == plain.rejected.input_ids[:-1] and cut.rejected.labels == plain.rejected.labels[:-1]
    assert cut.chosen == plain.chosen
    (both,), _ = dpo.encode_pairs(tok, [(1, {**rec, "chosen_truncated": True, "rejected_truncated": True})], 128, "p")
    assert both.chosen.input_ids == plain.chosen.input_ids[:-1] and both.rejected == cut.rejected


def test_long_pairs_train_with_a_warning(tiny_dir: Path, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is " + " plus ".join(str(i) for i in range(40)) + "?", "chosen": "The answer is 780.",
         "rejected": "The answer is 7."},
        {"prompt": Q3, "chosen": "3 * 3 = 9. " * 30 + "The answer is 9.", "rejected": "6."}])
    dpo.main(["--model", str(tiny_dir), "--pairs", str(data), "--out", str(tmp_path / "o"), "--max-len", "48",
              "--max-steps", "1", "--batch-size", "2"])
    assert "warning: 2 pair(s) had their prompt cut from the start and 1 pair(s) an answer cut" in capsys.readouterr().out


# ---- the reference cache is keyed by everything that sets its numbers ------------------------------------

def test_reference_cache_recomputed_when_scoring_changes(tiny_dir: Path, pairs: Path, tmp_path: Path, monkeypatch):
    computed = []
    real = dpo.DPOStep.reference_logps

    def counting(self, model, batch):
        if batch["ref_logps"] is None:
            computed.append(batch["input_ids"].shape[0] // (1 if "score_at" in batch else 2))  # pairs
        return real(self, model, batch)

    monkeypatch.setattr(dpo.DPOStep, "reference_logps", counting)
    out = tmp_path / "run"
    base = ["--model", str(tiny_dir), "--pairs", str(pairs), "--out", str(out), "--batch-size", "3",
            "--precompute-ref", "--lora-r", "4"]

    def run(steps: int, *extra: str) -> tuple[int, list[dict]]:
        computed.clear()
        more = ["--resume", "--allow-config-change"] if (out / "run.json").exists() else []
        dpo.main([*base, "--max-steps", str(steps), *more, *extra])
        return sum(computed), [json.loads(l) for l in (out / dpo.REF_CACHE).read_text().splitlines()]

    n, first = run(1)
    assert n == 6 and len({r["key"] for r in first}) == 1
    n, again = run(2)  # same scoring, more steps: reused
    assert n == 0 and again == first
    n, longer = run(3, "--max-len", "100")  # nothing is cut at 100 either, but the key cannot know that
    assert n == 6 and longer[0]["key"] != first[0]["key"]
    n, averaged = run(4, "--max-len", "100", "--average-logps")
    assert n == 6 and averaged[0]["key"] not in (first[0]["key"], longer[0]["key"])
    assert all(abs(a["chosen"]) < abs(s["chosen"]) for a, s in zip(averaged, longer))  # means, not sums


def test_held_out_pairs_validated_and_the_lowest_kept(tiny_dir: Path, pairs: Path, tmp_path: Path, capsys):
    """--val-fraction holds pairs out of training; their DPO loss is logged every --eval-every steps and the adapter
    saved is that of the step with the lowest one (the paper's stage-2 rule)."""
    out = tmp_path / "run"
    last = dpo.main(["--model", str(tiny_dir), "--pairs", str(pairs), "--out", str(out), "--max-steps", "4",
                     "--batch-size", "2", "--lr", "5e-2", "--warmup", "0", "--lora-r", "4", "--val-fraction", "0.25",
                     "--eval-every", "2", "--precompute-ref"])
    printed = capsys.readouterr().out
    n = sum(1 for _ in pairs.open())
    assert f"DPO: {n - n // 4} train / {n // 4} val pairs" in printed
    vals = [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r]
    assert [s for s, _ in vals] == [2, 4] and all(v > 0 for _, v in vals)
    best = min(vals, key=lambda sv: sv[1])
    assert (last["best_step"], last["best_val_loss"]) == pytest.approx(best)
    assert f"keeping the weights of step {best[0]}, the lowest validation loss" in printed


def test_packed_pairs_score_and_train_as_two_padded_rows(tiny_dir: Path, pairs: Path):
    """One packed row per pair (the prompt once) gives the padded rows' log-probs and gradients (a float64 body)."""
    tok, examples = encoded(tiny_dir, pairs)
    model = load_model(tiny_dir).double()
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter, so the LoRA path carries gradient to A as well
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.double().normal_(0, 0.3)
    step = dpo.DPOStep(objective(beta=0.5), None)
    results = []
    for collate in dpo.PAIR_LAYOUTS.values():
        model.zero_grad()
        batch = collate(examples[:5], tok.pad_id)
        logps, counts = step.logps(model, batch)
        step(model, batch)[0].backward()
        results.append((logps.detach(), counts, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (packed, n_packed, g_packed), (padded, n_padded, g_padded) = results
    assert torch.equal(n_packed, n_padded) and n_packed.min() > 0
    assert torch.allclose(packed, padded, rtol=0, atol=1e-10)
    # the head's log-probs are float32 by design (`Transformer.scored_token_logps`): 1e-8 apart at gradients ~1
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(g_packed, g_padded))


def test_pair_layouts_log_the_same_run(tiny_dir: Path, pairs: Path, tmp_path: Path):
    args = ["--model", str(tiny_dir), "--pairs", str(pairs), "--max-steps", "3", "--batch-size", "3", "--lora-r", "4",
            "--lr", "1e-3", "--warmup", "0", "--precision", "float32"]
    for layout in dpo.PAIR_LAYOUTS:
        dpo.main(args + ["--out", str(tmp_path / layout), "--pair-layout", layout])
    packed, padded = (metrics(tmp_path / layout) for layout in dpo.PAIR_LAYOUTS)
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in padded]
    keys = ("loss", "logps/chosen", "logps/rejected", "rewards/margin")
    assert packed[-1]["loss"] != pytest.approx(packed[0]["loss"], abs=1e-3)  # it trained
    for a, b in zip(packed, padded):
        assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5) for k in keys), (a, b)


def test_pair_layout_auto_packs_on_a_cpu_only():
    assert dpo.resolve_pair_layout("auto", torch.device("cpu")) == "packed"
    assert dpo.resolve_pair_layout("auto", torch.device("cuda")) == "padded"
    assert dpo.resolve_pair_layout("packed", torch.device("cuda")) == "packed"
    assert dpo.resolve_pair_layout("padded", torch.device("cpu")) == "padded"
