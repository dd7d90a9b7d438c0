"""log.py: the "selfrefine" logger's lines on the current stdout, and every script's --quiet / --verbose."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from selfrefine import log
from selfrefine.config import parser
from selfrefine.errors import UserError
from selfrefine.progress import progress_bar
from selfrefine.recipes import dpo, eval as eval_recipe, sample, sft
from selfrefine.recipes.common import ModelOptions
from tests.helpers import make_tiny_model_dir

MODEL = ["--model", "m", "--out", "o"]
SCRIPTS = [(sft.main, sft.SFTConfig, [*MODEL, "--data", "d"]), (dpo.main, dpo.DPOConfig, [*MODEL, "--pairs", "p"]),
           (sample.main, sample.SampleConfig, [*MODEL, "--task", "arith"]),
           (eval_recipe.main, eval_recipe.EvalConfig, [*MODEL, "--task", "arith"])]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def sft_run(tiny_dir: Path, tmp_path: Path, *flags: str) -> None:
    """Two steps on completions longer than --max-len: an info line ("SFT: ...") and a warning (cut completions)."""
    tmp_path.mkdir(exist_ok=True)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"What is {i} plus 3?", "completion": "The answer is " * 8})
                             + "\n" for i in range(4)), encoding="utf-8")
    sft.main(["--model", str(tiny_dir), "--data", str(demos), "--out", str(tmp_path / "run"), "--max-steps", "2",
              "--batch-size", "2", "--max-len", "24", *flags])


def test_lines_go_to_the_stdout_of_the_moment_at_each_level(monkeypatch):
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", swapped)  # as capsys does, after the handler was made
    log.logger.info("info line")
    log.logger.debug("debug line")
    log.set_level(quiet=True)
    log.logger.info("hidden")
    log.logger.warning("warning: kept")
    log.set_level(verbose=True)
    log.logger.debug("debug shown")
    assert swapped.getvalue() == "info line\nwarning: kept\ndebug shown\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_turns_progress_bars_off(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not progress_bar(total=1, file=Terminal()).disable  # someone watches
    log.set_level(quiet=True)
    assert progress_bar(total=1, file=Terminal()).disable


def test_quiet_keeps_warnings_and_drops_information(tiny_dir: Path, tmp_path: Path, capsys):
    sft_run(tiny_dir, tmp_path / "loud")
    loud = capsys.readouterr().out
    assert "SFT: " in loud and "adapter -> " in loud and "warning: 4 completion(s) cut at --max-len 24" in loud
    sft_run(tiny_dir, tmp_path / "quiet", "--quiet")
    assert capsys.readouterr().out == "warning: 4 completion(s) cut at --max-len 24 (their end-of-turn token is lost)\n"
    assert (tmp_path / "quiet" / "run" / "adapter").is_dir()


def test_quiet_still_prints_the_result_table(tiny_dir: Path, tmp_path: Path, capsys):
    eval_recipe.main(["--model", str(tiny_dir), "--task", "arith", "--size", "2", "--max-new-tokens", "3",
                      "--out", str(tmp_path / "r.json"), "--quiet"])
    assert capsys.readouterr().out.startswith("| task | n | accuracy |")


def test_verbose_shows_debug_lines(tiny_dir: Path, tmp_path: Path, capsys):
    sft_run(tiny_dir, tmp_path, "--verbose")
    printed = capsys.readouterr().out
    assert f"loading {tiny_dir} as torch.float32 on cpu" in printed and '"step": 2' in printed


@pytest.mark.parametrize("main, cls, argv", SCRIPTS)
def test_every_script_has_quiet_and_verbose_but_not_both(main, cls, argv, capsys):
    help_text = parser(cls, "x.py", None).format_help()
    assert "--quiet" in help_text and "--verbose" in help_text
    with pytest.raises(SystemExit) as e:
        main([*argv, "--quiet", "--verbose"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --quiet and --verbose contradict each other: give one (see ")


def test_library_configs_refuse_both_too():
    with pytest.raises(UserError, match="--quiet and --verbose"):
        ModelOptions(model="m", quiet=True, verbose=True)


def test_resume_and_partial_samples_ignore_the_flags(tiny_dir: Path, tmp_path: Path):
    """How much a run says is not what it computes: a resume may change it."""
    sft_run(tiny_dir, tmp_path)
    sft.main(["--model", str(tiny_dir), "--data", str(tmp_path / "demos.jsonl"), "--out", str(tmp_path / "run"),
              "--max-steps", "2", "--batch-size", "2", "--max-len", "24", "--resume", "--quiet"])
    assert "quiet" not in sample.partial_header(sample.SampleConfig(model="m", task="arith", out="o", quiet=True))
