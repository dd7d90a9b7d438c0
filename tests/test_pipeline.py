"""The whole method wired end to end on a tiny model and a tiny config (CI's integration test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfrefine import pipeline
from selfrefine.errors import UserError
from tests.helpers import make_tiny_model_dir

TINY = {
    "seed": 0,
    "train": {"task": "arith", "split": "train", "size": 8},
    "teacher": {"type": "rationales"},
    "sft": {"lr": 1e-2, "max_steps": 3, "batch_size": 4, "warmup": 0, "max_len": 128, "lora_r": 4},
    "sample": {"limit": 4, "n": 2, "temperature": 1.0, "max_new_tokens": 12, "batch_size": 8},
    "pairs": {"strategy": "paper", "pairs_per_question": 1},
    "dpo": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "warmup": 0, "max_len": 128, "precompute_ref": True, "lora_r": 4},
    "eval": {"in_domain": {"task": "arith", "split": "test", "size": 4},
             "out_of_domain": [{"task": "arith_ood", "split": "test", "size": 3}]},
    "eval_options": {"max_new_tokens": 8, "batch_size": 8},
}


def test_pipeline_end_to_end_and_skips_done_stages(tmp_path: Path, capsys):
    model = make_tiny_model_dir(tmp_path / "model")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    report = pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model)])
    saved = json.loads((out / "report.json").read_text())
    for row in ("base", "sft", "self_refine"):
        assert saved["rows"][row]["in_domain"]["n"] == 4 and saved["rows"][row]["out_of_domain"]["n"] == 3
        for cell in saved["rows"][row].values():
            assert 0 <= cell["ci95"][0] <= cell["accuracy"] <= cell["ci95"][1] <= 1
    assert {"demos", "sft", "self_refine_samples", "dpo", "eval_base_in_domain"} <= set(saved["stage_seconds"])
    assert saved["total_seconds"] >= 0 and report["rows"] == saved["rows"]
    assert (out / "dpo" / "pairs.jsonl").exists() or (out / "dpo" / "metrics.jsonl").exists()
    printed = capsys.readouterr().out
    assert "| SFT+self-refine |" in printed
    pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model)])
    assert "done already" not in printed
    again = capsys.readouterr().out
    assert again.count("done already") == 10 and "| SFT+self-refine |" in again


def test_bad_config_is_one_line_error(tmp_path: Path):
    config = tmp_path / "c.json"
    config.write_text('{"train": {}}')
    with pytest.raises(UserError, match="c.json: config needs the sections"):
        pipeline.main(["--config", str(config), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("name", ["demo.json", "gsm8k.json", "commonsense.json"])
def test_shipped_configs_give_valid_flags(name: str):
    """Every option in a shipped config is a flag its script accepts (a typo would only show hours in)."""
    from selfrefine.recipes import dpo, eval as eval_recipe, sample, sft

    cfg = json.loads((Path(__file__).parent.parent / "configs" / name).read_text())
    cfg = pipeline.substitute(cfg, {"data_dir": "/d", "teacher": "/t"})
    base = ["--model", "m", "--out", "o"]
    sft.parser().parse_args(base + ["--data", "x"] + pipeline.flags(cfg["sft"]))
    dpo.parser().parse_args(base + ["--pairs", "x"] + pipeline.flags({**cfg.get("pairs", {}), **cfg["dpo"]}))
    sample.parser().parse_args(base + pipeline.flags({**cfg["train"], **cfg["sample"]}))
    if cfg["teacher"]["type"] == "model":
        sample.parser().parse_args(base + pipeline.flags({**cfg["train"], **cfg["teacher"]["sampling"]}))
    for split in pipeline.SPLITS:
        specs = cfg["eval"][split] if isinstance(cfg["eval"][split], list) else [cfg["eval"][split]]
        for spec in specs:
            extra = {k: v for k, v in spec.items() if k not in ("task", "data")}
            eval_recipe.parser().parse_args(base + ["--task", spec["task"]] + pipeline.flags(
                {**cfg.get("eval_options", {}), **extra}))
