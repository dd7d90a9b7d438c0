"""eval.py: graded predictions (an answer counts only when stated and finished), the no-answer and truncation
rates in the report, and --compare (paired difference, Agresti-Min interval, exact McNemar p) on predictions files."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from selfrefine import answers as answering
from selfrefine.config import parser
from selfrefine.errors import UserError
from selfrefine.recipes import eval as eval_recipe
from selfrefine.sampling import Completion
from selfrefine.tasks import get_task
from selfrefine.tasks.stats import paired_comparison

from .conftest import write_jsonl

RECORD_FIELDS = {"task", "id", "prompt", "completion", "finish_reason", "pred", "answer_found", "gold", "correct"}
REPORT_FIELDS = {"task", "n", "correct", "accuracy", "ci95", "no_answer_rate", "truncation_rate", "max_new_tokens",
                 "predictions", "protocol"}


def predictions(report: dict) -> list[dict]:
    return [json.loads(line) for line in Path(report["predictions"]).read_text().splitlines()]


def run_eval(tiny_dir: Path, out: Path, *extra: str) -> dict:
    return eval_recipe.main(["--model", str(tiny_dir), "--task", "arith", "--size", "4", "--batch-size", "4",
                             "--no-progress", "--out", str(out), *extra])


def test_report_fields_and_rates_on_tiny_model(tiny_dir: Path, tmp_path: Path, capsys):
    reports = eval_recipe.main(["--model", str(tiny_dir), "--task", "arith", "--task", "arith_ood", "--size", "3",
                                "--batch-size", "4", "--max-new-tokens", "6", "--no-progress",
                                "--out", str(tmp_path / "r.json")])["results"]
    assert json.loads((tmp_path / "r.json").read_text())["results"] == reports
    for report in reports:
        assert REPORT_FIELDS <= set(report) and report["n"] == 3 and report["max_new_tokens"] == 6
        recs = predictions(report)
        assert [r["task"] for r in recs] == [report["task"]] * 3
        for r in recs:
            assert set(r) == RECORD_FIELDS and r["finish_reason"] in ("stop", "length")
            assert r["answer_found"] == (r["pred"] is not None)
            assert not r["correct"] or (r["answer_found"] and r["finish_reason"] == "stop")
        assert report["correct"] == sum(r["correct"] for r in recs)
        assert report["no_answer_rate"] == sum(not r["answer_found"] for r in recs) / 3
        assert report["truncation_rate"] == sum(r["finish_reason"] == "length" for r in recs) / 3
    printed = capsys.readouterr().out
    assert "| task | n | accuracy | 95% CI | no answer | truncated | max new tokens |" in printed
    assert printed.count("| 6 |") == 2


def test_report_protocol_names_prompt_decoding_model_and_versions(tiny_dir: Path, tmp_path: Path):
    """The protocol reproduces each prompt exactly: template + instruction render the prediction's prompt."""
    report = run_eval(tiny_dir, tmp_path / "r.json", "--prompt", "direct", "--max-new-tokens", "3", "--dtype", "float32")
    p = report["protocol"]
    assert (p["prompt_type"], p["decoding"], p["max_new_tokens"], p["model"], p["adapter"], p["dtype"]) == (
        "direct", "greedy", 3, str(tiny_dir), None, "float32")
    assert p["chat_format"] == "template" and p["stop_tokens"] == ["<|im_end|>"] and {"python", "torch"} <= set(p["versions"])
    example = get_task("arith").load(split="test", size=4)[0]
    assert predictions(report)[0]["prompt"] == p["template"].format(question=example.question,
                                                                    instruction=p["instruction"])
    assert json.loads((tmp_path / "r.json").read_text())["protocol"] == p


def test_one_new_token_truncates_and_a_truncated_completion_is_wrong(tiny_dir: Path, tmp_path: Path):
    report = run_eval(tiny_dir, tmp_path / "r.json", "--max-new-tokens", "1")
    recs = predictions(report)
    truncated = [r for r in recs if r["finish_reason"] == "length"]
    assert truncated, "a random tiny model should not stop on its very first token for every question"
    assert report["truncation_rate"] == len(truncated) / 4 and report["max_new_tokens"] == 1
    assert not any(r["correct"] for r in truncated)


def test_right_answer_cut_at_the_limit_counts_wrong(tiny_dir: Path, tmp_path: Path, monkeypatch):
    """Scripted completions: the right answer finished, the right answer cut off, no answer finished, no answer
    cut off -> accuracy 1/4, no-answer rate 1/2, truncation rate 1/2; the cut-off answer's pred is still kept."""
    examples = get_task("arith").load(split="test", size=4, seed=0)
    script = [(f"So it is 3. The answer is {examples[0].gold}.", "stop"), (f"The answer is {examples[1].gold}.", "length"),
              ("I am not sure.", "stop"), ("Let's think step by", "length")]

    def fake_generate(model, ids, params, *, batches, on_batch, **kw):
        assert len(ids) == 4
        outs = [[Completion([], text, reason)] for text, reason in script]
        on_batch([(i, 0) for i in range(4)], [c for c, in outs])
        return outs

    monkeypatch.setattr(answering, "generate", fake_generate)
    report = run_eval(tiny_dir, tmp_path / "r.json")
    recs = predictions(report)
    assert [r["id"] for r in recs] == [e.id for e in examples]
    assert [r["correct"] for r in recs] == [True, False, False, False]
    assert [r["answer_found"] for r in recs] == [True, True, False, False]
    assert recs[1]["pred"] == examples[1].gold and recs[1]["finish_reason"] == "length"
    assert (report["accuracy"], report["no_answer_rate"], report["truncation_rate"]) == (0.25, 0.5, 0.5)


# ---- --compare ---------------------------------------------------------------------------------------------

def write_predictions(path: Path, task_answers: dict[str, dict[str, bool]], seed: int) -> Path:
    """Records of each task in a shuffled order (plus the extra fields eval writes, which compare ignores)."""
    records = []
    for task, answers in task_answers.items():
        items = list(answers.items())
        random.Random(seed).shuffle(items)
        records += [{"task": task, "id": q, "prompt": "p", "completion": "c", "finish_reason": "stop", "pred": None,
                     "answer_found": ok, "gold": "1", "correct": ok} for q, ok in items]
    return write_jsonl(path, records)


def test_compare_matches_questions_by_id(tmp_path: Path, capsys):
    # arith: 30 questions; A right on 0-14, B right on 5-24: both 10, A-only 5, B-only 10, n=30.
    a_arith = {f"q{i}": i < 15 for i in range(30)}
    b_arith = {f"q{i}": 5 <= i < 25 for i in range(30)}
    # gsm8k: 4 questions, identical answers.
    a_gsm = {"g1": True, "g2": False, "g3": True, "g4": False}
    path_a = write_predictions(tmp_path / "A.predictions.jsonl", {"arith": a_arith, "gsm8k": a_gsm}, seed=1)
    path_b = write_predictions(tmp_path / "B.predictions.jsonl", {"arith": b_arith, "gsm8k": dict(a_gsm)}, seed=2)
    assert [json.loads(l)["id"] for l in path_a.read_text().splitlines()] != \
           [json.loads(l)["id"] for l in path_b.read_text().splitlines()]  # matching by position would be wrong

    result = eval_recipe.main(["--compare", str(path_a), str(path_b)])
    assert [t for t, _ in result] == ["arith", "gsm8k"]
    arith, gsm = result[0][1], result[1][1]
    ids = sorted(a_arith)
    assert arith == paired_comparison([a_arith[q] for q in ids], [b_arith[q] for q in ids])
    assert (arith.n, arith.correct_a, arith.correct_b, arith.only_a, arith.only_b) == (30, 15, 20, 5, 10)
    assert (gsm.only_a, gsm.only_b, gsm.diff, gsm.p) == (0, 0, 0.0, 1.0)

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    lo, hi = arith.ci95
    p = 2 * sum(math.comb(15, i) for i in range(6)) / 2**15  # 0.3018
    assert lines[0] == (f"arith: A 50.0% -> B 66.7% (n=30), diff +16.7 points [95% CI {100 * lo:+.1f}, {100 * hi:+.1f}], "
                        f"discordant 5/10, p={p:.4f}")
    assert lines[1].startswith("gsm8k: A 50.0% -> B 50.0% (n=4), diff +0.0 points [95% CI -")
    assert all(line.rsplit(", ", 1)[1].startswith("p=") and float(line.rsplit("p=", 1)[1]) >= 0 for line in lines)


def test_compare_mismatched_ids_is_one_line_error(tmp_path: Path):
    a = write_predictions(tmp_path / "A.jsonl", {"arith": {"q1": True, "q2": False, "q3": True}}, seed=0)
    b = write_predictions(tmp_path / "B.jsonl", {"arith": {"q1": True, "q2": False, "q9": True}}, seed=0)
    with pytest.raises(UserError, match=r"B\.jsonl: task arith: question id 'q3' is missing \(it is in .*A\.jsonl\); "
                                        r"1 more ids differ$") as e:
        eval_recipe.compare_predictions(a, b)
    assert "\n" not in str(e.value)
    c = write_predictions(tmp_path / "C.jsonl", {"arith": {"q1": True, "q2": False, "q3": True, "q4": True}}, seed=0)
    with pytest.raises(UserError, match=r"C\.jsonl: task arith: question id 'q4' is not in .*A\.jsonl$"):
        eval_recipe.compare_predictions(a, c)
    d = write_predictions(tmp_path / "D.jsonl", {"gsm8k": {"q1": True, "q2": False, "q3": True}}, seed=0)
    with pytest.raises(UserError, match=r"D\.jsonl: task arith is missing"):
        eval_recipe.compare_predictions(a, d)


def test_read_predictions_bad_records_name_file_and_line(tmp_path: Path):
    good = {"task": "arith", "id": "q1", "correct": True}
    for bad, message in [({"task": "arith", "id": "q2", "correct": "yes"}, "'correct' must be true or false"),
                         ({"task": "arith", "id": 2, "correct": True}, "'id' must be a string"),
                         ({"task": "arith", "correct": True}, "missing field 'id'"),
                         ({**good}, "question id 'q1' of task arith appears twice")]:
        path = write_jsonl(tmp_path / "p.jsonl", [good, bad])
        with pytest.raises(UserError, match=f"p.jsonl:2: {message}"):
            eval_recipe.read_predictions(path)
    assert eval_recipe.read_predictions(write_jsonl(tmp_path / "ok.jsonl", [good])) == {"arith": {"q1": True}}


def test_flags_required_only_without_compare(tmp_path: Path, capsys):
    for argv in (["--task", "arith", "--out", "o.json"], ["--model", "m"], []):
        with pytest.raises(SystemExit) as e:
            eval_recipe.main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --model" in err and "--task, --out" in err
    with pytest.raises(SystemExit):
        eval_recipe.main(["--compare", "a", "b", "--model", "m"])
    assert "drop --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_recipe.main(["--compare", "a"])  # nargs=2
    help_text = parser(eval_recipe.EvalConfig, "eval.py", None).format_help()
    assert "--compare" in help_text and "A B" in help_text


def test_cuda_graphs_on_gives_the_same_predictions(tiny_dir: Path, tmp_path: Path, monkeypatch):
    """--cuda-graphs on (the fixed-shape decode step, uncaptured on this CPU) predicts what off does."""
    from selfrefine.decode_step import StaticStep

    steps = []
    forward = StaticStep.forward
    monkeypatch.setattr(StaticStep, "forward", lambda self: (steps.append(1), forward(self))[1])
    on, off = (predictions(run_eval(tiny_dir, tmp_path / f"{c}.json", "--cuda-graphs", c, "--dtype", "float32",
                                    "--max-new-tokens", "12")) for c in ("on", "off"))
    assert on == off and len(steps) == 11  # 12 tokens: 11 decode forwards, all under --cuda-graphs on
