"""Preference pairs for the self-refine DPO stage, built from the student's own samples.

Each question contributes up to `pairs_per_question` pairs (prompt = the CoT prompt text, chosen, rejected).
Completions come from four sources:
  student_cot  the student's CoT samples that reached the gold answer
  wrong_cot    the student's CoT samples that did not
  direct       the student's answers to the direct (no reasoning) prompt, right or wrong
  teacher      the teacher's demonstration (a correct CoT answer to the same CoT prompt)

Strategies (chosen sources: the first non-empty one is used; rejected sources: in order of preference):
  paper             chosen student_cot, else teacher; rejected wrong_cot, then direct.
                    This is OUR READING of the paper's text (Ranaldi & Freitas 2024): the student's
                    correct reasoning paths are preferred over its wrong ones and over answers given without
                    reasoning; where the student never got it right, the teacher's demonstration is the
                    preferred path. A direct answer is rejected even when it happens to be correct: it is
                    unreasoned, and reasoning-vs-no-reasoning is the contrast the paper draws.
  correct-vs-wrong  student_cot vs wrong_cot only (no teacher, no direct answers).
  cot-vs-direct     chosen student_cot, else teacher; rejected direct only.
With pairs_per_question > 1, pairs against the preferred rejected source are taken first, then the next
one; within that, pairs reusing a completion already paired for this question come last, and the rest is
a seeded random choice (the seed is mixed with the question id, so a question's pairs do not depend on
which other questions are in the file).

A sample that stopped at the token limit (`finish_reason` "length") is unfinished: it is never chosen (its
grade is wrong anyway), and as a rejected answer it is dropped by default, since "the student ran out of tokens"
is not the contrast the method teaches. With `keep_truncated` it may be rejected, and the pair says so
(`rejected_truncated`), so that it is encoded without the end-of-turn token the student never produced.

The pair's prompt is the CoT prompt the answers were sampled with, or (`prompt_type` "direct") the question's
direct prompt: trained on the plain question, the preferred style becomes reasoning without being asked for it
(one reading of the paper's "move the default style towards the CoT style"). A question without a direct sample
then has no direct prompt and is skipped.

Texts are compared after normalising whitespace and case: duplicate completions of one source are kept
once, a pair whose chosen and rejected are the same text is dropped, and so is a pair equal to one
already kept (the same text can be both a wrong CoT answer and a direct answer).
"""

from __future__ import annotations

import os
import random
from collections import Counter

from .data import record_turns, sft_turns
from .errors import fail
from .files import read_jsonl

STRATEGIES = ("paper", "correct-vs-wrong", "cot-vs-direct")
_SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # strategy -> (chosen, rejected) sources
    "paper": (("student_cot", "teacher"), ("wrong_cot", "direct")),
    "correct-vs-wrong": (("student_cot",), ("wrong_cot",)),
    "cot-vs-direct": (("student_cot", "teacher"), ("direct",)),
}
SAMPLE_FIELDS = ("task", "id", "sample", "prompt_type", "prompt", "completion", "finish_reason", "pred", "gold",
                 "correct")


def normalize_text(text: str) -> str:
    """The comparison key for completions: whitespace runs collapsed, case folded."""
    return " ".join(text.split()).casefold()


def _source(rec: dict) -> str:
    if rec["prompt_type"] == "direct":
        return "direct"
    if rec["prompt_type"] == "cot":
        return "student_cot" if rec["correct"] else "wrong_cot"
    raise ValueError(f"prompt_type must be 'cot' or 'direct', got {rec['prompt_type']!r}")


def _new_stats(strategy: str, pairs_per_question: int, seed: int) -> dict:
    return {
        "strategy": strategy, "pairs_per_question": pairs_per_question, "seed": seed,
        "questions": 0, "questions_with_pairs": 0, "pairs": 0,
        "chosen_source": {"student_cot": 0, "teacher": 0},
        "rejected_source": {"wrong_cot": 0, "direct": 0},
        "truncated_samples": 0, "rejected_truncated": 0,
        "skipped_questions": {"no_chosen": 0, "no_rejected": 0, "only_identical": 0, "no_direct_prompt": 0},
        "dropped": {"truncated": 0, "empty_completions": 0, "duplicate_completions": 0, "identical_pairs": 0,
                    "duplicate_pairs": 0},
    }


def _pools(recs: list[dict], demo: dict | None, keep_truncated: bool, dropped: Counter,
           cut: set[str]) -> dict[str, list[str]]:
    """Completions of one question by source, empty ones and normalised duplicates removed; truncated ones
    dropped, or (keep_truncated) kept as rejected-only with their keys added to `cut`."""
    pools: dict[str, list[str]] = {"student_cot": [], "wrong_cot": [], "direct": [], "teacher": []}
    seen: dict[str, set[str]] = {s: set() for s in pools}
    tagged = [(_source(r), r["completion"], r["finish_reason"] == "length") for r in recs]
    tagged += [("teacher", demo["completion"], False)] if demo else []
    for source, text, truncated in tagged:
        key = normalize_text(text)
        if truncated:
            if not keep_truncated:
                dropped["truncated"] += 1
                continue
            source = "wrong_cot" if source == "student_cot" else source  # never chosen
        if not key:
            dropped["empty_completions"] += 1
        elif key in seen[source]:
            dropped["duplicate_completions"] += 1
        else:
            seen[source].add(key)
            pools[source].append(text)
            if truncated:
                cut.add(key)
    return pools


def _candidates(pools: dict[str, list[str]], chosen_src: str, rejected_sources: tuple[str, ...],
                dropped: Counter) -> list[tuple[int, str, str, str, str]]:
    """Every distinct (tier, chosen_src, chosen, rejected_src, rejected) of one question; tier = rank of the
    rejected source. Pairs with the same text on both sides, or the same texts as an earlier pair, are dropped."""
    out, keys = [], set()
    for tier, rejected_src in enumerate(rejected_sources):
        for chosen in pools[chosen_src]:
            for rejected in pools[rejected_src]:
                key = (normalize_text(chosen), normalize_text(rejected))
                if key[0] == key[1]:
                    dropped["identical_pairs"] += 1
                elif key in keys:
                    dropped["duplicate_pairs"] += 1
                else:
                    keys.add(key)
                    out.append((tier, chosen_src, chosen, rejected_src, rejected))
    return out


def _choose(candidates: list[tuple[int, str, str, str, str]], k: int, rng: random.Random) -> list[tuple]:
    """Up to k candidates (tier, chosen_src, chosen, rejected_src, rejected): lowest tier first, then the
    fewest reused completions, ties broken by a seeded shuffle."""
    candidates = list(candidates)
    rng.shuffle(candidates)
    uses: Counter = Counter()
    picked = []
    while candidates and len(picked) < k:
        best = min(candidates, key=lambda c: (c[0], uses[normalize_text(c[2])] + uses[normalize_text(c[4])]))
        candidates.remove(best)
        uses.update((normalize_text(best[2]), normalize_text(best[4])))
        picked.append(best)
    return picked


def build_pairs(samples: list[dict], demos: list[dict], strategy: str = "paper", pairs_per_question: int = 1,
                seed: int = 0, keep_truncated: bool = False, prompt_type: str = "cot") -> tuple[list[dict], dict]:
    """Pair records {id, prompt, chosen, rejected, chosen_source, rejected_source} and counts of what was
    used and skipped (see the module docstring for the strategies). Questions are those in `samples`, in
    first-seen order; a demonstration whose question has no samples is not used."""
    if strategy not in _SOURCES:
        fail(f"unknown pair strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if pairs_per_question < 1:
        fail(f"pairs_per_question must be >= 1, got {pairs_per_question}")
    demo_by_id = {d["id"]: d for d in demos}
    if len(demo_by_id) != len(demos):
        fail("two demonstrations for the same question id")
    by_question: dict[object, list[dict]] = {}
    for rec in samples:
        by_question.setdefault(rec["id"], []).append(rec)

    chosen_sources, rejected_sources = _SOURCES[strategy]
    stats = _new_stats(strategy, pairs_per_question, seed)
    dropped: Counter = Counter()
    pairs = []
    for qid, recs in by_question.items():
        stats["questions"] += 1
        demo = demo_by_id.get(qid)
        cot_prompts = [r["prompt"] for r in recs if r["prompt_type"] == "cot"]
        if demo and cot_prompts and demo["prompt"].strip() != cot_prompts[0].strip():
            fail(f"question {qid!r}: the demonstration's prompt differs from the CoT prompt of its samples")
        prompt = cot_prompts[0] if cot_prompts else demo["prompt"] if demo else None
        if prompt_type == "direct":
            prompt = next((r["prompt"] for r in recs if r["prompt_type"] == "direct"), None)
            if prompt is None:
                stats["skipped_questions"]["no_direct_prompt"] += 1
                continue
        stats["truncated_samples"] += sum(r["finish_reason"] == "length" for r in recs)
        cut: set[str] = set()
        pools = _pools(recs, demo, keep_truncated, dropped, cut)
        chosen_src = next((s for s in chosen_sources if pools[s]), None)
        if chosen_src is None:
            stats["skipped_questions"]["no_chosen"] += 1
            continue
        if not any(pools[s] for s in rejected_sources):
            stats["skipped_questions"]["no_rejected"] += 1
            continue
        candidates = _candidates(pools, chosen_src, rejected_sources, dropped)
        if not candidates:
            stats["skipped_questions"]["only_identical"] += 1
            continue
        stats["questions_with_pairs"] += 1
        rng = random.Random(f"{seed}\0{qid}")
        for _, c_src, chosen, r_src, rejected in _choose(candidates, pairs_per_question, rng):
            pair = {"id": qid, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                    "chosen_source": c_src, "rejected_source": r_src}
            if normalize_text(rejected) in cut:
                pair["rejected_truncated"] = True
                stats["rejected_truncated"] += 1
            pairs.append(pair)
            stats["chosen_source"][c_src] += 1
            stats["rejected_source"][r_src] += 1
    stats["pairs"] = len(pairs)
    stats["dropped"].update(dropped)
    return pairs, stats


def format_stats(stats: dict) -> str:
    """A few lines for the terminal: how many pairs, from where, and what was skipped."""
    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items())

    return "\n".join([
        f"pairs: {stats['pairs']} from {stats['questions_with_pairs']}/{stats['questions']} questions "
        f"(strategy {stats['strategy']}, up to {stats['pairs_per_question']} per question, seed {stats['seed']})",
        f"chosen: {counts(stats['chosen_source'])}",
        f"rejected: {counts(stats['rejected_source'])}",
        f"samples cut at the token limit: {stats['truncated_samples']} "
        f"({stats['rejected_truncated']} kept as rejected, {stats['dropped']['truncated']} dropped)",
        f"questions skipped: {counts(stats['skipped_questions'])}",
        f"dropped: {counts(stats['dropped'])}",
    ])


def _check_fields(rec: dict, strings: tuple[str, ...], path: str | os.PathLike, lineno: int) -> None:
    """`id` (where present) a string or integer, `strings` strings: the pair builder hashes and compares them."""
    if "id" in rec and (isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int))):
        fail(f"field 'id' must be a string or an integer, got {rec['id']!r}", path, lineno)
    for key in strings:
        if not isinstance(rec[key], str):
            fail(f"field {key!r} must be a string, got {type(rec[key]).__name__}", path, lineno)


def load_samples(path: str | os.PathLike, task: str | None = None) -> list[dict]:
    """Sample records of one task (`task`, else the first record's); one record per (id, prompt_type,
    sample), and one prompt text per (id, prompt_type)."""
    rows = read_jsonl(path, required=SAMPLE_FIELDS)
    expected = task if task is not None else rows[0][1]["task"]
    seen: dict[tuple, int] = {}
    prompts: dict[tuple, str] = {}
    for lineno, rec in rows:
        if rec["task"] != expected:
            fail(f"sample of task {rec['task']!r}, expected task {expected!r}", path, lineno)
        _check_fields(rec, ("prompt", "completion"), path, lineno)
        if rec["prompt_type"] not in ("cot", "direct"):
            fail(f"prompt_type must be 'cot' or 'direct', got {rec['prompt_type']!r}", path, lineno)
        if rec["finish_reason"] not in ("stop", "length"):
            fail(f"finish_reason must be 'stop' or 'length', got {rec['finish_reason']!r}", path, lineno)
        if rec["correct"] is None:
            fail("sample is not graded (no gold answer, e.g. --task raw); pairs need graded samples", path, lineno)
        if not isinstance(rec["correct"], bool):
            fail(f"field 'correct' must be true or false, got {rec['correct']!r}", path, lineno)
        key = (rec["id"], rec["prompt_type"], rec["sample"])
        if key in seen:
            fail(f"duplicate sample {key} (first at line {seen[key]})", path, lineno)
        seen[key] = lineno
        if prompts.setdefault(key[:2], rec["prompt"]) != rec["prompt"]:
            fail(f"question {rec['id']!r}: a different {rec['prompt_type']} prompt than its earlier samples",
                 path, lineno)
    return [rec for _, rec in rows]


def load_demos(path: str | os.PathLike) -> list[dict]:
    """Teacher demonstrations {id, prompt, completion}, one per question id, in any form `data.sft_turns` reads. The
    prompt must be one user message: it is matched to the CoT prompt of the samples, which is one."""
    seen: dict[object, int] = {}
    demos = []
    for lineno, rec in read_jsonl(path, required=("id",)):
        _check_fields(rec, (), path, lineno)
        prompt, completion = sft_turns(rec, path, lineno)
        if len(prompt) != 1 or prompt[0]["role"] != "user":
            fail(f"a demonstration's prompt must be one user message (the question's CoT prompt), got roles "
                 f"{[m['role'] for m in prompt]}", path, lineno)
        if rec["id"] in seen:
            fail(f"second demonstration for question {rec['id']!r} (first at line {seen[rec['id']]})", path, lineno)
        seen[rec["id"]] = lineno
        rest = {k: v for k, v in rec.items() if k != "messages"}
        demos.append({**rest, "prompt": prompt[0]["content"], "completion": completion})
    return demos


def load_pairs(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], dict]:
    """Usable pairs as (line number, record), and {count, empty: [lines], identical: [lines]} of the
    skipped ones: a pair with an empty side or the same text on both sides teaches nothing and is skipped,
    not fatal; a file with no usable pair is. `id` and the sources are optional here (pairs may come from
    elsewhere). Any form `data.record_turns` reads is accepted, and the record returned in ours: `chosen` and
    `rejected` texts, `prompt` as given (a string or chat messages) or, implicit, the shared leading messages."""
    skipped: dict[str, list[int]] = {"empty": [], "identical": []}
    pairs = []
    for lineno, rec in read_jsonl(path, required=("chosen", "rejected")):
        _check_fields(rec, (), path, lineno)
        prompt, (chosen, rejected) = record_turns(rec, ("chosen", "rejected"), path, lineno,
                                                  implicit="prompt" not in rec)
        keys = normalize_text(chosen), normalize_text(rejected)
        if not all(keys):
            skipped["empty"].append(lineno)
        elif keys[0] == keys[1]:
            skipped["identical"].append(lineno)
        else:
            pairs.append((lineno, {**rec, "prompt": rec.get("prompt", prompt), "chosen": chosen,
                                   "rejected": rejected}))
    if not pairs:
        fail(f"no usable preference pairs ({len(skipped['empty'])} with an empty side, "
             f"{len(skipped['identical'])} with chosen == rejected)", path)
    return pairs, {"count": len(skipped["empty"]) + len(skipped["identical"]), **skipped}
