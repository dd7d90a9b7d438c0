"""Several seeds in one report: means and spreads per cell, paired tests pooled over seeds and questions, and the
seeds' differences as one sample (the seed level)."""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import pytest

from selfrefine import flags, pipeline, seeds
from selfrefine.errors import UserError
from selfrefine.tasks.stats import mcnemar_exact_p, paired_comparison, seed_level
from tests.helpers import make_tiny_model_dir
from tests.test_pipeline import TINY


def predictions(path: Path, correct: list[bool]) -> str:
    path.write_text("".join(json.dumps({"task": "arith", "id": f"q{i}", "correct": c, "pred": "1", "gold": "1",
                                        "finish_reason": "stop", "answer_found": True}) + "\n"
                            for i, c in enumerate(correct)))
    return str(path)


def fake_report(tmp: Path, seed: int, flags: dict[str, list[bool]]) -> dict:
    rows = {row: {"in_domain": {"arith": {
        "accuracy": sum(f) / len(f), "no_answer_rate": 0.0,
        "predictions": predictions(tmp / f"{seed}.{row}.jsonl", f)}}} for row, f in flags.items()}
    diff = asdict(paired_comparison(flags["sft"], flags["self_refine"]))
    return {"rows": rows, "comparisons": {"self_refine_vs_sft": {"in_domain": {"arith": diff}}}}


def test_means_spreads_and_pooled_test(tmp_path: Path):
    a0, b0 = [True, False, False, True, False], [True, True, True, True, False]
    a1, b1 = [False, False, True, True, True], [True, False, True, True, True]
    reports = {0: fake_report(tmp_path, 0, {"sft": a0, "self_refine": b0}),
               1: fake_report(tmp_path, 1, {"sft": a1, "self_refine": b1})}
    summary = seeds.across_seeds(reports, {"self_refine_vs_sft": ("sft", "self_refine")})
    acc = summary["rows"]["self_refine"]["in_domain"]["arith"]["accuracy"]
    assert acc["values"] == [0.8, 0.8] and acc["mean"] == pytest.approx(0.8) and acc["sd"] == 0
    sft = summary["rows"]["sft"]["in_domain"]["arith"]["accuracy"]
    assert sft["mean"] == pytest.approx(0.5) and sft["sd"] == pytest.approx(statistics.stdev([0.4, 0.6]))
    pooled = summary["pooled"]["self_refine_vs_sft"]["in_domain"]["arith"]
    assert pooled["n"] == 10 and pooled["only_b"] == 3 and pooled["only_a"] == 0
    assert pooled["p"] == pytest.approx(mcnemar_exact_p(0, 3)) == pytest.approx(0.25)
    assert pooled["diff"] == pytest.approx(paired_comparison(a0 + a1, b0 + b1).diff) == pytest.approx(0.3)
    table = seeds.markdown(summary, pipeline.row_name, {"self_refine_vs_sft": ("sft", "self_refine")})
    assert "| in_domain | arith | 50.0% +- 14.1 [40.0, 60.0] | 80.0% +- 0.0 [80.0, 80.0] | +30.0" in table
    assert "p=0.2500 (n=10)" in table
    by_seed = summary["seed_level"]["self_refine_vs_sft"]["in_domain"]["arith"]
    assert by_seed["values"] == pytest.approx([0.4, 0.2])  # seed 0: +2 of 5, seed 1: +1 of 5
    assert by_seed == asdict(seed_level([0.4, 0.2]))
    lo, hi = by_seed["ci95"]
    assert f"+30.0 [{100 * lo:+.1f}, {100 * hi:+.1f}] p={seeds.format_p(by_seed['p'])} (2 seeds)" in table


def test_seed_list_flag():
    assert flags.seed_list("0,1,2") == [0, 1, 2]
    for bad, says in (("0,,1", "expected comma-separated integers"), ("a", "expected"), ("1,1", "distinct")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            flags.seed_list(bad)


def test_pipeline_runs_seeds_into_one_report(tmp_path: Path, capsys):
    model = make_tiny_model_dir(tmp_path / "model")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model), "--seeds", "0,3"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "report.json").read_text())
    assert saved["seeds"] == [0, 3]
    per_seed = {s: json.loads(Path(p).read_text()) for s, p in saved["per_seed"].items()}
    assert [r["seed"] for r in per_seed.values()] == [0, 3]
    cell = saved["rows"]["sft"]["in_domain"]["arith"]["accuracy"]
    assert cell["values"] == [r["rows"]["sft"]["in_domain"]["arith"]["accuracy"] for r in per_seed.values()]
    assert saved["pooled"]["self_refine_vs_sft"]["out_of_domain"]["arith_ood"]["n"] == 2 * 3
    assert "(pooled)" in printed and "(seeds)" in printed
    assert saved["seed_level"]["self_refine_vs_sft"]["in_domain"]["arith"]["values"] == [
        r["comparisons"]["self_refine_vs_sft"]["in_domain"]["arith"]["diff"] for r in per_seed.values()]
    # the base model is evaluated once (seed 0's run), and seed 3's report reads those predictions
    assert printed.count("[eval_base_in_domain] ...") == 1 and printed.count("[eval_sft_in_domain] ...") == 2
    assert not (out / "seed3" / "eval" / "base.in_domain.json").exists()
    assert per_seed["3"]["rows"]["base"] == per_seed["0"]["rows"]["base"]
    with pytest.raises(UserError, match="not both"):
        pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model), "--seeds", "0",
                       "--seed", "1"])
