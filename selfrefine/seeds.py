"""Several seeds of the pipeline in one report: each cell's mean and spread over seeds, the paired tests pooled
over seeds and questions, and the same comparisons at the seed level.

Pooling: the (seed, question) pairs of all seeds form one paired sample for McNemar's exact test and the
interval of the difference. The same question appears once per seed, so the pairs are not independent across
seeds (a question easy for both models stays easy); the pooled p is therefore optimistic when seeds agree
question by question, which is why the per-seed tests and the spread are reported beside it.

Seed level: each seed's paired difference is one value, and Student's t gives the interval and test of their
mean. This is the test of "does the effect survive a new seed": it is not optimistic, but with a few seeds it is
wide (with 4 seeds the interval is 3.2 standard errors either side).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .recipes.eval import format_p, paired_answers
from .tasks.stats import PairedComparison, paired_comparison, seed_level


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one seed), min, max and the values themselves."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def across_seeds(reports: dict[int, dict[str, Any]], comparisons: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """{"rows": row -> split -> task -> spread of accuracy (and of no-answer rate),
        "pooled": comparison -> split -> task -> PairedComparison over every seed's questions,
        "seed_level": comparison -> split -> task -> SeedLevel of the seeds' paired differences}."""
    first = next(iter(reports.values()))
    rows: dict[str, Any] = {}
    for row, splits in first["rows"].items():
        rows[row] = {split: {task: {key: spread([r["rows"][row][split][task][key] for r in reports.values()])
                                    for key in ("accuracy", "no_answer_rate")}
                             for task in tasks} for split, tasks in splits.items()}

    def per_comparison(measure: Callable[[str, str, str, str, str], Any]) -> dict[str, Any]:
        """comparison -> split -> task -> asdict(measure(name, a, b, split, task))."""
        return {name: {split: {task: asdict(measure(name, a, b, split, task)) for task in tasks}
                       for split, tasks in first["rows"][a].items()}
                for name, (a, b) in comparisons.items()}

    pooled = per_comparison(lambda name, a, b, split, task: pooled_comparison(reports, a, b, split, task))
    by_seed = per_comparison(lambda name, a, b, split, task: seed_level(
        [r["comparisons"][name][split][task]["diff"] for r in reports.values()]))
    return {"seeds": list(reports), "rows": rows, "pooled": pooled, "seed_level": by_seed}


def pooled_comparison(reports: dict[int, dict[str, Any]], a: str, b: str, split: str, task: str) -> PairedComparison:
    """B against A on one task, every seed's (question, A, B) pairs in one sample."""
    flags_a: list[bool] = []
    flags_b: list[bool] = []
    for r in reports.values():
        fa, fb = paired_answers(r["rows"][a][split][task]["predictions"], r["rows"][b][split][task]["predictions"])[task]
        flags_a += fa
        flags_b += fb
    return paired_comparison(flags_a, flags_b)


def markdown(summary: dict[str, Any], name: Callable[[str], str], comparisons: dict[str, tuple[str, str]]) -> str:
    """Per split and task: each model's mean accuracy +- sd over seeds (min-max), then each pooled paired test,
    then each comparison at the seed level."""
    rows = summary["rows"]
    labels = [f"{name(b)} - {name(a)} ({how})" for how in ("pooled", "seeds") for a, b in comparisons.values()]
    lines = [f"seeds {', '.join(map(str, summary['seeds']))}: mean +- sd over seeds [min, max]; paired differences "
             "pooled over seeds and questions, and over seeds (the mean of the seeds' differences, t interval and "
             "test)", "",
             "| split | task | " + " | ".join(map(name, rows)) + " | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * (len(rows) + 2 * len(comparisons))]
    first = next(iter(rows.values()))
    for split, tasks in first.items():
        for task in tasks:
            cells = []
            for row in rows:
                s = rows[row][split][task]["accuracy"]
                cells.append(f"{100 * s['mean']:.1f}% +- {100 * s['sd']:.1f} [{100 * s['min']:.1f}, {100 * s['max']:.1f}]")
            for name in comparisons:
                c = summary["pooled"][name][split][task]
                lo, hi = c["ci95"]
                cells.append(f"{100 * c['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] p={format_p(c['p'])} "
                             f"(n={c['n']})")
            for name in comparisons:
                cells.append(format_seed_level(summary["seed_level"][name][split][task]))
            lines.append(f"| {split} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_seed_level(s: dict[str, Any]) -> str:
    """"+1.1 [-10.2, +12.4] p=0.78 (4 seeds)" in points; no interval or p for one seed."""
    k = len(s["values"])
    if s["ci95"] is None:
        return f"{100 * s['mean']:+.1f} ({k} seed)"
    lo, hi = s["ci95"]
    return f"{100 * s['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] p={format_p(s['p'])} ({k} seeds)"


def seed_dirs(out: Path, seeds: list[int]) -> dict[int, Path]:
    return {s: out / f"seed{s}" for s in seeds}
