"""Greedy evaluation: accuracy with n and a 95% Wilson interval per task, the share of completions with no stated
answer and the share cut at the token limit (an answer counts only when stated and finished), per-example
predictions beside the report, and a markdown table of the tasks.

--compare A B reads two predictions files of the same questions (no model needed) and prints, per task, the paired
difference B - A with Agresti and Min's 95% interval and the exact McNemar p-value:

    python eval.py --compare runs/sft.arith.predictions.jsonl runs/dpo.arith.predictions.jsonl
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..answers import answer, encode_prompts, load_questions
from ..config import UsageError, setting
from ..decode_step import GRAPH_CHOICES, GRAPHS_HELP, use_static_step
from ..errors import fail
from ..files import read_jsonl, remove_stale_temps, write_json, write_jsonl
from ..flags import nonneg_int, positive_int
from ..paths import check_outputs
from ..runs import git_commit, versions
from ..sampling import SamplingParams
from ..tasks import get_task, wilson_interval
from ..tasks.prompts import TEMPLATES, instruction
from ..tasks.stats import PairedComparison, paired_comparison
from .common import ModelOptions, load, parse_command_line

TASKS = "tasks"
PREDICTION_KEYS = ("task", "id", "prompt", "completion", "finish_reason", "pred", "answer_found", "gold", "correct")


@dataclass
class EvalConfig(ModelOptions):
    model: str | None = setting(None, "Hugging Face model directory (config.json, *.safetensors, tokenizer.json) "
                                "(required unless --compare)", group="model")
    task: list[str] = setting(help="task name, repeatable; NAME=PATH gives its data file inline (required unless "
                              "--compare)", repeat=True, group=TASKS)
    data: list[str] = setting(help="data file(s), in the order of the tasks that need one", repeat=True, group=TASKS)
    split: str = setting("test", "embedded tasks: train or test", group=TASKS)
    size: int | None = setting(None, "embedded tasks: number of generated questions", parse=positive_int, group=TASKS)
    data_seed: int = setting(0, "embedded tasks: generator seed", parse=nonneg_int, group=TASKS)
    limit: int | None = setting(None, "first N questions of each task", parse=positive_int, group=TASKS)
    skip: int = setting(0, "pass over the first N questions of each task first (a validation split: the training "
                        "questions after those trained on)", parse=nonneg_int, group=TASKS)
    prompt: str = setting("cot", "the prompt type", choices=["cot", "direct"])
    batch_size: int = setting(16, "decoding slots", parse=positive_int)
    cuda_graphs: str = setting("auto", GRAPHS_HELP, choices=list(GRAPH_CHOICES))
    max_new_tokens: int = setting(256, "answer budget in tokens (an answer cut here counts as wrong)",
                                  parse=positive_int)
    out: str | None = setting(None, "report JSON; predictions go to OUT-stem.<task>.predictions.jsonl "
                              "(required unless --compare)")
    no_progress: bool = setting(False, "no progress bar")
    compare: list[str] | None = setting(
        None, "compare two predictions files of the same questions instead of evaluating: per task, accuracy "
        "A -> B, the difference B - A with its 95% interval (Agresti-Min), the discordant questions (A right only / "
        "B right only) and the exact McNemar p-value; needs no model", nargs=2, metavar=("A", "B"))

    def check(self) -> None:
        """--model, --task and --out are required when evaluating; --compare takes none of the evaluation inputs."""
        given = {"--model": self.model, "--adapter": self.adapter, "--task": self.task, "--data": self.data,
                 "--out": self.out}
        if self.compare:
            if extra := [flag for flag, value in given.items() if value]:
                raise UsageError(f"--compare reads two predictions files and evaluates nothing; drop {', '.join(extra)}")
        elif missing := [flag for flag in ("--model", "--task", "--out") if not given[flag]]:
            raise UsageError(f"the following arguments are required: {', '.join(missing)} (or --compare A B)")

    def task_data(self) -> list[tuple[str, str | None]]:
        """Each --task with its data file: inline NAME=PATH, else the next --data (generated tasks need none)."""
        pending = list(self.data)
        pairs = []
        for spec in self.task:
            name, _, path = spec.partition("=")
            if not path and get_task(name).needs_data:
                if not pending:
                    fail(f"task {name} needs a data file: --data PATH or --task {name}=PATH")
                path = pending.pop(0)
            pairs.append((name, path or None))
        if pending:
            fail(f"more --data files than tasks that need one: {pending}")
        return pairs

    def predictions_path(self, task: str) -> Path:
        out = Path(self.out)
        return out.with_name(f"{out.stem}.{task}.predictions.jsonl")


def protocol(model, tok, cfg: EvalConfig, kind: str | None) -> dict:
    """Everything that decides the numbers besides the data, so a report can be reproduced or compared fairly.
    A raw task's prompts are sent as written: no template, no instruction."""
    return {"prompt_type": cfg.prompt, "template": TEMPLATES[kind] if kind else "{prompt}",
            "instruction": instruction(kind, cfg.prompt) if kind else None,
            "chat_format": tok.chat_format, "system_prompt": tok.system_prompt,
            "decoding": "greedy", "max_new_tokens": cfg.max_new_tokens,
            "stop_tokens": [tok.decode([i], skip_special=False) for i in tok.stop_ids],
            "model": cfg.model, "adapter": cfg.adapter,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "versions": versions(), "git_commit": git_commit()}


def evaluate(model, tok, cfg: EvalConfig, task: str, path: str | None, loaded) -> dict:
    """One task's report; its predictions are written beside OUT."""
    questions, kind = loaded
    prompts = encode_prompts(tok, questions, cfg.prompt, model.config.max_position_embeddings, source=path)
    rows = answer(model, tok, task, questions, kind, cfg.prompt, prompts,
                  SamplingParams(max_new_tokens=cfg.max_new_tokens), batch_size=cfg.batch_size,
                  progress=not cfg.no_progress, static=use_static_step(cfg.cuda_graphs, model.lm_head.weight.device))
    preds = [{k: rows[(i, 0)][k] for k in PREDICTION_KEYS} for i in range(len(questions))]
    k, n = sum(p["correct"] for p in preds), len(preds)
    pred_path = cfg.predictions_path(task)
    if distributed.is_main():
        write_jsonl(pred_path, preds)
    return {"task": task, "data": path, "split": cfg.split if path is None else None, "skip": cfg.skip,
            "prompt": cfg.prompt,
            "n": n, "correct": k, "accuracy": k / n, "ci95": list(wilson_interval(k, n)),
            "no_answer_rate": sum(not p["answer_found"] for p in preds) / n,
            "truncation_rate": sum(p["finish_reason"] == "length" for p in preds) / n,
            "max_new_tokens": cfg.max_new_tokens,
            "model": cfg.model, "adapter": cfg.adapter, "predictions": str(pred_path),
            "protocol": protocol(model, tok, cfg, kind)}


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
    return paired_grades(read_predictions(path_a), read_predictions(path_b), path_a, path_b)


def paired_grades(a: dict[str, dict[str, bool]], b: dict[str, dict[str, bool]], path_a: str | Path,
                  path_b: str | Path) -> dict[str, tuple[list[bool], list[bool]]]:
    """`paired_answers` of grades already read ({task: {id: correct}}, as `read_predictions` gives them)."""
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
    return run(parse_command_line(EvalConfig, argv, "eval.py", __doc__, argparse.RawDescriptionHelpFormatter))


def run(cfg: EvalConfig) -> dict | list[tuple[str, PairedComparison]]:
    """Evaluate and return the report (one task's dict, or {"results": [...]}); with --compare, print the
    paired comparisons and return them as [(task, PairedComparison)]."""
    if cfg.compare:
        comparisons = compare_predictions(*cfg.compare)
        for task, c in comparisons:
            print(comparison_line(task, c))
        return comparisons
    specs = cfg.task_data()  # outputs checked before any model loads or file is written
    check_outputs([("--model", cfg.model), ("--adapter", cfg.adapter), *((f"--task {n} data", d) for n, d in specs)],
                  [("--out", cfg.out), *((f"the predictions of --task {n}", cfg.predictions_path(n))
                                         for n, _ in specs)])
    data = [load_questions(name, path, cfg.split, cfg.size, cfg.data_seed, cfg.limit, cfg.skip)  # all read before any output
            for name, path in specs]
    model, tok, _ = load(cfg)
    if distributed.is_main():
        remove_stale_temps(Path(cfg.out).parent, [Path(cfg.out).name] + [cfg.predictions_path(n).name for n, _ in specs])
    reports = [evaluate(model, tok, cfg, name, path, loaded) for (name, path), loaded in zip(specs, data)]
    report = reports[0] if len(reports) == 1 else {"results": reports}
    if distributed.is_main():
        write_json(cfg.out, report)
    print(table(reports))
    return report
