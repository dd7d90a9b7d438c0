"""cli.py and pyproject.toml: an editable install gives console scripts that work from any directory."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from selfrefine import pipeline

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_console_scripts_point_at_callables():
    assert set(PROJECT["scripts"]) == {f"selfrefine-{n}" for n in ("sft", "dpo", "sample", "eval", "pipeline", "sweep", "study")}
    for target in PROJECT["scripts"].values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_runtime_dependencies_are_requirements_txt():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(PROJECT["dependencies"]) == sorted(ln for ln in lines if ln)


def test_configs_ship_in_the_package_and_resolve_by_name(tmp_path, monkeypatch):
    assert (ROOT / "configs").resolve() == pipeline.CONFIGS  # README's configs/NAME.json paths still work
    monkeypatch.chdir(tmp_path)
    assert pipeline.config_path("gsm8k_cpu") == pipeline.config_path("gsm8k_cpu.json") == \
        str(pipeline.CONFIGS / "gsm8k_cpu.json")
    (tmp_path / "gsm8k_cpu.json").write_text("{}")
    assert pipeline.config_path("gsm8k_cpu.json") == "gsm8k_cpu.json"  # a file here wins over a shipped name
    assert pipeline.config_path("nope") == "nope"  # left for the loader's file-not-found error


@pytest.mark.slow
def test_editable_install_runs_the_console_scripts_from_elsewhere(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: the install writes *.egg-info next to pyproject.toml
    shutil.copytree(ROOT / "selfrefine", src / "selfrefine", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"  # the installed dependencies, pip and setuptools come through --system-site-packages
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e"]
    subprocess.run([*pip, str(src)], check=True, capture_output=True)
    # SETUPTOOLS_USE_DISTUTILS: without it setuptools' distutils shim warns on stderr in such a venv
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "SETUPTOOLS_USE_DISTUTILS": "stdlib"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([str(venv / "bin" / "selfrefine-pipeline"), "--help"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "gsm8k_cpu" in out and "--seeds" in out
    out = subprocess.run([str(venv / "bin" / "selfrefine-eval"), "--task", "arith"], cwd=elsewhere, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr  # the one-line error, no traceback
