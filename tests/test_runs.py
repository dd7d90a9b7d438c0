"""Run folders: run.json records a new run; a folder holding another run (or anything else) is refused, and a
resume is refused when its config or its input files changed, the record updated only once `commit()` is called."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfrefine.errors import UserError
from selfrefine.runs import RUN_FILE, start_run

CONFIG = {"lr": 1e-4, "seed": 0, "save_every": 10}


def record(out: Path) -> dict:
    return json.loads((out / RUN_FILE).read_text())


def refused(*args, says: str, **kw) -> UserError:
    with pytest.raises(UserError, match=says) as info:
        start_run(*args, **kw)
    return info.value


def test_new_run_is_recorded(tmp_path: Path) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text("{}\n")
    out, _ = start_run(tmp_path / "run" / "sft", CONFIG, resume=False, inputs={"data": data, "model": None})
    assert out == tmp_path / "run" / "sft" and out.is_dir()
    rec = record(out)
    assert rec["config"] == CONFIG and rec["seed"] == 0 and set(rec["inputs"]) == {"data"}
    assert "torch" in rec["versions"] and "resumed" not in rec


def test_refuses_a_folder_holding_another_run_or_other_files(tmp_path: Path) -> None:
    start_run(tmp_path / "a", CONFIG, resume=False)
    before = (tmp_path / "a" / RUN_FILE).read_bytes()
    e = refused(tmp_path / "a", {**CONFIG, "lr": 2e-4}, resume=False, says="this folder holds another run")
    assert e.file == str(tmp_path / "a") and (tmp_path / "a" / RUN_FILE).read_bytes() == before
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    for resume in (False, True):
        refused(tmp_path / "b", CONFIG, resume=resume, says="not empty and holds no run.json")
    assert not (tmp_path / "b" / RUN_FILE).exists()


def test_resume_with_another_config_is_refused_unless_allowed(tmp_path: Path) -> None:
    out, _ = start_run(tmp_path, CONFIG, resume=False)
    start_run(out, {**CONFIG, "save_every": 99, "report_to": "tensorboard"}, resume=True)  # how to run, not what
    e = refused(out, {**CONFIG, "lr": 2e-4}, resume=True, says=r"different config \(lr: 0.0001 -> 0.0002\)")
    assert e.file == str(out / RUN_FILE)
    _, commit = start_run(out, {**CONFIG, "lr": 2e-4}, resume=True, allow_config_change=True)
    assert record(out)["config"] == CONFIG  # nothing written before the checkpoint has loaded
    commit()
    assert record(out)["config"]["lr"] == 2e-4 and len(record(out)["resumed"]) == 1


def test_resume_with_changed_input_is_refused_even_when_config_changes_are_allowed(tmp_path: Path) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    out, _ = start_run(tmp_path / "run", CONFIG, resume=False, inputs={"data": data})
    start_run(out, CONFIG, resume=True, inputs={"data": data})  # unchanged: fine
    data.write_text('{"prompt": "a", "completion": "c"}\n')  # edited in place: same path, other content
    e = refused(out, CONFIG, resume=True, allow_config_change=True, inputs={"data": data},
                says="--data changed since this run started")
    assert e.file == str(data)
