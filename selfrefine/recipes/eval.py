"""Greedy evaluation: accuracy with n and a 95% Wilson interval per task, the share of completions with no stated
answer and the share cut at the token limit (an answer counts only when stated and finished), per-example
predictions beside the report, and a markdown table of the tasks.

--compare A B reads two predictions files of the same questions (no model needed) and prints, per task, the paired
difference B - A with Agresti and Min's 95% interval and the exact McNemar p-value:

    python eval.py --compare runs/sft.arith.predictions.jsonl runs/dpo.arith.predictions.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import distributed
from ..errors import fail
from ..flags import Parser, nonneg_int, positive_int
from ..files import read_jsonl, write_json, write_jsonl
from ..paths import check_outputs
from ..sampling import SamplingParams, generate, plan_batches
from ..tasks import Example, Task, get_task, grade, render_prompt, wilson_interval
from ..tasks.stats import PairedComparison, paired_comparison
from .common import add_model_args, load

EMBEDDED = ("arith", "arith_ood")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, required=False)  # --model, --task and --out: required unless --compare (check_args)
    p.add_argument("--task", action="append",
                   help="task name, repeatable; NAME=PATH gives its data file inline (required unless --compare)")
    p.add_argument("--data", action="append", default=[], help="data file(s), in the order of the tasks that need one")
    p.add_argument("--split", default="test", help="embedded tasks: train or test")
    p.add_argument("--size", type=positive_int, help="embedded tasks: number of generated questions")
    p.add_argument("--data-seed", type=nonneg_int, default=0)
    p.add_argument("--limit", type=positive_int, help="first N questions of each task")
    p.add_argument("--prompt", default="cot", choices=["cot", "direct"])
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--out", help="report JSON; predictions go to OUT-stem.<task>.predictions.jsonl "
                                 "(required unless --compare)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="compare two predictions files of the same questions instead of evaluating: per task, "
                        "accuracy A -> B, the difference B - A with its 95%% interval (Agresti-Min), the discordant "
                        "questions (A right only / B right only) and the exact McNemar p-value; needs no model")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--model, --task and --out are required when evaluating; --compare takes none of the evaluation inputs."""
    given = {"--model": args.model, "--adapter": args.adapter, "--task": args.task, "--data": args.data,
             "--out": args.out}
    if args.compare:
        extra = [flag for flag, value in given.items() if value]
        if extra:
            p.error(f"--compare reads two predictions files and evaluates nothing; drop {', '.join(extra)}")
    else:
        missing = [flag for flag in ("--model", "--task", "--out") if not given[flag]]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)} (or --compare A B)")


def task_data(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """Pair each --task with its data file: inline NAME=PATH, else the next --data (embedded tasks need none)."""
    pending = list(args.data)
    pairs = []
    for spec in args.task:
        name, _, path = spec.partition("=")
        if not path and name not in EMBEDDED:
            if not pending:
                fail(f"task {name} needs a data file: --data PATH or --task {name}=PATH")
            path = pending.pop(0)
        pairs.append((name, path or None))
    if pending:
        fail(f"more --data files than tasks that need one: {pending}")
    return pairs


def load_task(name: str, path: str | None, args: argparse.Namespace) -> tuple[Task, list[Example]]:
    task = get_task(name)
    examples = task.load(path, limit=args.limit, split=args.split, size=args.size, seed=args.data_seed)
    if not examples:
        fail("no questions", path or name)
    return task, examples


def evaluate(model, tok, task: Task, examples: list[Example], path: str | None, args: argparse.Namespace,
             out: Path) -> dict:
    name = task.name
    prompts = [render_prompt(e, task.kind, args.prompt) for e in examples]
    ids = [tok.encode_chat(p) for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    n_batches = len(plan_batches([len(i) for i in ids], 1, args.batch_size))  # under torchrun, a share per rank
    outs = generate(model, ids, params, stop_ids=tok.stop_ids, decode=tok.decode, batch_size=args.batch_size,
                    progress=not args.no_progress and distributed.is_main(),
                    batches=distributed.shard(range(n_batches)))
    outs = distributed.merge_filled(outs)
    preds = []
    for e, prompt, (c,) in zip(examples, prompts, outs):
        g = grade(c.text, c.finish_reason, e.gold, task.kind, e.choices)
        preds.append({"task": name, "id": e.id, "prompt": prompt, "completion": c.text,
                      "finish_reason": c.finish_reason, "pred": g.pred, "answer_found": g.answer_found,
                      "gold": e.gold, "correct": g.correct})
    k, n = sum(p["correct"] for p in preds), len(preds)
    pred_path = out.with_name(f"{out.stem}.{name}.predictions.jsonl")
    if distributed.is_main():
        write_jsonl(pred_path, preds)
    return {"task": name, "data": path, "split": args.split if path is None else None, "prompt": args.prompt,
            "n": n, "correct": k, "accuracy": k / n, "ci95": list(wilson_interval(k, n)),
            "no_answer_rate": sum(not p["answer_found"] for p in preds) / n,
            "truncation_rate": sum(p["finish_reason"] == "length" for p in preds) / n,
            "max_new_tokens": args.max_new_tokens,
            "model": args.model, "adapter": args.adapter, "predictions": str(pred_path)}


def table(reports: list[dict]) -> str:
    lines = ["| task | n | accuracy | 95% CI | no answer | truncated | max new tokens |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in reports:
        lo, hi = r["ci95"]
        lines.append(f"| {r['task']} | {r['n']} | {100 * r['accuracy']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% "
                     f"| {100 * r['no_answer_rate']:.1f}% | {100 * r['truncation_rate']:.1f}% "
                     f"| {r['max_new_tokens']} |")
    return "\n".join(lines)


def read_predictions(path: str | Path) -> dict[str, dict[str, bool]]:
    """A predictions file (one JSON object per line with `task`, `id`, `correct`) as {task: {id: correct}},
    tasks and ids in file order. A bad record or a repeated (task, id) is a UserError naming file and line."""
    out: dict[str, dict[str, bool]] = {}
    for lineno, rec in read_jsonl(path, required=("task", "id", "correct")):
        task, qid, correct = rec["task"], rec["id"], rec["correct"]
        if not isinstance(task, str) or not task:
            fail(f"'task' must be a non-empty string, got {task!r}", path, lineno)
        if not isinstance(qid, str):
            fail(f"'id' must be a string, got {qid!r}", path, lineno)
        if not isinstance(correct, bool):
            fail(f"'correct' must be true or false, got {correct!r}", path, lineno)
        answers = out.setdefault(task, {})
        if qid in answers:
            fail(f"question id {qid!r} of task {task} appears twice", path, lineno)
        answers[qid] = correct
    return out


def paired_answers(path_a: str | Path, path_b: str | Path) -> dict[str, tuple[list[bool], list[bool]]]:
    """{task: (A's correct flags, B's correct flags)}, questions matched by id (never by position), in A's order.

    Both files must hold the same tasks and, per task, the same question ids; otherwise a one-line UserError
    against B names the first task or id that differs ("missing" from B, or "not in" A)."""
    a, b = read_predictions(path_a), read_predictions(path_b)
    for task in a:
        if task not in b:
            fail(f"task {task} is missing (it is in {path_a})", path_b)
    for task in b:
        if task not in a:
            fail(f"task {task} is not in {path_a}", path_b)
    pairs = {}
    for task, answers_a in a.items():
        answers_b = b[task]
        missing = [q for q in answers_a if q not in answers_b]
        extra = [q for q in answers_b if q not in answers_a]
        if missing or extra:
            what = (f"question id {missing[0]!r} is missing (it is in {path_a})" if missing
                    else f"question id {extra[0]!r} is not in {path_a}")
            more = len(missing) + len(extra) - 1
            fail(f"task {task}: {what}" + (f"; {more} more ids differ" if more else ""), path_b)
        pairs[task] = ([answers_a[q] for q in answers_a], [answers_b[q] for q in answers_a])
    return pairs


def compare_predictions(path_a: str | Path, path_b: str | Path) -> list[tuple[str, PairedComparison]]:
    """B against A on each task (see `paired_answers`)."""
    return [(task, paired_comparison(*ab)) for task, ab in paired_answers(path_a, path_b).items()]


def format_p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def comparison_line(task: str, c: PairedComparison) -> str:
    """One line per task, ending in `p=<value>`: accuracy A -> B, the difference B - A in points with its 95%
    interval, the discordant questions as A-right-only/B-right-only, and the exact McNemar p."""
    lo, hi = c.ci95
    return (f"{task}: A {100 * c.correct_a / c.n:.1f}% -> B {100 * c.correct_b / c.n:.1f}% (n={c.n}), "
            f"diff {100 * c.diff:+.1f} points [95% CI {100 * lo:+.1f}, {100 * hi:+.1f}], "
            f"discordant {c.only_a}/{c.only_b}, p={format_p(c.p)}")


def main(argv: list[str] | None = None) -> dict | list[tuple[str, PairedComparison]]:
    """Evaluate and return the report (one task's dict, or {"results": [...]}); with --compare, print the
    paired comparisons and return them as [(task, PairedComparison)]."""
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    if args.compare:
        comparisons = compare_predictions(*args.compare)
        for task, c in comparisons:
            print(comparison_line(task, c))
        return comparisons
    out, specs = Path(args.out), task_data(args)  # outputs checked before any model loads or file is written
    check_outputs([("--model", args.model), ("--adapter", args.adapter), *((f"--task {n} data", d) for n, d in specs)],
                  [("--out", out), *((f"the predictions of --task {n}",
                                      out.with_name(f"{out.stem}.{n}.predictions.jsonl")) for n, _ in specs)])
    data = [(load_task(name, path, args), path) for name, path in specs]  # all read before any output
    model, tok, _ = load(args)
    reports = [evaluate(model, tok, task, examples, path, args, out) for (task, examples), path in data]
    report = reports[0] if len(reports) == 1 else {"results": reports}
    if distributed.is_main():
        write_json(out, report)
    print(table(reports))
    return report
