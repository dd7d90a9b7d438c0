"""Figures of a pipeline run: OUT/report.png (accuracy per model, split and task) and OUT/training.png (the
SFT and DPO curves).

    python -m selfrefine.plots OUT      renders a finished run's figures again

matplotlib is optional (bash install.sh --plots): it is imported inside the functions, so the library works
without it, and `write_run_figures` then writes nothing. Figures are drawn on the Agg canvas, never through
pyplot, so no display and no global figure state are involved.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import parse_override
from .errors import cli_main, fail
from .files import read_json, read_jsonl
from .flags import Parser
from .recipes.eval import format_p

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (bash install.sh --plots)"
COMPARISON = "self_refine_vs_sft"  # the paper's claim: what the subtitle of every panel tests


def new_figure(nrows: int, ncols: int, panel: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A figure of nrows x ncols panels of `panel` inches on an Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)


def split_tasks(row: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The (split, task) cells of a report row: one panel each (tasks are never pooled)."""
    return [(split, task) for split, tasks in row.items() for task in tasks]


def cell_panels(n: int, panel: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """`n` panels, three to a row, the unused places of the last row removed."""
    ncols = min(n, 3)
    fig, axes = new_figure(-(-n // ncols), ncols, panel)
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def interval_bars(stats: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Accuracies and their 95% intervals as matplotlib's asymmetric error bars ([below], [above])."""
    acc = [s["accuracy"] for s in stats]
    return acc, [[a - s["ci95"][0] for a, s in zip(acc, stats)], [s["ci95"][1] - a for a, s in zip(acc, stats)]]


def report_figure(report: dict[str, Any], path: str | os.PathLike) -> Figure:
    """One panel per (split, task): accuracy of each model with its 95% interval (one seed), or the mean over
    seeds with min-max bars and each seed as a dot (an across-seeds report), so a reader sees the spread
    before trusting a difference; the subtitle gives SFT+self-refine - SFT with its paired p."""
    from .pipeline import row_name  # here, not at the top: the pipeline imports this module

    rows, tests = report["rows"], report.get("comparisons") or report["pooled"]
    cells = split_tasks(next(iter(rows.values())))
    fig, axes = cell_panels(len(cells), (1.2 + 1.2 * len(rows), 3.6))
    for ax, (split, task) in zip(axes, cells):
        stats = [row[split][task] for row in rows.values()]
        test = tests[COMPARISON][split][task]
        if "seeds" in report:
            acc = [s["accuracy"]["mean"] for s in stats]
            err = [[a - s["accuracy"]["min"] for a, s in zip(acc, stats)],
                   [s["accuracy"]["max"] - a for a, s in zip(acc, stats)]]
            for x, s in enumerate(stats):
                ax.plot([x] * len(s["accuracy"]["values"]), s["accuracy"]["values"], "k.", zorder=3)
            n = f"n={test['n']} over {len(report['seeds'])} seeds"
        else:
            acc, err = interval_bars(stats)
            n = f"n={stats[0]['n']}"
        ax.bar(range(len(stats)), acc, yerr=err, capsize=4, color="C0", alpha=0.7)
        ax.set_xticks(range(len(stats)), list(map(row_name, rows)), rotation=15)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        lo, hi = test["ci95"]
        ax.set_title(f"{split} / {task} ({n})\nSFT+self-refine - SFT: {100 * test['diff']:+.1f} pts "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}], p={format_p(test['p'])}", fontsize=9)
    fig.savefig(path, dpi=100)
    return fig


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def study_figure(variants: list[dict[str, Any]], path: str | os.PathLike) -> Figure | None:
    """A study (`selfrefine.study`): one panel per (split, task), SFT and SFT+self-refine accuracy with their 95%
    intervals against the variant, so a trend (over the number of demonstrations, say) reads at a glance: joined by
    lines where every setting is a number, unjoined where a variant is a kind (pairs.strategy=paper, say), which
    has no order to trend along. None, and nothing written, without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from .pipeline import row_name  # here, not at the top: the pipeline imports this module

    cells = split_tasks(variants[0]["rows"]["sft"])
    fmt = "o-" if all(is_number(parse_override(s)[1]) for v in variants for s in v["settings"]) else "o"
    fig, axes = cell_panels(len(cells), (1.5 + 0.9 * len(variants), 3.6))
    for ax, (split, task) in zip(axes, cells):
        for i, row in enumerate(("sft", "self_refine")):
            acc, err = interval_bars([v["rows"][row][split][task] for v in variants])
            x = [j + 0.08 * (i - 0.5) for j in range(len(variants))]  # side by side, not on top of each other
            ax.errorbar(x, acc, yerr=err, fmt=fmt, capsize=3, label=row_name(row))
        ax.set_xticks(range(len(variants)), [" ".join(v["settings"]) for v in variants], rotation=20, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{split} / {task} (n={variants[0]['rows']['sft'][split][task]['n']})", fontsize=9)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return fig


def plot_series(ax: Axes, records: list[dict[str, Any]], series: dict[str, str], title: str) -> None:
    """Each metric key of `series` (label: key) against step, from the records that have it."""
    for label, key in series.items():
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), ".-" if len(points) < 20 else "-", label=label)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")


def training_figure(sft_metrics: list[dict[str, Any]], dpo_metrics: list[dict[str, Any]],
                    path: str | os.PathLike) -> Figure:
    """The curves that tell a healthy run from a broken one: both losses against their validation loss
    (overfitting), the DPO reward margin (is the preference learnt) and the chosen and rejected log-probs
    (is the margin bought by pushing both down)."""
    losses = {"train": "loss", "validation": "val_loss"}
    fig, axes = new_figure(2, 2, (5, 3.2))
    plot_series(axes[0], sft_metrics, losses, "SFT loss")
    plot_series(axes[1], dpo_metrics, losses, "DPO loss")
    plot_series(axes[2], dpo_metrics, {"margin": "rewards/margin"}, "DPO reward margin")
    plot_series(axes[3], dpo_metrics, {"chosen": "logps/chosen", "rejected": "logps/rejected"}, "DPO log-probs")
    fig.savefig(path, dpi=100)
    return fig


def metrics(path: Path) -> list[dict[str, Any]]:
    return [rec for _, rec in read_jsonl(path, required=("step",), allow_empty=True)] if path.is_file() else []


def write_run_figures(out_dir: str | os.PathLike) -> list[Path]:
    """OUT/report.png and, when OUT holds a training stage, OUT/training.png; [] without matplotlib, so a run
    never fails for want of a figure (the caller prints PLOTS_SKIPPED)."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    out = Path(out_dir)
    written = [out / "report.png"]
    report_figure(read_json(out / "report.json"), written[0])
    sft, dpo = metrics(out / "sft" / "metrics.jsonl"), metrics(out / "dpo" / "metrics.jsonl")
    if sft or dpo:
        written.append(out / "training.png")
        training_figure(sft, dpo, written[1])
    return written


def figures_line(out_dir: str | os.PathLike) -> str:
    """The run's figures written, as the one line the pipeline prints after its report."""
    written = write_run_figures(out_dir)
    return f"figures -> {', '.join(map(str, written))}" if written else PLOTS_SKIPPED


def main(argv: list[str] | None = None) -> list[Path]:
    p = Parser(prog="python -m selfrefine.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a pipeline output folder (holding report.json)")
    written = write_run_figures(p.parse_args(argv).out)
    if not written:
        fail(PLOTS_SKIPPED)
    for path in written:
        print(f"figure -> {path}")
    return written


if __name__ == "__main__":
    cli_main(main)
