"""Preference pairs: each strategy on hand-built records, fallbacks, dedupe, counts, determinism, bad input."""

from __future__ import annotations

import json

import pytest

from selfrefine.errors import UserError
from selfrefine.preference import (STRATEGIES, build_pairs, format_stats, load_demos, load_pairs, load_samples,
                                   normalize_text)

COT, DIRECT = "Q{}: think step by step.", "Q{}: answer only."


def s(qid: str, kind: str, completion: str, correct: bool, n: int = 0, finish_reason: str = "stop") -> dict:
    """One sample record; kind is 'cot' or 'direct'."""
    prompt = (COT if kind == "cot" else DIRECT).format(qid)
    return {"task": "gsm8k", "id": qid, "sample": n, "prompt_type": kind, "prompt": prompt,
            "completion": completion, "finish_reason": finish_reason, "pred": "x", "gold": "x", "correct": correct}


def demo(qid: str, completion: str = "teacher reasoning. The answer is 4.") -> dict:
    return {"id": qid, "prompt": COT.format(qid), "completion": completion}


def triple(p: dict) -> tuple[str, str, str]:
    return p["chosen_source"], p["rejected_source"], p["rejected"]


@pytest.fixture
def records() -> tuple[list[dict], list[dict]]:
    samples = [
        # q1: correct CoT, wrong CoT and direct
        s("q1", "cot", "2+2=4. The answer is 4.", True), s("q1", "cot", "2+2=5. The answer is 5.", False, 1),
        s("q1", "direct", "4", True),
        # q2: no correct CoT -> teacher; only direct to reject
        s("q2", "cot", "I guess 7.", False), s("q2", "direct", "7", False),
        # q3: correct CoT and direct only
        s("q3", "cot", "3*3=9. The answer is 9.", True), s("q3", "direct", "8", False),
        # q4: nothing correct and no demonstration
        s("q4", "cot", "no idea", False),
        # q5: all correct CoT, no direct -> nothing to reject
        s("q5", "cot", "1+1=2. The answer is 2.", True),
    ]
    return samples, [demo("q1"), demo("q2"), demo("q3")]


def test_paper_strategy(records):
    pairs, stats = build_pairs(*records)
    by_id = {p["id"]: p for p in pairs}
    assert list(by_id) == ["q1", "q2", "q3"] and len(pairs) == 3
    assert by_id["q1"] == {"id": "q1", "prompt": COT.format("q1"), "chosen": "2+2=4. The answer is 4.",
                           "rejected": "2+2=5. The answer is 5.", "chosen_source": "student_cot",
                           "rejected_source": "wrong_cot"}
    # teacher fallback; the wrong CoT is preferred to the direct answer as the rejected one
    assert by_id["q2"]["chosen"] == "teacher reasoning. The answer is 4."
    assert triple(by_id["q2"]) == ("teacher", "wrong_cot", "I guess 7.")
    assert triple(by_id["q3"]) == ("student_cot", "direct", "8")
    assert stats["questions"] == 5 and stats["questions_with_pairs"] == 3 and stats["pairs"] == 3
    assert stats["chosen_source"] == {"student_cot": 2, "teacher": 1}
    assert stats["rejected_source"] == {"wrong_cot": 2, "direct": 1}
    assert stats["skipped_questions"] == {"no_chosen": 1, "no_rejected": 1, "only_identical": 0, "no_direct_prompt": 0}


def test_direct_pair_prompt_trains_the_same_answers_on_the_plain_question(records):
    """prompt_type "direct": the same chosen and rejected answers, under the question's direct prompt; a question
    without a direct sample (q4 and q5 here) has no such prompt and is skipped."""
    cot, _ = build_pairs(*records)
    direct, stats = build_pairs(*records, prompt_type="direct")
    assert [p["prompt"] for p in direct] == [DIRECT.format(p["id"]) for p in cot]
    assert [{k: v for k, v in p.items() if k != "prompt"} for p in direct] == \
        [{k: v for k, v in p.items() if k != "prompt"} for p in cot]
    assert stats["skipped_questions"]["no_direct_prompt"] == 2  # q4 and q5: no direct sample


def test_correct_direct_answer_is_rejected_under_paper():
    pairs, _ = build_pairs([s("q", "cot", "2+2=4. So 4.", True), s("q", "direct", "4", True)], [])
    assert [triple(p) for p in pairs] == [("student_cot", "direct", "4")]


def test_correct_vs_wrong_strategy(records):
    pairs, stats = build_pairs(*records, strategy="correct-vs-wrong")
    assert [(p["id"], *triple(p)) for p in pairs] == [("q1", "student_cot", "wrong_cot", "2+2=5. The answer is 5.")]
    assert stats["skipped_questions"] == {"no_chosen": 2, "no_rejected": 2, "only_identical": 0, "no_direct_prompt": 0}
    assert stats["chosen_source"]["teacher"] == 0


def test_cot_vs_direct_strategy(records):
    pairs, stats = build_pairs(*records, strategy="cot-vs-direct")
    assert [(p["id"], *triple(p)) for p in pairs] == [
        ("q1", "student_cot", "direct", "4"), ("q2", "teacher", "direct", "7"), ("q3", "student_cot", "direct", "8")]
    assert stats["rejected_source"] == {"wrong_cot": 0, "direct": 3}


def test_prompt_is_the_cot_prompt_even_from_the_demo():
    # only a direct sample: the prompt comes from the demonstration
    pairs, _ = build_pairs([s("q", "direct", "5", False)], [demo("q")])
    assert pairs[0]["prompt"] == COT.format("q") and triple(pairs[0]) == ("teacher", "direct", "5")


def test_dedupe_and_identical():
    samples = [
        s("q", "cot", "The answer is 4.", True), s("q", "cot", "the  answer is 4. ", True, 1),  # duplicate correct
        s("q", "cot", "The answer is 5.", False, 2), s("q", "cot", "THE ANSWER IS 5.", False, 3),  # duplicate wrong
        s("q", "direct", "the answer is 4.", True),  # same text as the chosen: identical pair
        s("q", "direct", "The answer is 5.", False, 1),  # same text as a wrong CoT: duplicate pair
        s("q", "cot", "   ", False, 4),  # empty
    ]
    pairs, stats = build_pairs(samples, [], pairs_per_question=10)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("The answer is 4.", "The answer is 5.")]
    assert stats["dropped"] == {"truncated": 0, "empty_completions": 1, "duplicate_completions": 2, "identical_pairs": 1,
                                "duplicate_pairs": 1}


def test_only_identical_question_is_skipped():
    samples = [s("q", "cot", "The answer is 4.", True), s("q", "direct", "the answer is 4.", True)]
    pairs, stats = build_pairs(samples, [])
    assert pairs == [] and stats["skipped_questions"]["only_identical"] == 1 and stats["questions_with_pairs"] == 0


def _many(qid: str = "q") -> list[dict]:
    return ([s(qid, "cot", f"right {i}", True, i) for i in range(3)]
            + [s(qid, "cot", f"wrong {i}", False, 3 + i) for i in range(2)]
            + [s(qid, "direct", f"direct {i}", False, i) for i in range(2)])


def test_pairs_per_question_prefers_wrong_cot_then_spreads_reuse():
    pairs, stats = build_pairs(_many(), [], pairs_per_question=4)
    keys = [(p["chosen"], p["rejected"]) for p in pairs]
    assert len(set(keys)) == 4
    # the 6 right x wrong pairs come before any direct one; the first two share no completion
    assert [p["rejected_source"] for p in pairs] == ["wrong_cot"] * 4
    assert len({keys[0][0], keys[1][0]}) == 2 and len({keys[0][1], keys[1][1]}) == 2
    assert {k[0] for k in keys[:3]} == {"right 0", "right 1", "right 2"}
    all_pairs, stats = build_pairs(_many(), [], pairs_per_question=100)
    assert len(all_pairs) == 3 * 2 + 3 * 2 and stats["rejected_source"] == {"wrong_cot": 6, "direct": 6}
    assert [p["rejected_source"] for p in all_pairs] == ["wrong_cot"] * 6 + ["direct"] * 6


def test_seeded_choice_is_deterministic_and_per_question():
    samples = _many("a") + _many("b")
    first, _ = build_pairs(samples, [], pairs_per_question=2, seed=3)
    assert first == build_pairs(samples, [], pairs_per_question=2, seed=3)[0]
    # a question's pairs do not depend on the other questions in the file
    assert [p for p in first if p["id"] == "b"] == build_pairs(_many("b"), [], pairs_per_question=2, seed=3)[0]
    picks = {tuple((p["chosen"], p["rejected"]) for p in build_pairs(samples, [], seed=k)[0]) for k in range(20)}
    assert len(picks) > 1
    # and questions of the same shape are not all given the same choice (the seed is mixed with the id)
    many = build_pairs([r for i in range(20) for r in _many(f"q{i}")], [], seed=3)[0]
    assert len({(p["chosen"], p["rejected"]) for p in many}) > 1


def test_build_pairs_bad_arguments(records):
    with pytest.raises(UserError, match="unknown pair strategy"):
        build_pairs(*records, strategy="best")
    with pytest.raises(UserError, match="pairs_per_question"):
        build_pairs(*records, pairs_per_question=0)
    with pytest.raises(UserError, match="two demonstrations"):
        build_pairs(records[0], [demo("q1"), demo("q1")])
    with pytest.raises(UserError, match="differs from the CoT prompt"):
        build_pairs(records[0], [{"id": "q1", "prompt": "other", "completion": "x"}])
    assert set(STRATEGIES) == {"paper", "correct-vs-wrong", "cot-vs-direct"}


def test_format_stats(records):
    text = format_stats(build_pairs(*records)[1])
    assert "pairs: 3 from 3/5 questions (strategy paper" in text
    assert "chosen: student_cot 2, teacher 1" in text and "rejected: wrong_cot 2, direct 1" in text
    assert "no_chosen 1" in text


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" if isinstance(r, dict) else r for r in records))
    return str(path)


def test_load_samples_and_demos(tmp_path, records):
    samples, demos = records
    assert load_samples(_write(tmp_path / "s.jsonl", samples), task="gsm8k") == samples
    assert load_samples(_write(tmp_path / "s.jsonl", samples)) == samples
    assert load_demos(_write(tmp_path / "d.jsonl", demos)) == demos


@pytest.mark.parametrize("bad, line, message", [
    ({"task": "csqa"}, 2, "task 'csqa', expected task 'gsm8k'"),
    ({"prompt_type": "few-shot"}, 2, "prompt_type"),
    ({"correct": "yes"}, 2, "'correct'"),
    ({"correct": None}, 2, "not graded"),
    ({"completion": None}, 2, "'completion' must be a string"),
    ({"id": ["q"]}, 2, "'id'"),
    ({"sample": 0, "id": "q1", "prompt_type": "cot"}, 2, "duplicate sample"),
    ({"prompt": "changed", "id": "q1", "prompt_type": "cot", "sample": 7}, 2, "different cot prompt"),
])
def test_load_samples_bad(tmp_path, bad, line, message):
    good = s("q1", "cot", "a", True)
    path = _write(tmp_path / "s.jsonl", [good, {**good, "sample": 1, "id": "q2", **bad}])
    with pytest.raises(UserError, match=message) as e:
        load_samples(path, task="gsm8k")
    assert (e.value.file, e.value.line) == (path, line)


def test_load_samples_other_task_and_missing_field(tmp_path):
    path = _write(tmp_path / "s.jsonl", [s("q1", "cot", "a", True)])
    with pytest.raises(UserError, match="task 'gsm8k', expected task 'csqa'") as e:
        load_samples(path, task="csqa")
    assert e.value.line == 1
    rec = s("q1", "cot", "a", True)
    del rec["correct"]
    with pytest.raises(UserError, match="missing field 'correct'"):
        load_samples(_write(tmp_path / "s.jsonl", [rec]))


def test_load_demos_bad(tmp_path):
    with pytest.raises(UserError, match="second demonstration") as e:
        load_demos(_write(tmp_path / "d.jsonl", [demo("q1"), demo("q2"), demo("q1")]))
    assert e.value.line == 3
    with pytest.raises(UserError, match="missing field 'completion'"):
        load_demos(_write(tmp_path / "d.jsonl", [{"id": "q", "prompt": "p"}]))


def test_load_pairs_skips_degenerate_pairs(tmp_path, records):
    pairs, _ = build_pairs(*records)
    bad = [{"id": "x", "prompt": "p", "chosen": " ", "rejected": "r"},
           {"id": "y", "prompt": "p", "chosen": "Same  text", "rejected": "same text"}]
    path = _write(tmp_path / "p.jsonl", [pairs[0], bad[0], "\n", pairs[1], bad[1], pairs[2]])
    loaded, skipped = load_pairs(path)
    assert loaded == [(1, pairs[0]), (4, pairs[1]), (6, pairs[2])]
    assert skipped == {"count": 2, "empty": [2], "identical": [5]}
    # id and sources are optional; prompt may be chat messages
    other = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    none_skipped = {"count": 0, "empty": [], "identical": []}
    assert load_pairs(_write(tmp_path / "o.jsonl", [other])) == ([(1, other)], none_skipped)
    with pytest.raises(UserError, match="'chosen' must be a string") as e:
        load_pairs(_write(tmp_path / "o.jsonl", [other, {**other, "chosen": 3}]))
    assert e.value.line == 2
    with pytest.raises(UserError, match="no usable preference pairs") as e:
        load_pairs(_write(tmp_path / "p.jsonl", bad))
    assert e.value.file == path
    with pytest.raises(UserError, match="missing field 'rejected'"):
        load_pairs(_write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c"}]))


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CHAT = [msg("system", "Be brief."), msg("user", "2+2?")]


def test_load_pairs_reads_trl_conversational_forms_as_ours(tmp_path):
    """Explicit prompt with answers as one assistant message each, and the implicit prompt (the leading messages
    chosen and rejected share): the same texts and prompt as our form."""
    forms = [{"prompt": CHAT, "chosen": "4", "rejected": "5"},
             {"id": "q", "prompt": CHAT, "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]},
             {"chosen": CHAT + [msg("assistant", "4")], "rejected": CHAT + [msg("assistant", "5")]},
             {"prompt": "2+2?", "chosen": [msg("assistant", "4")], "rejected": "5"}]
    loaded, _ = load_pairs(_write(tmp_path / "p.jsonl", forms))
    assert [(rec["prompt"], rec["chosen"], rec["rejected"]) for _, rec in loaded] == [(CHAT, "4", "5")] * 3 + [
        ("2+2?", "4", "5")]
    assert loaded[1][1]["id"] == "q"
    same = {"chosen": CHAT + [msg("assistant", "4")], "rejected": CHAT + [msg("assistant", " 4")]}
    _, skipped = load_pairs(_write(tmp_path / "p.jsonl", [forms[2], same]))
    assert skipped["identical"] == [2]  # judged on the answers' texts, as ours


@pytest.mark.parametrize("bad, message", [
    ({"chosen": "4", "rejected": "5"}, "field 'chosen' must be a list of messages .*no 'prompt' field"),
    ({"chosen": CHAT + [msg("assistant", "4")], "rejected": CHAT[1:] + [msg("assistant", "5")]},
     r"'rejected' and 'chosen' must share every message but their last \(the implicit prompt\)"),
    ({"chosen": CHAT, "rejected": CHAT + [msg("assistant", "5")]}, "'chosen' must end with an assistant turn"),
    ({"chosen": [*CHAT, msg("assistant", "4"), msg("assistant", "4")],
      "rejected": [*CHAT, msg("assistant", "4"), msg("assistant", "5")]}, "the prompt ends with an assistant message"),
    ({"prompt": CHAT, "chosen": [msg("assistant", "4"), msg("user", "?")], "rejected": "5"},
     r"field 'chosen' must be a string or a list of one assistant message .*got a list of 2 message\(s\)"),
    ({"prompt": CHAT, "chosen": "4", "rejected": [msg("user", "5")]}, "field 'rejected' must be a string or"),
    ({"prompt": [msg("user", 2)], "chosen": "4", "rejected": "5"}, "field 'prompt': each message needs string"),
])
def test_load_pairs_names_the_bad_conversational_record(tmp_path, bad, message):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, bad])
    with pytest.raises(UserError, match=message) as e:
        load_pairs(path)
    assert (e.value.file, e.value.line) == (path, 2) and str(e.value).startswith(f"{path}:2: ")


def test_load_demos_reads_trl_forms_as_ours(tmp_path):
    """A demonstration's prompt is matched to its samples' CoT prompt (a string, one user turn): TRL's forms read
    back to the same record, and a prompt of other turns is refused."""
    ours = demo("q1")
    trl = [{"id": "q1", "prompt": [msg("user", ours["prompt"])], "completion": [msg("assistant", ours["completion"])]},
           {"id": "q1", "messages": [msg("user", ours["prompt"]), msg("assistant", ours["completion"])]}]
    for rec in trl:
        assert load_demos(_write(tmp_path / "d.jsonl", [rec])) == [ours]
    path = _write(tmp_path / "d.jsonl", [ours, {"id": "q2", "prompt": CHAT, "completion": "4"}])
    with pytest.raises(UserError, match=r"prompt must be one user message .*got roles \['system', 'user'\]") as e:
        load_demos(path)
    assert (e.value.file, e.value.line) == (path, 2)


def test_normalize_text():
    assert normalize_text("  The\tAnswer\n is 4. ") == "the answer is 4."


def truncated_question() -> list[dict]:
    """A question whose only 'correct' CoT sample and one wrong one ran out of tokens (an old grader marked the
    first correct from an intermediate number), beside a finished wrong CoT and a direct answer."""
    return [s("q", "cot", "2+2=4, then 4+", True, 0, "length"), s("q", "cot", "Let me list: 1, 2, 3,", False, 1, "length"),
            s("q", "cot", "2+2=5. The answer is 5.", False, 2), s("q", "direct", "9", False)]


def test_truncated_samples_are_never_chosen_and_dropped_as_rejected():
    pairs, stats = build_pairs(truncated_question(), [demo("q")], pairs_per_question=4)
    assert {p["chosen_source"] for p in pairs} == {"teacher"}  # the cut "correct" sample is not a chosen answer
    assert sorted(p["rejected"] for p in pairs) == ["2+2=5. The answer is 5.", "9"]
    assert not any("rejected_truncated" in p for p in pairs)
    assert stats["truncated_samples"] == 2 and stats["dropped"]["truncated"] == 2 and stats["rejected_truncated"] == 0
    assert "samples cut at the token limit: 2 (0 kept as rejected, 2 dropped)" in format_stats(stats)


def test_keep_truncated_rejects_them_and_marks_the_pair():
    pairs, stats = build_pairs(truncated_question(), [demo("q")], pairs_per_question=4, keep_truncated=True)
    assert {p["chosen_source"] for p in pairs} == {"teacher"}
    cut = sorted(p["rejected"] for p in pairs if p.get("rejected_truncated"))
    assert cut == ["2+2=4, then 4+", "Let me list: 1, 2, 3,"]
    assert all(p["rejected_source"] == "wrong_cot" for p in pairs if p.get("rejected_truncated"))
    assert stats["rejected_truncated"] == 2 and stats["dropped"]["truncated"] == 0 and stats["pairs"] == 4


def test_load_samples_needs_a_known_finish_reason(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({**s("q", "cot", "x", False), "finish_reason": "eos"}) + "\n")
    with pytest.raises(UserError, match=r"s.jsonl:1: finish_reason must be 'stop' or 'length'"):
        load_samples(path)
