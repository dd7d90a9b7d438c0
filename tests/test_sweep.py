"""sweep.py: settings chosen on held-out training questions, shared stages reused, test sets refused."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from selfrefine import sweep
from selfrefine.errors import UserError
from tests.helpers import make_tiny_model_dir
from tests.test_pipeline import TINY, stage_lines

VALIDATION = {"task": "arith", "split": "train", "skip": 8, "size": 5}


def write_config(tmp_path: Path, validation=VALIDATION) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["eval"]["validation"] = validation
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def test_grid_is_every_combination_first_key_slowest():
    assert sweep.grid(["dpo.lr=1e-3,2e-3", "dpo.beta=0.1,0.5", "seed=3"]) == [
        ["dpo.lr=1e-3", "dpo.beta=0.1", "seed=3"], ["dpo.lr=1e-3", "dpo.beta=0.5", "seed=3"],
        ["dpo.lr=2e-3", "dpo.beta=0.1", "seed=3"], ["dpo.lr=2e-3", "dpo.beta=0.5", "seed=3"]]
    with pytest.raises(UserError, match="dpo.lr given twice"):
        sweep.grid(["dpo.lr=1", "dpo.lr=2"])
    with pytest.raises(UserError, match="compared on the same questions"):
        sweep.grid(["eval.in_domain.size=3,4"])


def test_each_variant_runs_with_its_own_seed_and_force_redoes_the_shared_stages_once(tmp_path: Path):
    args = sweep.config_parser("x", "", "o", "f").parse_args(["--config", str(write_config(tmp_path)), "--out",
                                                             str(tmp_path / "o"), "--force"])
    args.grid = ["seed=0,1", "dpo.lr=1e-2,2e-2"]
    _, variants, pipelines = sweep.variant_pipelines(args)
    assert [pl.seed for pl in pipelines] == [0, 0, 1, 1]
    assert [pl.stages.force for pl in pipelines] == [True, False, False, False]


def test_a_rounds_grid_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match="one sweep per number of rounds"):
        sweep.main(["--config", str(write_config(tmp_path)), "--out", str(tmp_path / "o"), "rounds=1,2"])


def test_sweep_reuses_shared_stages_measures_only_validation_and_resumes(tmp_path: Path, capsys):
    model = make_tiny_model_dir(tmp_path / "model")
    config, out = write_config(tmp_path), tmp_path / "sweep"
    args = ["--config", str(config), "--out", str(out), "--model", str(model), "dpo.lr=1e-2,3e-2", "dpo.beta=0.2"]
    summary = sweep.main(args)
    printed = capsys.readouterr().out
    runs = re.findall(r"^\[(\w+)\] [\d.]+ s$", printed, re.M)
    assert runs.count("sft") == 1 and runs.count("self_refine_samples") == 1  # shared by both variants
    assert runs.count("dpo") == 2 and runs.count("eval_self_refine_validation") == 2
    assert runs.count("eval_sft_validation") == 1 and not [r for r in runs if "domain" in r or "base" in r]
    saved = json.loads((out / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert [v["settings"] for v in saved["variants"]] == [["dpo.lr=1e-2", "dpo.beta=0.2"], ["dpo.lr=3e-2", "dpo.beta=0.2"]]
    scores = [v["rows"]["self_refine"]["arith"]["accuracy"] for v in saved["variants"]]
    assert saved["chosen"] == saved["variants"][scores.index(max(scores))]["settings"]
    for v in saved["variants"]:
        assert v["rows"]["sft"]["arith"]["n"] == 5 and v["comparisons"]["self_refine_vs_sft"]["arith"]["n"] == 5
        graded = v["answers"]["self_refine"]["arith"]
        assert len(graded) == 5 and sum(graded.values()) == round(5 * v["rows"]["self_refine"]["arith"]["accuracy"])
    chosen = saved["variants"].index(next(v for v in saved["variants"] if v["settings"] == saved["chosen"]))
    assert saved["versus_chosen"][chosen] is None and saved["versus_chosen"][1 - chosen]["arith"]["n"] == 5
    assert "runner-up (" in printed and "variant - chosen" in printed
    report = json.loads((out / "eval" / "sft.validation.json").read_text())
    assert (report["split"], report["skip"], report["n"]) == ("train", 8, 5)
    assert "(chosen)" in printed and "chosen on eval.validation (self_refine)" in printed
    sweep.main(args)  # both measured under this config and code: nothing runs
    assert stage_lines(capsys.readouterr().out)[1] == set()
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # another model file
    again = sweep.main(args)
    assert "dpo" in stage_lines(capsys.readouterr().out)[1]  # measured again, not read back
    assert [v["key"] for v in again["variants"]] != [v["key"] for v in summary["variants"]]


def graded_variant(settings: list[str], correct: list[bool]) -> dict:
    answers = {f"q{i}": c for i, c in enumerate(correct)}
    return {"settings": settings, "rows": {"self_refine": {"arith": {"accuracy": sum(correct) / len(correct)}}},
            "answers": {"self_refine": {"arith": answers}}}


def test_variants_are_compared_with_the_chosen_one_question_by_question():
    """The paired comparison matches questions by id (here stored in another order), and a lead of one question
    in twenty is called indistinguishable while a lead of twelve is not."""
    best = graded_variant(["a=1"], [True] * 14 + [False] * 6)
    close = graded_variant(["a=2"], [True] * 13 + [False] * 7)
    close["answers"]["self_refine"]["arith"] = dict(reversed(close["answers"]["self_refine"]["arith"].items()))
    far = graded_variant(["a=3"], [False] * 12 + [True] * 2 + [False] * 6)
    variants = [close, best, far]
    chosen = max(range(3), key=lambda i: sweep.score(variants[i], "self_refine"))
    versus = sweep.versus_chosen(variants, chosen, "self_refine")
    assert chosen == 1 and versus[1] is None
    assert (versus[0]["arith"]["only_a"], versus[0]["arith"]["only_b"], versus[0]["arith"]["p"]) == (1, 0, 1.0)
    assert (versus[2]["arith"]["only_a"], versus[2]["arith"]["only_b"]) == (12, 0)
    assert versus[2]["arith"]["p"] == pytest.approx(2 * 0.5 ** 12)  # exact McNemar: all 12 discordant one way
    line = sweep.runner_up_line(variants, chosen, versus, "self_refine")
    assert "runner-up (a=2)" in line and "-5.0" in line and "indistinguishable" in line
    assert "separate them" in sweep.runner_up_line([far, best], 1, sweep.versus_chosen([far, best], 1, "self_refine"),
                                                  "self_refine")
    other = graded_variant(["a=4"], [True] * 19)  # one question fewer: not the same validation questions
    with pytest.raises(ValueError, match="other validation questions"):
        sweep.versus_chosen([best, other], 0, "self_refine")


@pytest.mark.parametrize("validation, says", [
    ({"task": "arith", "split": "train", "skip": 4, "size": 5}, "shares 4 question.s. with the training questions"),
    ({"task": "arith", "split": "test", "size": 4}, "give it a split other than test"),
])
def test_validation_overlapping_training_or_test_questions_is_refused(tmp_path: Path, validation, says):
    model = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "sweep"
    with pytest.raises(UserError, match=says):
        sweep.main(["--config", str(write_config(tmp_path, validation)), "--out", str(out), "--model", str(model),
                    "dpo.lr=1e-2"])
    assert not out.exists()


def test_select_must_be_a_row(tmp_path: Path):
    with pytest.raises(UserError, match="--select self_refine_r2: not a row of variant"):
        sweep.main(["--config", str(write_config(tmp_path)), "--out", str(tmp_path / "o"), "--select",
                    "self_refine_r2", "dpo.lr=1e-2"])


def test_a_config_without_validation_is_refused(tmp_path: Path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    with pytest.raises(UserError, match="a sweep measures on eval.validation"):
        sweep.main(["--config", str(config), "--out", str(tmp_path / "o"), "dpo.lr=1e-2"])
