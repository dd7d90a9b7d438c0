"""Choose settings on held-out training questions, never on a test set: each combination of the values given
runs the pipeline's training stages, then SFT and SFT+self-refine answer the config's `eval.validation` split
(training-split questions after those trained on) and nothing else.

    python -m selfrefine.sweep --config demo --out runs/sweep dpo.lr=2e-5,5e-5,1.5e-4 dpo.beta=0.1,0.5

The variants run one after another in OUT, so a stage whose options did not change is reused (SFT and the
samples, when only dpo.* varies; the first key varies slowest). OUT/sweep.json gets each variant as it finishes:
its validation accuracy per task (95% interval), SFT+self-refine against SFT paired on the same questions, and
the variant chosen: the highest mean accuracy of the --select row over the validation tasks (ties: the first).
Every other variant is then compared with the chosen one, paired on the same questions (difference, interval,
exact McNemar p), so a lead of a few questions is shown for what it is. A variant already there, measured under
the same config and code, is not run again.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .config import parse_override
from .errors import cli_main, fail
from .files import read_json, write_json
from .fingerprint import code_version, digest, path_digest
from .log import logger
from .pipeline import (RESULT_KEYS, Pipeline, check_paths, config_inputs, config_parser, format_cell, format_diff,
                       load_config, parse_args, row_name, run_seed)
from .pipeline_config import SPLITS, VALIDATION, apply_overrides, eval_specs
from .recipes.eval import paired_grades, read_predictions
from .tasks.stats import paired_comparison
from .runs import describe


def grid(items: list[str]) -> list[list[str]]:
    """["dpo.lr=1e-5,2e-5", "dpo.beta=0.1"] -> [["dpo.lr=1e-5", "dpo.beta=0.1"], ["dpo.lr=2e-5", "dpo.beta=0.1"]]."""
    keys, values = [], []
    for item in items:
        key, text = parse_override(item)
        if key.startswith("eval."):
            fail(f"{item}: variants are compared on the same questions; vary how the models are made, not eval.*")
        if key in keys:
            fail(f"{item}: {key} given twice; list its values once, comma-separated")
        keys.append(key)
        values.append(text.split(","))
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


def variant_pipelines(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[list[str], dict[str, Any]]],
                                                          list[Pipeline]]:
    """The config, and each variant of the grid (its settings, its config) with its Pipeline into OUT: every one
    built, and so checked, before the first stage runs. Each runs with its own seed (`seed=0,1,2` is a grid too);
    --force redoes the stages once, in the first variant, so that the others still reuse what they share."""
    args.overrides = []
    base = load_config(args)
    variants = [(v, apply_overrides(base, v, args.config)) for v in grid(args.grid)]
    pipelines = [Pipeline(cfg, args.config, Path(args.out), run_seed(args, cfg), args.force and i == 0)
                 for i, (_, cfg) in enumerate(variants)]
    return base, variants, pipelines


def run_variants(variants: list[tuple[list[str], dict[str, Any]]], pipelines: list[Pipeline], path: Path,
                 force: bool, measure_one: Callable[[Pipeline], dict[str, Any]], header: dict[str, Any]) -> list[dict]:
    """Each variant measured in turn into `path` ({**header, "variants": [...]}, rewritten as each finishes, so an
    interrupted sweep keeps what it measured). A variant already there under the same config, seed, code and
    inputs (the model and data files, by content) is not measured again (all are with --force)."""
    done = {v["key"]: v for v in (read_json(path)["variants"] if path.exists() and not force else [])}
    results = []
    for (settings, cfg), pipeline in zip(variants, pipelines):
        inputs = [path_digest(p) for _, p in config_inputs(cfg)]
        key = digest({"config": cfg, "seed": pipeline.seed, "code": code_version(), "inputs": inputs})
        if key not in done:
            logger.info(f"{path.stem}: {' '.join(settings)}")
            done[key] = {"settings": settings, "key": key, **measure_one(pipeline)}
        results.append(done[key])
        write_json(path, {**header, "variants": results})
    return results


def check_held_out(pipeline: Pipeline, source: str) -> None:
    """The validation questions share none with the questions trained on, nor with any evaluation split."""
    val = pipeline.question_prompts(VALIDATION)
    for split in ("train", *SPLITS):
        if shared := len(val & pipeline.question_prompts(split)):
            where = "the training questions (skip past them)" if split == "train" else \
                f"eval.{split}: settings are never chosen on a test set"
            fail(f"eval.{VALIDATION} shares {shared} question(s) with {where}", source)


def measure(pipeline: Pipeline) -> dict[str, Any]:
    """Train (stages up to date are reused), then SFT and every self-refine round on the validation split, each
    round paired with SFT."""
    models = pipeline.train()
    names = pipeline.rows[1:]  # the base model is not what a sweep chooses
    reports = {row: pipeline.evaluate(row, VALIDATION, *models[row]) for row in names}
    rows = {row: {t["task"]: {k: t[k] for k in RESULT_KEYS} for t in reports[row]} for row in names}
    graded = {t["predictions"]: read_predictions(t["predictions"]) for row in names for t in reports[row]}
    paired = {f"{row}_vs_sft": {task: asdict(paired_comparison(*pair)) for a, b in zip(reports["sft"], reports[row])
                                for task, pair in paired_grades(graded[a["predictions"]], graded[b["predictions"]],
                                                                a["predictions"], b["predictions"]).items()}
              for row in names[1:]}
    answers = {row: {task: g for t in reports[row] for task, g in graded[t["predictions"]].items()}
               for row in names}  # per question, so that variants can be paired with each other afterwards
    return {"rows": rows, "comparisons": paired, "answers": answers, "stage_seconds": dict(pipeline.stages.seconds)}


def score(variant: dict[str, Any], row: str) -> float:
    cells = variant["rows"][row].values()
    return sum(c["accuracy"] for c in cells) / len(cells)


def versus_chosen(variants: list[dict[str, Any]], chosen: int, row: str) -> list[dict[str, Any] | None]:
    """Each variant's `row` against the chosen variant's, per task, paired question by question (by id): the
    variant minus the chosen one. None for the chosen variant itself."""
    base = variants[chosen]["answers"][row]
    out: list[dict[str, Any] | None] = []
    for i, v in enumerate(variants):
        if i == chosen:
            out.append(None)
            continue
        other = v["answers"][row]
        if other.keys() != base.keys() or any(other[t].keys() != base[t].keys() for t in base):
            raise ValueError(f"variant {' '.join(v['settings'])} was measured on other validation questions")
        pairs = paired_grades(base, other, " ".join(variants[chosen]["settings"]), " ".join(v["settings"]))
        out.append({t: asdict(paired_comparison(*pair)) for t, pair in pairs.items()})
    return out


def runner_up_line(variants: list[dict[str, Any]], chosen: int, versus: list[dict[str, Any] | None],
                   row: str) -> str:
    """The next best variant against the chosen one, per task, and whether the validation questions can tell the
    two apart at all (exact McNemar p < 0.05)."""
    others = [i for i in range(len(variants)) if i != chosen]
    if not others:
        return "one variant: nothing to compare it with"
    second = max(others, key=lambda i: (score(variants[i], row), -i))
    diffs = versus[second]
    cells = ", ".join(f"{task} {format_diff(c)}" for task, c in diffs.items())
    verdict = ("the validation questions separate them" if any(c["p"] < 0.05 for c in diffs.values()) else
               "not significant: on these questions the two are indistinguishable")
    return f"runner-up ({' '.join(variants[second]['settings'])}) - chosen: {cells}; {verdict}"


def markdown(variants: list[dict[str, Any]], chosen: int, versus: list[dict[str, Any] | None], row: str) -> str:
    """Per variant and task: SFT, then each self-refine round with its difference against SFT and its no-answer
    and truncation rates, then the `row` (the one that chose) against the chosen variant's."""
    rounds = list(variants[0]["rows"])[1:]
    header = " | ".join(f"{row_name(r)} | {row_name(r)} - SFT | no answer / cut" for r in rounds)
    lines = [f"| variant | task | n | SFT | {header} | {row_name(row)}: variant - chosen |",
             "|---|---|---:|---|" + "---|---|---|" * len(rounds) + "---|"]
    for i, v in enumerate(variants):
        name = " ".join(v["settings"]) + (" **(chosen)**" if i == chosen else "")
        for task, sft in v["rows"]["sft"].items():
            cells = [f"{format_cell(v['rows'][r][task])} | {format_diff(v['comparisons'][f'{r}_vs_sft'][task])} | "
                     f"{100 * v['rows'][r][task]['no_answer_rate']:.1f}% / "
                     f"{100 * v['rows'][r][task]['truncation_rate']:.1f}%" for r in rounds]
            against = "-" if versus[i] is None else format_diff(versus[i][task])
            lines.append(f"| {name} | {task} | {sft['n']} | {format_cell(sft)} | " + " | ".join(cells) +
                         f" | {against} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = config_parser("python -m selfrefine.sweep", __doc__, "runs/sweep", "sweep.json")
    p.add_argument("--select", default="self_refine",
                   help="the row whose validation accuracy chooses the variant: sft, self_refine (round 1) or "
                        "self_refine_r<N> (default: self_refine)")
    p.add_argument("grid", nargs="+", metavar="section.key=v1,v2,...",
                   help="the values to try, e.g. dpo.lr=2e-5,5e-5 dpo.beta=0.1,0.5 (every combination; a single "
                        "value just sets it)")
    args = parse_args(p, argv)
    if any(parse_override(item)[0] == "rounds" for item in args.grid):
        fail("a sweep compares the same rows across variants: run one sweep per number of rounds")
    base, variants, pipelines = variant_pipelines(args)
    if not eval_specs(base, VALIDATION):
        fail(f"a sweep measures on eval.{VALIDATION} (held-out training questions, e.g. "
             '{"task": "arith", "split": "train", "skip": 400, "size": 300}); the config has none', args.config)
    out = Path(args.out)
    if missing := [" ".join(v) for (v, _), pl in zip(variants, pipelines) if args.select not in pl.rows[1:]]:
        fail(f"--select {args.select}: not a row of variant(s) {'; '.join(missing)} (rows: "
             f"{', '.join(pipelines[0].rows[1:])})")
    check_paths(base, args.out)
    for pipeline in pipelines:  # a variant may change the questions (train.size, say)
        pipeline.check_unseen(args.config)
        check_held_out(pipeline, args.config)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", describe(base, overrides=args.grid, config_file=args.config))
    path = out / "sweep.json"
    results = run_variants(variants, pipelines, path, args.force, measure, {"select": args.select, "chosen": None})
    chosen = max(range(len(results)), key=lambda i: (score(results[i], args.select), -i))
    versus = versus_chosen(results, chosen, args.select)
    summary = {"select": args.select, "variants": results, "chosen": results[chosen]["settings"],
               "versus_chosen": versus}
    write_json(path, summary)
    print(markdown(results, chosen, versus, args.select))
    print(f"chosen on eval.{VALIDATION} ({args.select}): {' '.join(results[chosen]['settings'])}; -> {path}")
    print(runner_up_line(results, chosen, versus, args.select))
    return summary


if __name__ == "__main__":
    cli_main(main)
