"""answers.py: questions of a task or of raw prompts (ids unique), prompts encoded within the context, answer()
keyed (question, sample) the same for any batch size and skipping finished rows, and graded() as tasks.grade."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfrefine import answers
from selfrefine.checkpoint import load_model
from selfrefine.errors import UserError
from selfrefine.sampling import Completion, SamplingParams
from selfrefine.tasks import get_task, grade, raw, render_prompt
from selfrefine.tokenizer import Tokenizer
from tests.helpers import make_tiny_model_dir

SIZE = 3
RAW_PROMPTS = ["Tom has 3 apples and buys 2 more. How many apples does he have?", "Name a colour.",
               "What is 12 times 4? Let's think step by step."]


def write_raw(path: Path, ids: list, prompts: list[str] = RAW_PROMPTS) -> Path:
    """{id, prompt} records, a blank line after the first so file lines and question indices differ."""
    first, *rest = [json.dumps({"id": qid, "prompt": p}) + "\n" for qid, p in zip(ids, prompts)]
    path.write_text(first + "\n" + "".join(rest), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    path = make_tiny_model_dir(tmp_path_factory.mktemp("answers") / "model", num_layers=1)
    return load_model(path), Tokenizer.from_dir(path)


def arith_questions() -> tuple[list[answers.Question], str | None]:
    return answers.load_questions("arith", None, "test", SIZE)


def test_embedded_task_questions_have_both_prompts_and_kind():
    questions, kind = arith_questions()
    examples = get_task("arith").load(split="test", size=SIZE)
    assert kind == get_task("arith").kind == "math"
    assert [q.id for q in questions] == [e.id for e in examples] and len(questions) == SIZE
    for q, e in zip(questions, examples):
        assert q.example == e and q.line is None
        assert q.prompts == {t: render_prompt(e, kind, t) for t in answers.PROMPT_TYPES}
        assert q.prompts["cot"] != q.prompts["direct"]
    assert [q.id for q in answers.load_questions("arith", None, "test", SIZE, limit=SIZE - 1)[0]] == \
           [e.id for e in examples[:SIZE - 1]]


def test_raw_questions_use_the_prompt_for_both_types(tmp_path: Path):
    path = write_raw(tmp_path / "raw.jsonl", ["a", 2, "c"])
    questions, kind = answers.load_questions(raw.NAME, str(path))
    assert kind is None
    assert [(q.id, q.line, q.example) for q in questions] == [("a", 1, None), ("2", 3, None), ("c", 4, None)]
    for q, prompt in zip(questions, RAW_PROMPTS):
        assert q.prompts == {t: prompt for t in answers.PROMPT_TYPES}


def test_raw_skip_passes_over_the_first_prompts(tmp_path: Path):
    path = write_raw(tmp_path / "raw.jsonl", ["a", 2, "c"])
    assert [q.id for q in answers.load_questions(raw.NAME, str(path), skip=1, limit=1)[0]] == ["2"]
    with pytest.raises(UserError, match="raw.jsonl: no prompts after the first 3"):
        answers.load_questions(raw.NAME, str(path), skip=3)


def test_repeated_raw_id_names_the_file_and_both_lines(tmp_path: Path):
    path = write_raw(tmp_path / "raw.jsonl", ["a", "b", "a"])
    with pytest.raises(UserError, match=r"question id 'a' appears twice \(first at line 1\)") as e:
        answers.load_questions(raw.NAME, str(path))
    assert (e.value.file, e.value.line) == (str(path), 4)
    with pytest.raises(UserError, match="'7' appears twice"):  # a number and its text are the same id
        answers.load_questions(raw.NAME, str(write_raw(tmp_path / "num.jsonl", [7, "7"])))


def test_encode_prompts_refuses_a_prompt_that_fills_the_context(tiny, tmp_path: Path):
    _, tok = tiny
    path = write_raw(tmp_path / "raw.jsonl", ["a", "b", "c"])
    questions, _ = answers.load_questions(raw.NAME, str(path))
    chat = [tok.encode_chat(p) for p in RAW_PROMPTS]
    plain = [tok.encode(p, add_bos=True) for p in RAW_PROMPTS]
    longest = max(range(len(chat)), key=lambda i: len(chat[i]))
    ctx = len(chat[longest])
    assert answers.encode_prompts(tok, questions, "cot", ctx + 1) == chat
    assert answers.encode_prompts(tok, questions, "direct", max(map(len, plain)) + 1, chat=False) == plain
    with pytest.raises(UserError, match=f"question {questions[longest].id}: prompt of {ctx} tokens leaves no room "
                                        f"in the {ctx}-token context") as e:
        answers.encode_prompts(tok, questions, "cot", ctx, source=str(path))
    assert (e.value.file, e.value.line) == (str(path), questions[longest].line)


def run_answer(tiny, batch_size: int, **kw) -> dict:
    model, tok = tiny
    questions, kind = arith_questions()
    prompts = answers.encode_prompts(tok, questions, "cot", model.config.max_position_embeddings)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, n=2)
    return answers.answer(model, tok, "arith", questions, kind, "cot", prompts, params, batch_size=batch_size,
                          seed=11, progress=False, **kw)


def all_rows(n: int) -> set[answers.Row]:
    return {(i, j) for i in range(SIZE) for j in range(n)}


def test_answer_keys_every_row_and_is_the_same_for_any_batch_size(tiny):
    questions, _ = arith_questions()
    records = run_answer(tiny, batch_size=2)
    assert set(records) == all_rows(2)
    for (i, j), r in records.items():
        assert (r["id"], r["sample"], r["prompt_type"], r["task"]) == (questions[i].id, j, "cot", "arith")
        assert r["prompt"] == questions[i].prompts["cot"] and r["gold"] == questions[i].example.gold
    assert run_answer(tiny, batch_size=8) == records
    assert len({r["completion"] for r in records.values()}) > 1, "temperature 1 should not give one text for all"


def test_done_rows_are_not_generated_again(tiny):
    full = run_answer(tiny, batch_size=2)
    done = {(0, j) for j in range(2)}  # with n = batch_size = 2 a batch is one question's samples
    seen = []
    new = run_answer(tiny, batch_size=2, done=done, on_record=lambda row, rec: seen.append((row, rec)))
    assert sorted(row for row, _ in seen) == sorted(all_rows(2) - done)
    assert new == {row: full[row] for row in all_rows(2) - done} == dict(seen)
    assert run_answer(tiny, batch_size=2, done=all_rows(2), on_record=lambda *a: pytest.fail("nothing to do")) == {}


def test_graded_follows_tasks_grade():
    questions, kind = arith_questions()
    q = questions[0]
    gold = q.example.gold
    for text, reason in [(f"So. The answer is {gold}.", "stop"), (f"The answer is {gold}.", "length"),
                         ("I do not know.", "stop"), (f"The answer is {int(gold) + 1}.", "stop")]:
        rec = answers.graded("arith", q, kind, "direct", 3, Completion([], text, reason))
        g = grade(text, reason, gold, kind)
        assert (rec["pred"], rec["answer_found"], rec["correct"]) == (g.pred, g.answer_found, g.correct)
        assert rec == {"task": "arith", "id": q.id, "sample": 3, "prompt_type": "direct", "prompt": q.prompts["direct"],
                       "completion": text, "finish_reason": reason, "pred": g.pred, "answer_found": g.answer_found,
                       "gold": gold, "correct": g.correct}
    assert answers.graded("arith", q, kind, "cot", 0, Completion([], f"The answer is {gold}.", "stop"))["correct"]


def test_graded_raw_question_has_no_grade():
    q = answers.Question("r1", None, {t: "Say hi." for t in answers.PROMPT_TYPES}, 1)
    rec = answers.graded(raw.NAME, q, None, "cot", 0, Completion([5], "The answer is 4.", "stop"))
    assert rec["completion"] == "The answer is 4." and rec["prompt"] == "Say hi." and rec["id"] == "r1"
    assert (rec["pred"], rec["answer_found"], rec["gold"], rec["correct"]) == (None, None, None, None)
