"""recipes/rationales.py: demonstrations from the data's own rationales (the arith teacher's here), a data set
without rationales refused in one line, and the config's required settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfrefine.data import read_sft
from selfrefine.errors import UserError
from selfrefine.preference import load_demos
from selfrefine.recipes.rationales import RationalesConfig, run
from selfrefine.tasks import demonstration, get_task, render_prompt

FIXTURES = Path(__file__).parents[1] / "fixtures"
SIZE = 3


def test_arith_gives_one_teacher_demonstration_per_question(tmp_path: Path):
    out = tmp_path / "demos.jsonl"
    demos = run(RationalesConfig(task="arith", size=SIZE, demos_out=str(out)))
    examples = get_task("arith").load(split="train", size=SIZE)  # the default split is train
    assert demos == [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["id"] for d in demos] == [e.id for e in examples]
    for d, e in zip(demos, examples):
        assert d == {"id": e.id, "prompt": render_prompt(e, "math", "cot"), "completion": e.rationale.strip()}
        assert d["completion"] == demonstration(e, "math") and d["completion"].endswith(f"The answer is {e.gold}.")
    test = run(RationalesConfig(task="arith", size=SIZE, split="test", limit=SIZE - 1, demos_out=str(out)))
    assert [d["id"] for d in test] == [e.id for e in get_task("arith").load(split="test", size=SIZE)[:SIZE - 1]]


def test_trl_export_reads_back_as_the_default_form(tmp_path: Path):
    """--export-format trl: the prompt and the completion as one message each; SFT and the pair builder read the
    file back as they read the default one."""
    ours, trl = tmp_path / "ours.jsonl", tmp_path / "trl.jsonl"
    demos = run(RationalesConfig(task="arith", size=SIZE, demos_out=str(ours)))
    assert run(RationalesConfig(task="arith", size=SIZE, demos_out=str(trl), export_format="trl")) == demos
    first = json.loads(trl.read_text().splitlines()[0])
    assert first == {"id": demos[0]["id"], "prompt": [{"role": "user", "content": demos[0]["prompt"]}],
                     "completion": [{"role": "assistant", "content": demos[0]["completion"]}]}
    assert read_sft(trl) == read_sft(ours) and load_demos(trl) == load_demos(ours) == demos


@pytest.mark.parametrize("task, data", [("piqa", FIXTURES / "piqa" / "valid.jsonl"),
                                        ("commonsenseqa", FIXTURES / "commonsenseqa" / "dev_rand_split.jsonl")])
def test_data_without_rationales_is_a_one_line_error(tmp_path: Path, task: str, data: Path):
    out = tmp_path / "demos.jsonl"
    with pytest.raises(UserError, match=f"task {task} has no rationales to use as demonstrations") as e:
        run(RationalesConfig(task=task, data=str(data), demos_out=str(out)))
    assert "\n" not in str(e.value) and e.value.file == str(data)
    assert not out.exists()


def test_task_and_demos_out_are_required():
    with pytest.raises(UserError, match="--task is required"):
        RationalesConfig(demos_out="d.jsonl")
    with pytest.raises(UserError, match="--demos-out is required"):
        RationalesConfig(task="arith")
    assert RationalesConfig(task="arith", demos_out="d.jsonl").split is None
