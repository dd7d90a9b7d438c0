"""Greedy evaluation: accuracy with n and a 95% Wilson interval per task, per-example predictions
beside the report, and a markdown table when several tasks are evaluated in one call."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import distributed
from ..errors import fail
from ..io import write_json, write_jsonl
from ..sampling import SamplingParams, generate, plan_batches
from ..tasks import Example, Task, extract_answer, get_task, is_correct, render_prompt, wilson_interval
from .common import add_model_args, load

EMBEDDED = ("arith", "arith_ood")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__)
    add_model_args(p)
    p.add_argument("--task", action="append", required=True,
                   help="task name, repeatable; NAME=PATH gives its data file inline")
    p.add_argument("--data", action="append", default=[], help="data file(s), in the order of the tasks that need one")
    p.add_argument("--split", default="test", help="embedded tasks: train or test")
    p.add_argument("--size", type=int, help="embedded tasks: number of generated questions")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="first N questions of each task")
    p.add_argument("--prompt", default="cot", choices=["cot", "direct"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--out", required=True, help="report JSON; predictions go to OUT-stem.<task>.predictions.jsonl")
    p.add_argument("--no-progress", action="store_true")
    return p


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
        pred = extract_answer(c.text, task.kind, e.choices)
        preds.append({"id": e.id, "prompt": prompt, "completion": c.text, "pred": pred, "gold": e.gold,
                      "correct": is_correct(pred, e.gold, task.kind)})
    k, n = sum(p["correct"] for p in preds), len(preds)
    pred_path = out.with_name(f"{out.stem}.{name}.predictions.jsonl")
    if distributed.is_main():
        write_jsonl(pred_path, preds)
    return {"task": name, "data": path, "split": args.split if path is None else None, "prompt": args.prompt,
            "n": n, "correct": k, "accuracy": k / n, "ci95": list(wilson_interval(k, n)),
            "model": args.model, "adapter": args.adapter, "predictions": str(pred_path)}


def table(reports: list[dict]) -> str:
    lines = ["| task | n | accuracy | 95% CI |", "|---|---:|---:|---|"]
    for r in reports:
        lo, hi = r["ci95"]
        lines.append(f"| {r['task']} | {r['n']} | {100 * r['accuracy']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    data = [(load_task(name, path, args), path) for name, path in task_data(args)]  # all read before any output
    model, tok, _ = load(args)
    out = Path(args.out)
    reports = [evaluate(model, tok, task, examples, path, args, out) for (task, examples), path in data]
    report = reports[0] if len(reports) == 1 else {"results": reports}
    if distributed.is_main():
        write_json(out, report)
    print(table(reports))
    return report
