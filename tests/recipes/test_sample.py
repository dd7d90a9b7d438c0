"""recipes/sample.py: n samples per question and prompt type in question order, the partial file gone at the end,
--keep-correct demos from correct cot answers only, --from-rationales, the flag rules, and a resume that
regenerates only the missing rows and writes the same file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from selfrefine import answers as answering
from selfrefine.errors import UserError
from selfrefine.recipes import sample
from selfrefine.recipes.sample import SampleConfig
from selfrefine.sampling import Completion, plan_batches
from selfrefine.tasks import get_task, render_prompt

from .conftest import write_jsonl

SIZE = 3
RAW = [{"id": "short", "prompt": "Hi."}, {"id": 2, "prompt": "Tom has 3 apples and buys 2 more. How many apples "
                                                            "does he have now? Let's think step by step."},
       {"id": "mid", "prompt": "What is 12 times 4?"}]  # lengths out of order: the batches are not question order


@pytest.fixture()
def raw_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", RAW)


def config(tiny_dir: Path, out: Path, **kw) -> SampleConfig:
    base = dict(model=str(tiny_dir), out=str(out), max_new_tokens=4, temperature=1.0, batch_size=2, seed=5,
                no_progress=True)
    return SampleConfig(**{**base, **kw})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def order(records: list[dict]) -> list[tuple[str, str, int]]:
    return [(r["prompt_type"], r["id"], r["sample"]) for r in records]


def expected_order(ids: list[str], counts: dict[str, int]) -> list[tuple[str, str, int]]:
    return [(t, qid, j) for t, n in counts.items() for qid in ids for j in range(n)]


def partials(out: Path) -> list[Path]:
    return list(out.parent.glob(out.name + ".partial*"))


@pytest.mark.parametrize("task", ["raw", "arith"])
def test_n_samples_per_question_and_prompt_type_in_question_order(tiny_dir: Path, tmp_path: Path, raw_data: Path,
                                                                   task: str):
    out = tmp_path / "samples.jsonl"
    if task == "raw":
        ids, prompts, data = [str(r["id"]) for r in RAW], [r["prompt"] for r in RAW], dict(data=str(raw_data))
    else:
        examples = get_task(task).load(split="test", size=SIZE)
        ids, prompts = [e.id for e in examples], [render_prompt(e, "math", "cot") for e in examples]
        data = dict(size=SIZE)
    records = sample.run(config(tiny_dir, out, task=task, prompt="both", n=2, n_direct=1, **data))
    assert order(records) == expected_order(ids, {"cot": 2, "direct": 1})
    assert read(out) == records and partials(out) == []
    assert [r["prompt"] for r in records if r["prompt_type"] == "cot"] == [p for p in prompts for _ in range(2)]
    graded = [r["correct"] is not None for r in records]
    assert all(graded) if task == "arith" else not any(graded)


def scripted_generate(text_for):
    """A stand-in for sampling.generate: row (i, j) of a prompt gets Completion(text_for(cot, i, j)), cot being
    whether the prompt (decoded) is a step-by-step one."""
    def generate(model, prompts, params, *, decode, batch_size, batches, on_batch, **kw):
        plan = plan_batches([len(p) for p in prompts], params.n, batch_size)
        for b in batches:
            cot = ["step by step" in decode(prompts[i]) for i, _ in plan[b]]
            on_batch(plan[b], [Completion([], text_for(c, i, j), "stop") for c, (i, j) in zip(cot, plan[b])])
    return generate


def test_keep_correct_writes_demos_from_correct_cot_answers_only(tiny_dir: Path, tmp_path: Path, monkeypatch):
    examples = get_task("arith").load(split="test", size=SIZE)

    def right(cot: bool, i: int, j: int) -> bool:
        return not cot or (i % 2 == 0 and j > 0)  # direct: always right; cot: from the second sample, even i

    def text_for(cot: bool, i: int, j: int) -> str:
        gold = int(examples[i].gold)
        return f"Sample {j}. The answer is {gold if right(cot, i, j) else gold + 1}."

    monkeypatch.setattr(answering, "generate", scripted_generate(text_for))
    out = tmp_path / "samples.jsonl"
    records = sample.run(config(tiny_dir, out, task="arith", size=SIZE, prompt="both", n=3, keep_correct=True))
    rows = [(r["prompt_type"] == "cot", [e.id for e in examples].index(r["id"]), r["sample"]) for r in records]
    assert [r["completion"] for r in records] == [text_for(*row) for row in rows]
    assert [r["correct"] for r in records] == [right(*row) for row in rows]
    demos = read(tmp_path / "samples.demos.jsonl")  # the default place: beside OUT
    assert demos == [{"id": e.id, "prompt": render_prompt(e, "math", "cot"), "completion": text_for(True, i, 1)}
                     for i, e in enumerate(examples) if i % 2 == 0]


def test_from_rationales_on_the_command_line(tmp_path: Path):
    dest = tmp_path / "demos.jsonl"
    argv = ["--from-rationales", "--task", "arith", "--size", str(SIZE), "--demos-out", str(dest)]
    demos = sample.main(argv)
    train = get_task("arith").load(split="train", size=SIZE)
    assert read(dest) == demos and [d["id"] for d in demos] == [e.id for e in train]
    assert [d["completion"] for d in demos] == [e.rationale.strip() for e in train]
    with pytest.raises(UserError, match="--from-rationales samples nothing; drop --model"):
        sample.main([*argv, "--model", "m"])
    with pytest.raises(UserError, match="--from-rationales samples nothing; drop --temperature"):
        sample.main([*argv, "--temperature", "0.5"])
    with pytest.raises(UserError, match="--from-rationales writes --demos-out"):
        sample.main(argv[:-2])


def test_export_format_trl_writes_demonstrations_as_messages(tiny_dir: Path, tmp_path: Path):
    """--export-format trl: demonstrations (--keep-correct, --from-rationales) as TRL's conversational records."""
    records = [{"prompt_type": "cot", "correct": ok, "id": qid, "prompt": f"{qid}?", "completion": f"{qid}."}
               for qid, ok in (("a", True), ("b", False))]
    sample.write_demos(records, tmp_path / "kept.jsonl", "trl")
    assert read(tmp_path / "kept.jsonl") == [{"id": "a", "prompt": [{"role": "user", "content": "a?"}],
                                              "completion": [{"role": "assistant", "content": "a."}]}]
    dest = tmp_path / "demos.jsonl"
    demos = sample.main(["--from-rationales", "--task", "arith", "--size", str(SIZE), "--demos-out", str(dest),
                         "--export-format", "trl"])
    assert [r["completion"] for r in read(dest)] == [[{"role": "assistant", "content": d["completion"]}] for d in demos]
    with pytest.raises(UserError, match="--export-format is the form of the demonstrations: it goes with --keep"):
        SampleConfig(model=str(tiny_dir), task="arith", out="s.jsonl", export_format="trl")


def test_flag_rules_of_sample_config(tiny_dir: Path):
    with pytest.raises(UserError, match="--demos-out goes with --keep-correct"):
        SampleConfig(model=str(tiny_dir), task="arith", out="s.jsonl", demos_out="d.jsonl")
    assert SampleConfig(model=str(tiny_dir), task="arith", out="s.jsonl", demos_out="d.jsonl",
                        keep_correct=True).demos_path() == "d.jsonl"
    for missing in ("model", "out"):
        given = {"model": str(tiny_dir), "out": "s.jsonl", missing: None}
        with pytest.raises(UserError, match=f"--{missing} is required"):
            SampleConfig(task="arith", **given)


def test_resume_generates_only_the_missing_rows(tiny_dir: Path, tmp_path: Path, raw_data: Path, monkeypatch):
    out = tmp_path / "samples.jsonl"
    n = 2
    cfg = config(tiny_dir, out, task="raw", data=str(raw_data), prompt="both", n=n, n_direct=n, batch_size=n)
    first = sample.run(cfg)
    kept = first[:n]  # question 0's cot samples: one whole batch, as batch_size == n
    write_jsonl(Path(f"{out}.partial"), [{"_header": sample.partial_header(cfg)}, *({**r, "_q": 0} for r in kept)])
    out.unlink()

    real, generated = answering.generate, []

    def spy(*a, on_batch, **kw):
        rows = []
        real(*a, on_batch=lambda batch, cs: (rows.extend(batch), on_batch(batch, cs)), **kw)
        generated.append(sorted(rows))

    monkeypatch.setattr(answering, "generate", spy)
    again = sample.run(dataclasses.replace(cfg, resume=True))
    assert again == first and read(out) == first and partials(out) == []
    every = [(i, j) for i in range(len(RAW)) for j in range(n)]
    assert generated == [[row for row in every if row[0] != 0], every]  # cot without question 0, then direct


def test_an_output_name_with_glob_characters_leaves_no_partial_file(tiny_dir: Path, tmp_path: Path, raw_data: Path):
    out = tmp_path / "run[1]*.jsonl"
    sample.run(config(tiny_dir, out, task="raw", data=str(raw_data)))
    assert out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, raw_data.name])


def test_cuda_graphs_on_runs_the_static_step_and_samples_the_same(tiny_dir: Path, tmp_path: Path, monkeypatch):
    """--cuda-graphs on runs the fixed-shape decode step (uncaptured on this CPU) and writes the same samples as
    off; auto on a CPU is the eager step."""
    from selfrefine.decode_step import StaticStep

    steps = []
    forward = StaticStep.forward
    monkeypatch.setattr(StaticStep, "forward", lambda self: (steps.append(1), forward(self))[1])
    records = {}
    for choice in ("off", "auto", "on"):
        steps.clear()
        records[choice] = sample.run(config(tiny_dir, tmp_path / f"{choice}.jsonl", task="arith", size=SIZE, n=3,
                                            max_new_tokens=8, dtype="float32", cuda_graphs=choice))
        assert bool(steps) == (choice == "on")
    assert records["on"] == records["off"] == records["auto"]
