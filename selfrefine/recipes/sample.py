"""Sample answers to a task's questions: teacher demonstrations (stage 1) and the student's own
reasoning paths for self-refine (stage 2). One JSON line per sample, scored against the gold answer."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..errors import fail
from ..flags import Parser, nonneg_float, nonneg_int, positive_int, unit_interval
from ..fingerprint import path_digest
from ..files import append_jsonl, drop_torn_tail, read_jsonl, write_jsonl
from ..paths import check_outputs
from ..sampling import SamplingParams, generate, plan_batches
from ..tasks import Example, demonstration, get_task, grade, render_prompt
from .common import add_model_args, load

PROMPT_TYPES = {"cot": ("cot",), "direct": ("direct",), "both": ("cot", "direct")}


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="sample.py", description=__doc__)
    add_model_args(p)
    p.add_argument("--task", required=True, help="a task name (see selfrefine.tasks), or raw for {id, prompt} JSONL")
    p.add_argument("--data", help="the task's data file (the embedded arith tasks need none)")
    p.add_argument("--split", default="test", help="embedded tasks: train or test")
    p.add_argument("--size", type=positive_int, help="embedded tasks: number of generated questions")
    p.add_argument("--data-seed", type=nonneg_int, default=0, help="embedded tasks: generator seed")
    p.add_argument("--limit", type=positive_int, help="first N questions only")
    p.add_argument("--prompt", default="cot", choices=list(PROMPT_TYPES), help="both = cot and direct samples")
    p.add_argument("--n", type=positive_int, default=1, help="samples per question (cot prompt)")
    p.add_argument("--n-direct", type=positive_int, default=1, help="samples per question for the direct prompt")
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--no-chat", action="store_true", help="plain text prompts, no chat template")
    p.add_argument("--out", required=True, help="samples JSONL (written atomically at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial, skipping finished batches")
    p.add_argument("--keep-correct", action="store_true", help="also write the correct cot answers as SFT demos")
    p.add_argument("--demos-out", help="with --keep-correct: demonstrations JSONL {id, prompt, completion}")
    p.add_argument("--no-progress", action="store_true")
    return p


@dataclass
class Question:
    id: str
    example: Example | None  # None for --task raw
    prompts: dict[str, str]  # prompt type -> user-turn text
    line: int | None = None


def load_questions(args: argparse.Namespace) -> tuple[list[Question], str | None]:
    """(questions, task kind); raw prompts come with their line numbers for error messages."""
    if args.task == "raw":
        if not args.data:
            fail("--task raw needs --data with {id, prompt} JSONL records")
        if args.limit is not None and args.limit < 1:
            fail(f"--limit must be >= 1, got {args.limit}")
        rows = read_jsonl(args.data, required=("id", "prompt"))[: args.limit]
        for line, r in rows:
            if not isinstance(r["prompt"], str) or not r["prompt"].strip():
                fail("field 'prompt' must be a non-empty string", args.data, line)
        return unique([Question(str(r["id"]), None, {"cot": r["prompt"], "direct": r["prompt"]}, line)
                       for line, r in rows], args.data), None
    task = get_task(args.task)
    examples = task.load(args.data, limit=args.limit, split=args.split, size=args.size, seed=args.data_seed)
    if not examples:
        fail("no questions", args.data or args.task)
    return unique([Question(e.id, e, {t: render_prompt(e, task.kind, t) for t in ("cot", "direct")})
                   for e in examples], args.data or args.task), task.kind


def unique(questions: list[Question], source: str) -> list[Question]:
    """Refuse a repeated question id here, naming it: samples, pairs and predictions are matched by id."""
    first: dict[str, Question] = {}
    for q in questions:
        if q.id in first:
            where = f" (first at line {first[q.id].line})" if first[q.id].line else ""
            fail(f"question id {q.id!r} appears twice{where}; ids must be unique", source, q.line)
        first[q.id] = q
    return questions


def score(q: Question, kind: str | None, completion: str, finish_reason: str) -> dict:
    if q.example is None:
        return {"pred": None, "answer_found": None, "gold": None, "correct": None}
    g = grade(completion, finish_reason, q.example.gold, kind, q.example.choices)
    return {"pred": g.pred, "answer_found": g.answer_found, "gold": q.example.gold, "correct": g.correct}


def rationale_demos(questions: list[Question], kind: str) -> list[dict]:
    """The data set's own rationales (or the embedded task's programmatic teacher) as demonstrations."""
    demos = []
    for q in questions:
        text = demonstration(q.example, kind)
        if text:
            demos.append({"id": q.id, "prompt": q.prompts["cot"], "completion": text})
    return demos


def read_partial(path: Path, header: dict) -> dict[tuple[str, int, int], dict]:
    """Finished samples of an interrupted run, keyed by (prompt type, question index, sample index); a line torn
    by a kill or a full disk is dropped (and said), a changed input file or setting is refused by name."""
    if torn := drop_torn_tail(path):
        print(f"{path}: dropped a torn last line ({torn} bytes) left by an interrupted write")
    rows = read_jsonl(path, allow_empty=True)
    old = rows[0][1].get("_header", {}) if rows else {}
    for flag, digest in header["inputs"].items():
        if old.get("inputs", {}).get(flag, digest) != digest:
            fail(f"--{flag} changed since the partial samples were made (its content hash differs); delete the "
                 "partial file or drop --resume", path, 1)
    if old != header:
        fail("partial samples were made with other settings; delete the file or drop --resume", path, 1)
    return {(r["prompt_type"], r["_q"], r["sample"]): r for _, r in rows[1:]}


def partial_header(args: argparse.Namespace) -> dict:
    """What a partial file must have been made with to be resumed: the settings that change the samples, and
    the input files by content hash."""
    header = {k: v for k, v in vars(args).items() if k not in ("resume", "no_progress", "batch_size")}
    return {**header, "inputs": {flag: path_digest(getattr(args, flag)) for flag in ("model", "adapter", "data")}}


def partial_files(out: Path) -> tuple[Path, list[Path]]:
    """(this rank's partial file, every partial file of OUT). Under torchrun each rank appends to its own
    (OUT.partial, OUT.partial.1, ...); a resume merges them all, whatever the number of ranks was."""
    first = out.with_name(out.name + ".partial")
    mine = first if distributed.rank() == 0 else first.with_name(f"{first.name}.{distributed.rank()}")
    return mine, sorted(p for p in out.parent.glob(f"{first.name}*") if p == first or p.suffix[1:].isdigit())


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    demos = args.demos_out or (Path(args.out).with_name(Path(args.out).stem + ".demos.jsonl")
                               if args.keep_correct else None)
    check_outputs({"--model": args.model, "--adapter": args.adapter, "--data": args.data},  # before anything loads
                  {"--out": args.out, "--out's partial file": f"{args.out}.partial", "--demos-out": demos})
    if args.demos_out and not args.keep_correct:
        fail("--demos-out goes with --keep-correct")
    sampling = {ptype: SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, n=args.n if ptype == "cot" else args.n_direct)
                for ptype in PROMPT_TYPES[args.prompt]}
    questions, kind = load_questions(args)
    model, tok, _ = load(args)
    encode = (lambda text: tok.encode(text, add_bos=True)) if args.no_chat else tok.encode_chat
    ctx = model.config.max_position_embeddings
    encoded = {ptype: [encode(q.prompts[ptype]) for q in questions] for ptype in sampling}
    for ptype, prompts in encoded.items():  # every check before any file is touched
        for q, ids in zip(questions, prompts):
            if len(ids) >= ctx:
                fail(f"question {q.id}: prompt of {len(ids)} tokens leaves no room in the {ctx}-token context",
                     args.data, q.line)
    out = Path(args.out)
    partial, partials = partial_files(out)
    header = partial_header(args)
    done = {key: r for p in partials for key, r in read_partial(p, header).items()} if args.resume else {}
    distributed.barrier()  # every rank has read the partial files before any rank rewrites one
    if not args.resume and distributed.is_main():
        for stale in partials:
            stale.unlink()
    distributed.barrier()
    if not (args.resume and partial.exists()):
        write_jsonl(partial, [{"_header": header}])
    records = []
    for ptype in PROMPT_TYPES[args.prompt]:
        prompts, params = encoded[ptype], sampling[ptype]
        n = params.n
        seed = args.seed + (0 if ptype == "cot" else 1_000_003)
        plan = plan_batches([len(p) for p in prompts], n, args.batch_size)
        todo = [b for b, rows in enumerate(plan) if any((ptype, i, j) not in done for i, j in rows)]
        new: dict[tuple[str, int, int], dict] = {}

        def save_batch(rows, completions, ptype=ptype, new=new):
            for (i, j), c in zip(rows, completions):
                q = questions[i]
                rec = {"task": args.task, "id": q.id, "sample": j, "prompt_type": ptype, "prompt": q.prompts[ptype],
                       "completion": c.text, "finish_reason": c.finish_reason,
                       **score(q, kind, c.text, c.finish_reason), "_q": i}
                append_jsonl(partial, rec)
                new[(ptype, i, j)] = rec

        generate(model, prompts, params, stop_ids=tok.stop_ids, decode=tok.decode, batch_size=args.batch_size,
                 seed=seed, progress=not args.no_progress and distributed.is_main(),
                 batches=distributed.shard(todo), on_batch=save_batch)
        for rows in distributed.all_gather_object(new):  # every rank's batches, into the one plan order below
            done.update(rows)
        records += [{k: v for k, v in done[(ptype, i, j)].items() if k != "_q"}
                    for i in range(len(questions)) for j in range(n)]
    if not distributed.is_main():
        return records
    write_jsonl(out, records)
    for p in partial_files(out)[1]:
        os.unlink(p)
    summary = f"{len(records)} samples -> {out}"
    if kind is not None:
        for ptype in PROMPT_TYPES[args.prompt]:
            sub = [r for r in records if r["prompt_type"] == ptype]
            summary += (f"; {ptype}: {sum(r['correct'] for r in sub)}/{len(sub)} correct, "
                        f"{sum(r['finish_reason'] == 'length' for r in sub)} cut at the token limit, "
                        f"{sum(not r['answer_found'] for r in sub)} without an answer")
    print(summary)
    if args.keep_correct:
        demos, seen = [], set()
        for r in records:
            if r["prompt_type"] == "cot" and r["correct"] and r["id"] not in seen:
                seen.add(r["id"])
                demos.append({"id": r["id"], "prompt": r["prompt"], "completion": r["completion"]})
        dest = Path(args.demos_out or out.with_name(out.stem + ".demos.jsonl"))
        write_jsonl(dest, demos)
        print(f"{len(demos)} demonstrations (one correct cot answer per question) -> {dest}")
    return records


def rationales_main(argv: list[str] | None = None) -> list[dict]:
    """`sample.py --from-rationales`: demonstrations from the data's own rationales, no model needed."""
    p = Parser(prog="sample.py --from-rationales")
    for flag in ("--task", "--data", "--split", "--demos-out"):
        p.add_argument(flag, required=flag in ("--task", "--demos-out"))
    p.add_argument("--size", type=positive_int)
    p.add_argument("--data-seed", type=nonneg_int, default=0)
    p.add_argument("--limit", type=positive_int)
    args = p.parse_args(argv)
    check_outputs({"--data": args.data}, {"--demos-out": args.demos_out})
    args.split = args.split or "train"
    questions, kind = load_questions(args)
    demos = rationale_demos(questions, kind)
    if not demos:
        fail(f"task {args.task} has no rationales to use as demonstrations", args.data)
    write_jsonl(args.demos_out, demos)
    print(f"{len(demos)} demonstrations from the data's rationales -> {args.demos_out}")
    return demos


def cli(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if "--from-rationales" in argv:
        return rationales_main([a for a in argv if a != "--from-rationales"])
    return main(argv)
