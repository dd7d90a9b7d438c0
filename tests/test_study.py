"""study.py: the pipeline once per variant, shared stages reused, the test-split results side by side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfrefine import study
from tests.helpers import make_tiny_model_dir
from tests.test_pipeline import TINY, stage_lines


def test_study_runs_each_variant_reusing_shared_stages_and_resumes(tmp_path: Path, capsys):
    model = make_tiny_model_dir(tmp_path / "model")
    config, out = tmp_path / "tiny.json", tmp_path / "study"
    config.write_text(json.dumps(TINY))
    args = ["--config", str(config), "--out", str(out), "--model", str(model), "pairs.strategy=paper,cot-vs-direct"]
    summary = study.main(args)
    printed = capsys.readouterr().out
    runs = re.findall(r"^\[(\w+)\] [\d.]+ s$", printed, re.M)
    assert runs.count("sft") == 1 and runs.count("self_refine_samples") == 1 and runs.count("dpo") == 2
    assert runs.count("eval_base_in_domain") == 1 and runs.count("eval_self_refine_in_domain") == 2
    saved = json.loads((out / "study.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert [v["settings"] for v in saved["variants"]] == [["pairs.strategy=paper"], ["pairs.strategy=cot-vs-direct"]]
    for v in saved["variants"]:
        cell = v["rows"]["self_refine"]["in_domain"]["arith"]
        assert cell["n"] == 4 and "predictions" not in cell
        assert v["comparisons"]["self_refine_vs_sft"]["out_of_domain"]["arith_ood"]["n"] == 3
    assert printed.count("| pairs.strategy=cot-vs-direct | ") == 2  # both splits
    if (out / "study.png").exists():  # matplotlib installed (the dev requirements)
        assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "plots skipped" in printed
    study.main(args)  # both run under this config and code: nothing runs again
    assert stage_lines(capsys.readouterr().out)[1] == set()


def test_study_figure_has_a_panel_per_split_and_task(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from selfrefine.plots import study_figure

    cell = {"n": 10, "accuracy": 0.5, "ci95": [0.2, 0.8]}
    rows = {row: {"in_domain": {"arith": cell}, "out_of_domain": {"arith_ood": cell, "gsm8k": cell}}
            for row in ("sft", "self_refine")}
    variants = [{"settings": [f"train.size={n}", "sample.size=400"], "rows": rows} for n in (16, 32, 64)]
    fig = study_figure(variants, tmp_path / "s.png")
    assert len(fig.axes) == 3 and all(len(ax.lines) >= 2 for ax in fig.axes)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    joined = {bars.lines[0].get_linestyle() for ax in fig.axes for bars in ax.containers}  # the data lines
    assert joined == {"-"}  # a trend over the number of demonstrations


def test_study_figure_does_not_join_kinds_of_variant_with_lines(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from selfrefine.plots import study_figure

    cell = {"n": 10, "accuracy": 0.5, "ci95": [0.2, 0.8]}
    rows = {row: {"in_domain": {"arith": cell}} for row in ("sft", "self_refine")}
    variants = [{"settings": [f"pairs.strategy={s}", "dpo.beta=0.1"], "rows": rows} for s in ("paper", "cot-vs-direct")]
    fig = study_figure(variants, tmp_path / "s.png")
    assert {bars.lines[0].get_linestyle() for bars in fig.axes[0].containers} == {"None"}
