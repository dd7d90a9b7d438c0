"""Nothing lost (issue 15): an output path that is an input, lies inside one, holds one, collides with another
output or cannot be written is refused by every script, as a real subprocess, before any model loads.

Each case must end like `tests/test_faults.py`'s: exit code 2, one stderr line `error: FILE: message` naming the
file, no traceback, and no file under the fixture tree changed: contents, mtimes (of folders too, so a temp file
made and removed counts) and the list of paths are compared before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from safetensors.torch import load_file

from tests.helpers import make_tiny_model_dir
from tests.test_faults import DPO, ENV, EVAL, PIPELINE, REPO, SAMPLE, SFT, Case, sample_record, write_jsonl, write_text


def tree_state(root: Path) -> dict[str, tuple]:
    """Relative path -> (content hash, mtime) of files, ("dir", mtime) of folders, under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (("dir",) if p.is_dir() else (hashlib.sha256(p.read_bytes()).hexdigest(),)) \
            + (st.st_mtime_ns,)
    return out


def sharded(model: Path, dst: Path, shard_name: Callable[[Path], str]) -> str:
    """A copy of `model` whose index names a valid shard outside its directory."""
    shutil.copytree(model, dst)
    outside = dst.parent / f"{dst.name}_shard.safetensors"
    shutil.move(dst / "model.safetensors", outside)
    names = list(load_file(outside))
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: shard_name(outside) for n in names}}))
    return str(dst)


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("paths")
    model = make_tiny_model_dir(root / "model", num_layers=1)
    d = root / "data"
    d.mkdir()
    out = root / "outputs"
    out.mkdir()
    samples = write_jsonl(out / "samples.jsonl", [sample_record("arith", 1), sample_record("arith", 1, "direct", False)])
    run = out / "dpo_run"  # an earlier run folder, holding the pairs it was given
    run.mkdir()
    write_jsonl(run / "pairs.jsonl", [{"prompt": "What is 1 plus 1?", "chosen": "2", "rejected": "3"}])
    cfg = {"train": {"task": "arith", "size": 4}, "sft": {}, "sample": {}, "dpo": {},
           "eval": {"in_domain": {"task": "arith"}, "out_of_domain": {"task": "gsm8k", "data": str(d / "gsm.jsonl")}}}
    return SimpleNamespace(
        root=root, model=str(model), out=out, samples=samples, run=str(run), pairs=str(run / "pairs.jsonl"),
        prompts=write_jsonl(d / "prompts.jsonl", [{"id": 1, "prompt": "Hi"}, {"id": 2, "prompt": "Hello"}]),
        gsm=write_jsonl(d / "gsm.jsonl", [{"question": "What is 2 plus 3?", "answer": "2 + 3 = 5.\n#### 5"}]),
        demos=write_jsonl(d / "demos.jsonl", [{"id": "q1", "prompt": "What is 1 plus 1?", "completion": "2"}]),
        report=write_text(out / "report.json", '{"old": true}\n'),
        cfg=write_text(d / "cfg.json", json.dumps(cfg)),
        cfg_teacher=write_text(d / "cfg_teacher.json", json.dumps(
            {**cfg, "teacher": {"type": "model", "model": "{teacher}"}})),
        shard_up=sharded(model, root / "shard_up", lambda p: f"../{p.name}"),
        shard_abs=sharded(model, root / "shard_abs", lambda p: str(p)),
    )


def new(w: SimpleNamespace, name: str) -> str:
    return str(w.out / name)


CASES: dict[str, Callable[[SimpleNamespace], Case]] = {
    # 1. an output that is an input
    "sample_out_is_data": lambda w: Case(
        SAMPLE + ["--model", w.model, "--task", "raw", "--data", w.prompts, "--out", w.prompts], w.prompts, None,
        "--out is also the --data input"),
    "sample_demos_out_is_out": lambda w: Case(
        SAMPLE + ["--model", w.model, "--task", "arith", "--limit", "1", "--keep-correct", "--demos-out", w.samples,
                  "--out", w.samples], w.samples, None, "--demos-out and --out are the same file"),
    "sample_out_inside_model": lambda w: Case(
        SAMPLE + ["--model", w.model, "--task", "arith", "--limit", "1", "--out", f"{w.model}/samples.jsonl"],
        f"{w.model}/samples.jsonl", None, "inside the --model input"),
    "sample_rationales_demos_out_is_data": lambda w: Case(
        ["sample.py", "--from-rationales", "--task", "gsm8k", "--data", w.gsm, "--demos-out", w.gsm], w.gsm, None,
        "--demos-out is also the --data input"),
    "eval_out_is_test_set": lambda w: Case(
        EVAL + ["--model", w.model, "--task", f"gsm8k={w.gsm}", "--out", w.gsm], w.gsm, None,
        "--out is also the --task gsm8k data input"),
    "eval_task_given_twice": lambda w: Case(
        EVAL + ["--model", w.model, "--task", "arith", "--task", "arith", "--limit", "1", "--out", w.report],
        f"{w.out}/report.arith.predictions.jsonl", None, "given twice"),
    "eval_predictions_overwrite_data": lambda w: Case(
        EVAL + ["--model", w.model, "--task", "gsm8k", "--data", f"{w.out}/r.gsm8k.predictions.jsonl",
                "--out", f"{w.out}/r.json"], f"{w.out}/r.gsm8k.predictions.jsonl", None, "is also the --task gsm8k"),
    "sft_out_is_model": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.demos, "--out", w.model], w.model, None, "also the --model input"),
    "sft_out_inside_model": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.demos, "--out", f"{w.model}/run"], f"{w.model}/run", None,
        "inside the --model input"),
    "sft_out_holds_data": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.demos, "--out", str(Path(w.demos).parent)], str(Path(w.demos).parent),
        None, "holds the --data input"),
    "sft_out_is_data_file": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.demos, "--out", w.demos], w.demos, None, "also the --data input"),
    "sft_out_is_adapter": lambda w: Case(
        SFT + ["--model", w.model, "--adapter", w.run, "--data", w.demos, "--out", w.run], w.run, None,
        "also the --adapter input"),
    "dpo_out_holds_pairs": lambda w: Case(
        DPO + ["--model", w.model, "--pairs", w.pairs, "--out", w.run, "--resume"], w.run, None,
        "holds the --pairs input"),
    "dpo_out_is_samples": lambda w: Case(
        DPO + ["--model", w.model, "--samples", w.samples, "--task", "arith", "--out", w.samples], w.samples, None,
        "also the --samples input"),
    "dpo_out_is_demos": lambda w: Case(
        DPO + ["--model", w.model, "--samples", w.samples, "--demos", w.demos, "--out", w.demos], w.demos, None,
        "also the --demos input"),
    "pipeline_out_is_model": lambda w: Case(
        PIPELINE + ["--config", w.cfg, "--model", w.model, "--out", w.model], w.model, None, "also the --model input"),
    "pipeline_out_inside_model": lambda w: Case(
        PIPELINE + ["--config", w.cfg, "--model", w.model, "--out", f"{w.model}/run"], f"{w.model}/run", None,
        "inside the --model input"),
    "pipeline_out_inside_teacher": lambda w: Case(
        PIPELINE + ["--config", w.cfg_teacher, "--model", w.shard_abs, "--teacher", w.model, "--out",
                    f"{w.model}/run"], f"{w.model}/run", None, "inside the --teacher input"),
    "pipeline_out_is_eval_data": lambda w: Case(
        PIPELINE + ["--config", w.cfg, "--model", w.model, "--out", w.gsm], w.gsm, None, "eval data of gsm8k"),
    # 2. an index that names shards outside the model directory
    "shard_outside_model_dir": lambda w: Case(
        SAMPLE + ["--model", w.shard_up, "--task", "arith", "--limit", "1", "--out", new(w, "s.jsonl")],
        f"{w.shard_up}/model.safetensors.index.json", None, "outside the model directory"),
    "shard_absolute_path": lambda w: Case(
        EVAL + ["--model", w.shard_abs, "--task", "arith", "--limit", "1", "--out", new(w, "r.json")],
        f"{w.shard_abs}/model.safetensors.index.json", None, "outside the model directory"),
    # 3. outputs that cannot be written, found before the model loads
    "eval_out_is_directory": lambda w: Case(
        EVAL + ["--model", w.model, "--task", "arith", "--limit", "1", "--out", w.run], w.run, None,
        "is a directory"),
    "sample_out_is_directory": lambda w: Case(
        SAMPLE + ["--model", w.model, "--task", "arith", "--limit", "1", "--out", str(w.out)], str(w.out), None,
        "is a directory"),
    "eval_out_under_a_file": lambda w: Case(
        EVAL + ["--model", w.model, "--task", "arith", "--limit", "1", "--out", f"{w.report}/sub/r.json"],
        f"{w.report}/sub/r.json", None, "is a file, not a directory"),
    "sft_out_is_a_file": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.demos, "--out", w.report], w.report, None, "not a directory"),
    "pipeline_out_is_a_file": lambda w: Case(
        PIPELINE + ["--config", w.cfg, "--model", w.model, "--out", w.report], w.report, None, "not a directory"),
}


def run_case(case: Case, w: SimpleNamespace) -> None:
    before = tree_state(w.root)
    r = subprocess.run([sys.executable, *case.argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith(f"error: {case.file}: "), lines[0]
    assert case.says in lines[0], lines[0]
    after = tree_state(w.root)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


@pytest.mark.parametrize("name", list(CASES))
def test_output_path_mistake_is_one_line_error_and_changes_nothing(name: str, w: SimpleNamespace):
    run_case(CASES[name](w), w)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_folder_is_refused_before_the_model_loads(w: SimpleNamespace):
    ro = w.root / "read_only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    try:
        run_case(Case(EVAL + ["--model", w.model, "--task", "arith", "--limit", "1", "--out", f"{ro}/r.json"],
                      f"{ro}/r.json", None, "not writable"), w)
    finally:
        ro.chmod(0o755)
