"""Resumes that must not mix old and new data, and logs torn by a kill, through the real command lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model_dir
from tests.test_faults import ENV, REPO, tree_hash, write_jsonl


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)


def one_line_error(r: subprocess.CompletedProcess, file: Path, says: str) -> None:
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith(f"error: {file}") and says in lines[0], lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("model") / "m")


def demos(path: Path, n: int, tag: str = "") -> str:
    return write_jsonl(path, [{"prompt": f"What is {i} plus 1?{tag}", "completion": f"{i} + 1 = {i + 1}."}
                              for i in range(n)])


def test_sft_resume_after_the_data_was_edited_is_refused(model: Path, tmp_path: Path):
    data, out = demos(tmp_path / "d.jsonl", 8), tmp_path / "run"
    args = ["train_sft.py", "--model", str(model), "--data", data, "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--max-len", "64", "--lora-r", "2"]
    assert run(*args).returncode == 0
    demos(tmp_path / "d.jsonl", 8, tag=" (edited)")
    before = tree_hash(out)
    one_line_error(run(*args, "--resume", "--allow-config-change"), tmp_path / "d.jsonl",
                   "--data changed since this run started")
    assert tree_hash(out) == before


def test_resume_that_fails_at_the_checkpoint_leaves_run_json_alone(model: Path, tmp_path: Path):
    """--allow-config-change accepts the new --lora-r, then the checkpoint does not fit: run.json is as it was."""
    data, out = demos(tmp_path / "d.jsonl", 8), tmp_path / "run"
    args = ["train_sft.py", "--model", str(model), "--data", data, "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--max-len", "64", "--lora-r", "2", "--save-every", "1"]
    assert run(*args).returncode == 0 and (out / "checkpoint.pt").exists()
    before = tree_hash(out)
    changed = [a if a != "2" or args[i - 1] != "--lora-r" else "4" for i, a in enumerate(args)]
    one_line_error(run(*changed, "--max-steps", "3", "--resume", "--allow-config-change"), out / "checkpoint.pt",
                   "checkpoint does not match")
    assert tree_hash(out) == before
    ok = run(*args, "--max-steps", "3", "--resume", "--allow-config-change")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads((out / "run.json").read_text())["resumed"]) == 1  # only the resume that went on


def test_sample_resume_drops_a_torn_line_and_refuses_an_edited_data_file(model: Path, tmp_path: Path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prompt": f"Say {i}."} for i in range(4)])
    out = tmp_path / "s.jsonl"
    args = ["sample.py", "--model", str(model), "--task", "raw", "--data", prompts, "--max-new-tokens", "4",
            "--batch-size", "2", "--out", str(out)]
    assert run(*args).returncode == 0
    full = out.read_text()
    # An interrupted run: the header and the first batch's two samples, then a torn third line.
    from selfrefine.config import parse
    from selfrefine.recipes import sample

    header = sample.partial_header(parse(sample.SampleConfig, args[1:], "sample.py"))
    done = [{**json.loads(line), "_q": i} for i, line in enumerate(full.splitlines()[:2])]
    partial = out.with_name(out.name + ".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in [{"_header": header}, *done]) + '{"task": "ra')
    out.unlink()
    r = run(*args, "--resume")
    assert r.returncode == 0 and "dropped a torn last line" in r.stdout, r.stderr
    assert out.read_text() == full and not partial.exists()
    # The same interruption, then the prompts file edited in place: the old samples must not be reused.
    partial.write_text("".join(json.dumps(r) + "\n" for r in [{"_header": header}, *done]))
    write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prompt": f"Say {i + 1}."} for i in range(4)])
    one_line_error(run(*args, "--resume"), partial, "--data changed since the partial samples were made")


def test_sft_resume_drops_a_torn_metrics_line_and_never_logs_a_step_twice(model: Path, tmp_path: Path):
    data, out = demos(tmp_path / "d.jsonl", 8), tmp_path / "run"
    args = ["train_sft.py", "--model", str(model), "--data", data, "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--max-len", "64", "--lora-r", "2"]
    assert run(*args).returncode == 0
    metrics = out / "metrics.jsonl"
    logged = metrics.read_text()
    with open(metrics, "a") as f:
        f.write('{"step": 3, "lo')  # a kill during an append
    r = run(*args, "--resume")
    assert r.returncode == 0 and "dropped a torn last line" in r.stdout, r.stderr
    assert metrics.read_text() == logged
    (out / "checkpoint.pt").unlink()  # a kill before the first checkpoint: the run starts over from step 0
    r = run(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_stale_temporaries_of_a_killed_write_are_removed_at_start(model: Path, tmp_path: Path):
    """What a kill during an atomic write leaves (a temp checkpoint, a half-written merged model, a temp samples
    file) is removed, and said, when the next run into the same place starts; anything else stays."""
    data, out = demos(tmp_path / "d.jsonl", 8), tmp_path / "run"
    args = ["train_sft.py", "--model", str(model), "--data", data, "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--max-len", "64", "--lora-r", "2"]
    assert run(*args).returncode == 0
    stale = [out / ".checkpoint.pt.k1ll3d00.tmp", out / "adapter" / ".adapter_model.safetensors.k1ll3d00.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    (out / ".merged.k1ll3d00.tmp").mkdir()
    mine = out / "notes.tmp"
    mine.write_text("keep")
    r = run(*args, "--max-steps", "3", "--resume", "--allow-config-change")
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in stale) and not (out / ".merged.k1ll3d00.tmp").exists()
    assert mine.read_text() == "keep" and "left by an interrupted write" in r.stdout
    samples = tmp_path / "s.jsonl"
    (tmp_path / ".s.jsonl.k1ll3d00.tmp").write_text('{"task": "ra')
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Say a."}])
    r = run("sample.py", "--model", str(model), "--task", "raw", "--data", prompts, "--max-new-tokens", "2",
            "--out", str(samples), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / ".s.jsonl.k1ll3d00.tmp").exists() and samples.exists()
