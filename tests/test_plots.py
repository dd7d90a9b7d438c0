"""plots.py: the run's figures render from trimmed real reports and metrics, and matplotlib stays optional."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfrefine import plots
from selfrefine.errors import UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "plots"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def metrics(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def image_shape(path: Path) -> tuple[int, ...]:
    """The PNG's (height, width, channels), after checking it is a PNG at all."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path).shape


def run_dir(tmp_path: Path, report: str = "report.json") -> Path:
    """A pipeline output folder as the pipeline leaves it: report.json, sft/ and dpo/ metrics."""
    shutil.copy(FIXTURES / report, tmp_path / "report.json")
    for stage in ("sft", "dpo"):
        (tmp_path / stage).mkdir()
        shutil.copy(FIXTURES / f"{stage}_metrics.jsonl", tmp_path / stage / "metrics.jsonl")
    return tmp_path


@pytest.mark.parametrize("name", ["report.json", "report_seeds.json"])
def test_report_figure_has_one_panel_per_split_and_task(tmp_path, name):
    pytest.importorskip("matplotlib")
    report = load(name)
    cells = [(s, t) for s, tasks in report["rows"]["sft"].items() for t in tasks]
    fig = plots.report_figure(report, tmp_path / "report.png")
    assert len(fig.axes) == len(cells) == (3 if name == "report.json" else 2)
    titles = [ax.get_title() for ax in fig.axes]
    for (split, task), title in zip(cells, titles):
        assert title.startswith(f"{split} / {task} (n=") and "SFT+self-refine - SFT" in title and "p=" in title
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["base", "SFT", "SFT+self-refine"]
    height, width, _ = image_shape(tmp_path / "report.png")
    assert 300 <= height <= 2000 and 500 <= width <= 3000


def test_across_seeds_panels_show_each_seed(tmp_path):
    pytest.importorskip("matplotlib")
    report = load("report_seeds.json")
    fig = plots.report_figure(report, tmp_path / "report.png")
    dots = [line for line in fig.axes[0].lines if line.get_marker() == "."]
    assert len(dots) == 3 and all(len(d.get_ydata()) == len(report["seeds"]) for d in dots)
    assert "over 2 seeds" in fig.axes[0].get_title()


def test_training_figure_plots_every_curve(tmp_path):
    pytest.importorskip("matplotlib")
    fig = plots.training_figure(metrics("sft_metrics.jsonl"), metrics("dpo_metrics.jsonl"), tmp_path / "t.png")
    assert [ax.get_title() for ax in fig.axes] == ["SFT loss", "DPO loss", "DPO reward margin", "DPO log-probs"]
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 1, 2]
    sft_val = fig.axes[0].lines[1]
    assert list(sft_val.get_xdata()) == [4, 8]  # validation points sit at their own steps
    assert image_shape(tmp_path / "t.png")[:2] == (640, 1000)


def test_training_figure_without_dpo_marks_the_empty_panels(tmp_path):
    pytest.importorskip("matplotlib")
    fig = plots.training_figure(metrics("sft_metrics.jsonl"), [], tmp_path / "t.png")
    assert [len(ax.lines) for ax in fig.axes] == [2, 0, 0, 0]
    assert all(ax.texts[0].get_text() == "no records" for ax in fig.axes[1:])


def test_write_run_figures_writes_both_and_names_them(tmp_path):
    pytest.importorskip("matplotlib")
    out = run_dir(tmp_path)
    assert plots.figures_line(out) == f"figures -> {out / 'report.png'}, {out / 'training.png'}"
    assert all(len(image_shape(p)) == 3 for p in (out / "report.png", out / "training.png"))


def test_write_run_figures_across_seeds_has_no_training_figure(tmp_path):
    pytest.importorskip("matplotlib")
    shutil.copy(FIXTURES / "report_seeds.json", tmp_path / "report.json")
    assert plots.write_run_figures(tmp_path) == [tmp_path / "report.png"]


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    out = run_dir(tmp_path)
    assert plots.write_run_figures(out) == []
    assert plots.figures_line(out) == plots.PLOTS_SKIPPED and "bash install.sh --plots" in plots.PLOTS_SKIPPED
    with pytest.raises(UserError, match="plots skipped"):  # asked for by name, no figure is an error
        plots.main([str(out)])
    assert not list(out.glob("*.png"))


def test_cli_renders_again_and_fails_in_one_line_without_a_report(tmp_path):
    pytest.importorskip("matplotlib")
    cli = [sys.executable, "-m", "selfrefine.plots"]
    cwd = Path(__file__).resolve().parent.parent
    run = subprocess.run([*cli, str(run_dir(tmp_path))], capture_output=True, text=True, cwd=cwd)
    assert run.returncode == 0 and run.stdout.count("figure -> ") == 2, run.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run([*cli, str(empty)], capture_output=True, text=True, cwd=cwd)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"error: {empty / 'report.json'}: file not found\n"
