"""Studies and ablations: the whole pipeline once per variant, the test-split results side by side.

    python -m selfrefine.study --config demo --out runs/study_demos train.size=16,32,64,128 sample.size=400
    python -m selfrefine.study --config demo --out runs/ablation_pairs pairs.strategy=paper,cot-vs-direct,correct-vs-wrong
    python -m selfrefine.study --config demo --out runs/ablation_loss dpo.loss=sigmoid,ipo dpo.nll_weight=0,1

The first is the paper's study over the number of demonstrations (train.size demonstrations for SFT; sample.size
pins the self-refine questions, so only the teacher's stand-ins shrink with them). Variants run one after another
in OUT, the first key varying slowest, so the stages they share are reused (SFT and the samples when only pairs.*
or dpo.* vary; the base model's evaluation always). A study reports, it does not choose: settings are chosen on
held-out training questions with `selfrefine.sweep`. OUT/study.json gets each variant as it finishes (its report's
rows and paired comparisons; the predictions files are the last variant's); a variant already there, run under
the same config and code, is not run again. OUT/study.png plots SFT and SFT+self-refine per variant (matplotlib).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import cli_main
from .files import write_json
from .pipeline import RESULT_KEYS, SPLITS, check_paths, config_parser, format_cell, format_diff, parse_args
from .plots import PLOTS_SKIPPED, study_figure
from .runs import describe
from .sweep import run_variants, variant_pipelines

KEPT = ("rows", "comparisons", "tasks", "stage_seconds", "total_seconds")


def kept(report: dict[str, Any]) -> dict[str, Any]:
    """A pipeline report without its predictions paths (the next variant overwrites those files)."""
    rows = {row: {split: {task: {k: cell[k] for k in RESULT_KEYS} for task, cell in tasks.items()}
                  for split, tasks in splits.items()} for row, splits in report["rows"].items()}
    return {**{k: report[k] for k in KEPT}, "rows": rows}


def markdown(variants: list[dict[str, Any]]) -> str:
    """Per variant, split and task: SFT, SFT+self-refine and their paired difference."""
    lines = ["| variant | split | task | n | SFT | SFT+self-refine | SFT+self-refine - SFT |", "|---|---|---|---:|---|---|---|"]
    for v in variants:
        for split in SPLITS:
            for task, sft in v["rows"]["sft"][split].items():
                lines.append(f"| {' '.join(v['settings'])} | {split} | {task} | {sft['n']} | {format_cell(sft)} | "
                             f"{format_cell(v['rows']['self_refine'][split][task])} | "
                             f"{format_diff(v['comparisons']['self_refine_vs_sft'][split][task])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = config_parser("python -m selfrefine.study", __doc__, "runs/study", "study.json and study.png")
    p.add_argument("grid", nargs="+", metavar="section.key=v1,v2,...",
                   help="the variants, e.g. train.size=16,32,64,128 or pairs.strategy=paper,cot-vs-direct (every "
                        "combination; a single value just sets it)")
    args = parse_args(p, argv)
    base, variants, pipelines = variant_pipelines(args)
    check_paths(base, args.out)
    for pipeline in pipelines:  # a variant may change the questions (train.size, say)
        pipeline.check_unseen(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", describe(base, overrides=args.grid, config_file=args.config))
    path = out / "study.json"
    results = run_variants(variants, pipelines, path, args.force, lambda pl: kept(pl.run()), {})
    print(markdown(results))
    figure = out / "study.png"
    print(f"figure -> {figure}" if study_figure(results, figure) is not None else PLOTS_SKIPPED)
    print(f"study -> {path}")
    return {"variants": results}


if __name__ == "__main__":
    cli_main(main)
