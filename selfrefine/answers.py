"""Generate and grade: the one path from a task's questions to graded answers, for sample.py (several samples per
question, resumable) and eval.py (one greedy answer each). Prompts are rendered and encoded here, the batches
shared out across torchrun ranks, every rank's answers gathered into one order, and each answer graded against
the gold one (`tasks.grade`: only a stated, finished answer counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed
from .errors import fail
from .sampling import Completion, SamplingParams, generate, plan_batches
from .tasks import Example, get_task, grade, raw, render_prompt
from .tokenizer import Tokenizer

PROMPT_TYPES = ("cot", "direct")
Row = tuple[int, int]  # (question index, sample index)


@dataclass
class Question:
    id: str
    example: Example | None  # None for the raw task: nothing to grade
    prompts: dict[str, str]  # prompt type -> user-turn text
    line: int | None = None  # where a raw prompt came from, for error messages


def load_questions(task: str, data: str | None, split: str = "test", size: int | None = None, seed: int = 0,
                   limit: int | None = None, skip: int = 0) -> tuple[list[Question], str | None]:
    """(questions, task kind: "math" | "choice", None for raw prompts); ids must be unique."""
    if task == raw.NAME:
        rows = raw.load_prompts(data, None if limit is None else limit + skip)[skip:]
        if not rows:
            fail(f"no prompts after the first {skip}", data)
        return unique([Question(qid, None, {t: prompt for t in PROMPT_TYPES}, line) for line, qid, prompt in rows],
                      data), None
    spec = get_task(task)
    examples = spec.load(data, limit=limit, split=split, size=size, seed=seed, skip=skip)
    if not examples:
        fail("no questions", data or task)
    return unique([Question(e.id, e, {t: render_prompt(e, spec.kind, t) for t in PROMPT_TYPES})
                   for e in examples], data or task), spec.kind


def unique(questions: list[Question], source: str | None) -> list[Question]:
    """Refuse a repeated question id here, naming it: samples, pairs and predictions are matched by id."""
    first: dict[str, Question] = {}
    for q in questions:
        if q.id in first:
            where = f" (first at line {first[q.id].line})" if first[q.id].line else ""
            fail(f"question id {q.id!r} appears twice{where}; ids must be unique", source, q.line)
        first[q.id] = q
    return questions


def encode_prompts(tok: Tokenizer, questions: list[Question], ptype: str, ctx: int, chat: bool = True,
                   source: str | None = None) -> list[list[int]]:
    """Each question's prompt as ids (the chat template, or plain text after BOS), refusing one that leaves no
    room to answer in the `ctx`-token context."""
    encoded = []
    for q in questions:
        ids = tok.encode_chat(q.prompts[ptype]) if chat else tok.encode(q.prompts[ptype], add_bos=True)
        if len(ids) >= ctx:
            fail(f"question {q.id}: prompt of {len(ids)} tokens leaves no room in the {ctx}-token context",
                 source, q.line)
        encoded.append(ids)
    return encoded


def graded(task: str, q: Question, kind: str | None, ptype: str, sample: int, c: Completion) -> dict:
    """One answer as it is written out: question, prompt, completion, how it ended, and its grade."""
    rec = {"task": task, "id": q.id, "sample": sample, "prompt_type": ptype, "prompt": q.prompts[ptype],
           "completion": c.text, "finish_reason": c.finish_reason}
    if q.example is None:
        return {**rec, "pred": None, "answer_found": None, "gold": None, "correct": None}
    g = grade(c.text, c.finish_reason, q.example.gold, kind, q.example.choices)
    return {**rec, "pred": g.pred, "answer_found": g.answer_found, "gold": q.example.gold, "correct": g.correct}


def answer(model: torch.nn.Module, tok: Tokenizer, task: str, questions: list[Question], kind: str | None,
           ptype: str, prompts: list[list[int]], params: SamplingParams, *, batch_size: int, seed: int = 0,
           progress: bool = True, done: set[Row] = frozenset(),
           on_record: Callable[[Row, dict], None] | None = None, static: bool = False) -> dict[Row, dict]:
    """`params.n` graded answers per question, {(question, sample): record}, on every rank.

    The batches holding a row not in `done` are shared out across ranks; `on_record` sees each new record on
    the rank that made it, as soon as its batch is finished (sample.py appends it to a partial file). A row's
    sample depends only on (seed, question, sample), so the records are the same for any number of ranks."""
    plan = plan_batches([len(p) for p in prompts], params.n, batch_size)
    todo = [b for b, rows in enumerate(plan) if any(row not in done for row in rows)]
    new: dict[Row, dict] = {}

    def save_batch(rows: list[Row], completions: list[Completion]) -> None:
        for (i, j), c in zip(rows, completions):
            if (i, j) in done:  # a batch only partly done (another --batch-size before a resume) redoes the rest
                continue
            new[(i, j)] = graded(task, questions[i], kind, ptype, j, c)
            if on_record is not None:
                on_record((i, j), new[(i, j)])

    generate(model, prompts, params, stop_ids=tok.stop_ids, decode=tok.decode, batch_size=batch_size, seed=seed,
             progress=progress and distributed.is_main(), batches=distributed.shard(todo), on_batch=save_batch,
             static=static)
    merged: dict[Row, dict] = {}
    for part in distributed.all_gather_object(new):
        merged.update(part)
    return merged
