"""The whole method wired end to end on a tiny model and a tiny config (CI's integration test)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfrefine import pipeline
from selfrefine.errors import UserError
from selfrefine.tokenizer import Tokenizer
from tests.helpers import make_tiny_model_dir

TINY = {
    "seed": 0,
    "train": {"task": "arith", "split": "train", "size": 8},
    "teacher": {"type": "rationales"},
    "sft": {"lr": 1e-2, "max_steps": 3, "batch_size": 4, "warmup": 0, "max_len": 128, "lora_r": 4},
    "sample": {"limit": 4, "n": 2, "temperature": 1.0, "max_new_tokens": 12, "batch_size": 8},
    # The tiny random model never ends an answer: its cut samples are the only ones there are to reject.
    "pairs": {"strategy": "paper", "pairs_per_question": 1, "keep_truncated": True},
    "dpo": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "warmup": 0, "max_len": 128, "precompute_ref": True, "lora_r": 4},
    "eval": {"in_domain": {"task": "arith", "split": "test", "size": 4},
             "out_of_domain": [{"task": "arith_ood", "split": "test", "size": 3}]},
    "eval_options": {"max_new_tokens": 8, "batch_size": 8},
}


def stage_lines(printed: str) -> tuple[set[str], set[str]]:
    """(stages skipped as up to date, stages run) from the pipeline's output."""
    skipped = set(re.findall(r"^\[(\w+)\] up to date", printed, re.M))
    ran = set(re.findall(r"^\[(\w+)\] [\d.]+ s$", printed, re.M))
    return skipped, ran


EVALS = {f"eval_{row}_{split}" for row in pipeline.ROWS for split in pipeline.SPLITS}


def test_pipeline_end_to_end_and_skips_done_stages(tmp_path: Path, capsys):
    model = make_tiny_model_dir(tmp_path / "model")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    report = pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model)])
    saved = json.loads((out / "report.json").read_text())
    for row in pipeline.ROWS:
        assert saved["rows"][row]["in_domain"]["arith"]["n"] == 4
        assert saved["rows"][row]["out_of_domain"]["arith_ood"]["n"] == 3
        for split in saved["rows"][row].values():
            for cell in split.values():
                assert 0 <= cell["ci95"][0] <= cell["accuracy"] <= cell["ci95"][1] <= 1
                assert 0 <= cell["no_answer_rate"] <= 1 and 0 <= cell["truncation_rate"] <= 1
    for name in pipeline.COMPARISONS:
        cmp = saved["comparisons"][name]["in_domain"]["arith"]
        assert cmp["n"] == 4 and 0 < cmp["p"] <= 1 and cmp["ci95"][0] <= cmp["diff"] <= cmp["ci95"][1]
    assert {"demos", "sft", "self_refine_samples", "dpo", "eval_base_in_domain"} <= set(saved["stage_seconds"])
    assert set(saved["fingerprints"]) == set(saved["stage_seconds"])
    assert saved["total_seconds"] >= 0 and report["rows"] == saved["rows"]
    printed = capsys.readouterr().out
    assert "| SFT+self-refine - SFT |" in printed and "demonstrations: 8, answer tokens p50" in printed
    pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model)])
    again = capsys.readouterr().out
    assert stage_lines(again) == ({"demos", "sft", "self_refine_samples", "dpo"} | EVALS, set())
    assert "| SFT+self-refine - SFT |" in again
    pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model), "--quiet"])
    quiet = capsys.readouterr().out
    assert stage_lines(quiet) == (set(), set()) and "| SFT+self-refine - SFT |" in quiet  # the results only
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(config), "--out", str(out), "--quiet", "--verbose"])
    assert e.value.code == 2 and "--quiet and --verbose contradict" in capsys.readouterr().err


def test_changed_seed_or_dpo_lr_redoes_exactly_what_depends_on_it(tmp_path: Path, capsys):
    model = make_tiny_model_dir(tmp_path / "model")
    config, out = tmp_path / "tiny.json", tmp_path / "run"
    config.write_text(json.dumps(TINY))
    args = ["--config", str(config), "--out", str(out), "--model", str(model)]
    pipeline.main(args)
    capsys.readouterr()
    seeded = {"sft", "self_refine_samples", "dpo"} | {e for e in EVALS if "base" not in e}
    pipeline.main(args + ["--seed", "1"])
    printed = capsys.readouterr().out
    assert stage_lines(printed) == ({"demos", "eval_base_in_domain", "eval_base_out_of_domain"}, seeded)
    assert "[sft] option seed changed (0 -> 1): redoing it and what depends on it" in printed
    assert json.loads((out / "report.json").read_text())["seed"] == 1
    assert json.loads((out / "sft" / "run.json").read_text())["config"]["seed"] == 1
    config.write_text(json.dumps({**TINY, "dpo": {**TINY["dpo"], "lr": 5e-3}}))
    pipeline.main(args + ["--seed", "1"])
    skipped, ran = stage_lines(capsys.readouterr().out)
    assert ran == {"dpo", "eval_self_refine_in_domain", "eval_self_refine_out_of_domain"}
    assert skipped == {"demos", "sft", "self_refine_samples"} | EVALS - ran
    assert json.loads((out / "dpo" / "run.json").read_text())["config"]["lr"] == 5e-3


@pytest.mark.parametrize("reference", ["previous", "sft"])
def test_two_rounds_sample_with_the_last_model_and_compare_every_round(tmp_path: Path, capsys, reference: str):
    """rounds: 2: round 2 samples with round 1's merged model (fresh draws) and trains from it, against it or
    against the SFT model; the table gains a row and its paired tests against round 1 and against SFT."""
    model = make_tiny_model_dir(tmp_path / "model")
    config, out = tmp_path / "tiny.json", tmp_path / "run"
    config.write_text(json.dumps({**TINY, "rounds": 2, "round_reference": reference}))
    run = pipeline.Pipeline(json.loads(config.read_text()), str(config), out, 0, False)
    second = run.rounds[1]
    assert second.model == out / "dpo" / "merged"
    assert second.dpo.model == second.sample.model == str(out / "dpo" / "merged")
    assert second.dpo.ref_model == (str(out / "sft" / "merged") if reference == "sft" else None)
    assert second.sample.seed == pipeline.ROUND_SEED_STRIDE and run.rounds[0].dpo.merge and not second.dpo.merge
    report = pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model)])
    assert set(report["rows"]) == {"base", "sft", "self_refine", "self_refine_r2"}
    assert set(report["comparisons"]) == {"sft_vs_base", "self_refine_vs_sft", "self_refine_r2_vs_self_refine",
                                          "self_refine_r2_vs_sft"}
    assert report["comparisons"]["self_refine_r2_vs_self_refine"]["in_domain"]["arith"]["n"] == 4
    assert {"self_refine_samples_r2", "dpo_r2", "eval_self_refine_r2_out_of_domain"} <= set(report["stage_seconds"])
    assert (out / "samples_r2.jsonl").exists() and (out / "dpo_r2" / "adapter").is_dir()
    assert "| SFT+self-refine round 2 - SFT+self-refine |" in capsys.readouterr().out


def test_cross_task_self_refine_on_other_questions(tmp_path: Path, capsys):
    """The sample section names its own questions (arith_ood's dev split after instruction-tuning on arith): the
    teacher writes demonstrations for them too, the pairs are built on them, and the report names both tasks."""
    model = make_tiny_model_dir(tmp_path / "model")
    config, out = tmp_path / "tiny.json", tmp_path / "run"
    config.write_text(json.dumps({**TINY, "sample": {**TINY["sample"], "task": "arith_ood", "split": "dev"}}))
    report = pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model)])
    assert report["tasks"] == {"instruction": "arith", "self_refine": "arith_ood"}
    assert {"demos", "self_refine_demos"} <= set(report["stage_seconds"])
    sft_ids = {json.loads(l)["id"] for l in (out / "demos.jsonl").read_text().splitlines()}
    pairs = [json.loads(l) for l in (out / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert all(i.startswith("arith-train-") for i in sft_ids) and pairs
    assert all(p["id"].startswith("arith_ood-dev-") for p in pairs)
    assert {p["chosen_source"] for p in pairs} == {"teacher"}  # the tiny model is never right: the stand-ins
    assert "instruction-tuned on arith, self-refined on arith_ood" in capsys.readouterr().out


def test_budget_below_the_demonstrations_p99_warns(tmp_path: Path, capsys):
    model = make_tiny_model_dir(tmp_path / "model")
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"id": str(i), "prompt": "q", "completion": "word " * (10 + i)}) + "\n"
                             for i in range(20)))
    cfg = {**TINY, "sample": {**TINY["sample"], "max_new_tokens": 5}}
    budgets = pipeline.Pipeline(cfg, "tiny.json", tmp_path / "o", 0, False).sft_budgets()
    pipeline.check_budgets(Tokenizer.from_dir(model), demos, budgets)
    printed = capsys.readouterr().out
    assert "warning: sample.max_new_tokens = 5 is below the demonstrations' p99 length" in printed
    assert "warning: eval.in_domain.max_new_tokens = 8 is below" in printed


def test_bad_config_is_one_line_error(tmp_path: Path):
    config = tmp_path / "c.json"
    config.write_text('{"train": {}}')
    with pytest.raises(UserError, match="c.json: config needs the sections"):
        pipeline.main(["--config", str(config), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("name", ["demo.json", "gsm8k.json", "commonsense.json", "gsm8k_cpu.json",
                                  "commonsense_cpu.json"])
def test_shipped_configs_give_valid_flags(name: str, tmp_path: Path):
    """Every option in a shipped config is a setting its recipe accepts (a typo would only show hours in): the
    pipeline builds every stage's typed config up front."""
    path = pipeline.CONFIGS / name
    cfg = pipeline.substitute(json.loads(path.read_text()), {"data_dir": "/d", "teacher": "/t"})
    pipeline.check_config(cfg, str(path))
    run = pipeline.Pipeline(cfg, str(path), tmp_path, 0, False)
    assert run.sft.lr == cfg["sft"]["lr"] and run.rounds[0].dpo.beta == cfg["dpo"]["beta"]
    assert [run.evals[s].task for s in pipeline.SPLITS] == [
        [spec["task"] for spec in pipeline.eval_specs(cfg, s)] for s in pipeline.SPLITS]


def test_section_key_overrides_reach_the_stages_and_are_recorded(tmp_path: Path):
    model = make_tiny_model_dir(tmp_path / "model")
    config, out = tmp_path / "tiny.json", tmp_path / "run"
    config.write_text(json.dumps(TINY))
    with pytest.raises(UserError, match="section sft: unknown key 'lrr'"):  # refused before anything is made
        pipeline.main(["--config", str(config), "--out", str(out), "--model", str(model), "sft.lrr=2e-2"])
    assert not out.exists()
    pipeline.main(["sft.lr=2e-2", "--config", str(config), "--out", str(out), "--model", str(model), "dpo.beta=0.2"])
    record = json.loads((out / "run.json").read_text())
    assert record["overrides"] == ["sft.lr=2e-2", "dpo.beta=0.2"]
    assert (record["config"]["sft"]["lr"], record["config"]["dpo"]["beta"]) == (2e-2, 0.2)
    assert json.loads((out / "sft" / "run.json").read_text())["config"]["lr"] == 2e-2
    assert json.loads((out / "dpo" / "run.json").read_text())["config"]["beta"] == 0.2


@pytest.mark.parametrize("name,tasks", [("gsm8k_cpu.json", {"in_domain": ["gsm8k"], "out_of_domain": ["multiarith"]}),
                                        ("commonsense_cpu.json", {"in_domain": ["commonsenseqa"], "out_of_domain": [
                                            "openbookqa", "piqa", "socialiqa"]})])
def test_cpu_recipe_runs_end_to_end_on_fixture_data(name: str, tasks: dict[str, list[str]], tmp_path: Path, capsys):
    """A CPU recipe as shipped, on the fixture data files and the tiny model, shrunk only by command-line
    overrides: every stage runs and the report has every task of both splits."""
    model = make_tiny_model_dir(tmp_path / "model")
    config = pipeline.CONFIGS / name
    small = ["sft.max_steps=2", "sft.warmup=0", "sample.limit=2", "sample.max_new_tokens=8", "sample.batch_size=4",
             "pairs.keep_truncated=true", "dpo.max_steps=1", "dpo.warmup=0", "eval_options.limit=2",
             "eval_options.max_new_tokens=6", "eval_options.batch_size=4"]
    if name == "gsm8k_cpu.json":
        small.append("eval.in_domain.limit=2")
    pipeline.main(["--config", str(config), "--data-dir", str(Path(__file__).parent / "fixtures"),
                   "--model", str(model), "--out", str(tmp_path / "run"), *small])
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    for row in pipeline.ROWS:
        assert {split: sorted(saved["rows"][row][split]) for split in pipeline.SPLITS} == \
            {split: sorted(names) for split, names in tasks.items()}
        assert saved["rows"][row]["in_domain"][tasks["in_domain"][0]]["n"] == 2
    assert "| SFT+self-refine - SFT |" in capsys.readouterr().out


def test_training_questions_default_to_the_train_split(tmp_path: Path):
    """Without train.split, every stage that reads the training questions reads the train split (the sampler's own
    default, "test", would self-refine on the in-domain evaluation questions)."""
    cfg = json.loads(json.dumps(TINY))
    del cfg["train"]["split"]
    run = pipeline.Pipeline(cfg, "tiny.json", tmp_path / "run", 0, False)
    assert run.rounds[0].sample.split == "train" and run.demos.split == "train"
    assert run.question_prompts("train") == pipeline.Pipeline(TINY, "tiny.json", tmp_path / "r", 0, False)\
        .question_prompts("train")


def test_a_sample_seed_keeps_the_rounds_apart(tmp_path: Path):
    cfg = {**TINY, "rounds": 2, "sample": {**TINY["sample"], "seed": 7}}
    run = pipeline.Pipeline(cfg, "tiny.json", tmp_path / "run", 0, False)
    assert [rd.sample.seed for rd in run.rounds] == [7, 7 + pipeline.ROUND_SEED_STRIDE]


def test_self_refine_on_evaluation_questions_is_refused_before_anything_runs(tmp_path: Path):
    """A cross-task sample section naming the out-of-domain test questions: DPO would learn from their gold
    labels, so the run stops in one line before the first stage."""
    config, out = tmp_path / "tiny.json", tmp_path / "run"
    config.write_text(json.dumps({**TINY, "sample": {**TINY["sample"], "task": "arith_ood", "split": "test"}}))
    with pytest.raises(UserError, match="share 3 question.s. with eval.out_of_domain"):
        pipeline.main(["--config", str(config), "--out", str(out), "--model", str(make_tiny_model_dir(tmp_path / "m"))])
    assert not out.exists()
