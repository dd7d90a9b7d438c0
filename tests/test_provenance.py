"""Stage provenance: skip when up to date, redo (outputs removed) when options, inputs or code change, resume
an interrupted stage, and never remove anything outside the run folder or an input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfrefine import provenance
from selfrefine.errors import UserError
from selfrefine.provenance import Stages


def make(out: Path, calls: list[str], name: str = "a", fail_first: bool = False):
    target = out / f"{name}.txt"

    def fn():
        calls.append(name)
        if fail_first and calls.count(name) == 1:
            raise KeyboardInterrupt
        target.write_text("made")
    return fn, target


def test_skip_redo_and_downstream(tmp_path: Path, capsys):
    calls: list[str] = []
    fn_a, out_a = make(tmp_path, calls, "a")
    fn_b, out_b = make(tmp_path, calls, "b")

    def run(lr: float) -> dict[str, str]:
        st = Stages(tmp_path)
        fa = st.run("a", fn_a, outputs=[out_a], options={"lr": lr}, inputs={})
        st.run("b", fn_b, outputs=[out_b], options={}, inputs={"a": fa})
        return st.fingerprints

    first = run(0.1)
    assert calls == ["a", "b"]
    assert run(0.1) == first and calls == ["a", "b"]  # both up to date
    assert "[a] up to date" in capsys.readouterr().out
    out_b.write_text("stale")
    second = run(0.2)
    assert calls == ["a", "b", "a", "b"] and second["a"] != first["a"] and second["b"] != first["b"]
    printed = capsys.readouterr().out
    assert "[a] option lr changed (0.1 -> 0.2): redoing it and what depends on it" in printed
    assert "[b] input a changed" in printed
    assert out_b.read_text() == "made"
    record = json.loads((tmp_path / "stages" / "b.json").read_text())
    assert record["status"] == "done" and record["fingerprint"] == second["b"] and record["inputs"] == {"a": second["a"]}


def test_code_change_and_force_redo(tmp_path: Path, monkeypatch, capsys):
    calls: list[str] = []
    fn, target = make(tmp_path, calls)
    Stages(tmp_path).run("a", fn, outputs=[target], options={}, inputs={})
    monkeypatch.setattr(provenance, "code_version", lambda: "another")
    Stages(tmp_path).run("a", fn, outputs=[target], options={}, inputs={})
    assert "[a] the code changed" in capsys.readouterr().out
    Stages(tmp_path, force=True).run("a", fn, outputs=[target], options={}, inputs={})
    assert "[a] --force" in capsys.readouterr().out and calls == ["a", "a", "a"]


def test_interrupted_stage_resumes_without_removing_its_outputs(tmp_path: Path, capsys):
    calls: list[str] = []
    fn, target = make(tmp_path, calls, fail_first=True)
    partial = tmp_path / "a.txt.partial"
    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path).run("a", fn, outputs=[target, partial], options={}, inputs={})
    partial.write_text("half, kept")
    Stages(tmp_path).run("a", fn, outputs=[target, partial], options={}, inputs={})
    assert "[a] resuming its interrupted run" in capsys.readouterr().out
    assert partial.read_text() == "half, kept" and calls == ["a", "a"]


@pytest.mark.parametrize("force", [False, True])
def test_outputs_without_a_record_are_never_removed(tmp_path: Path, force: bool):
    calls: list[str] = []
    fn, target = make(tmp_path, calls)
    target.write_text("the user's own file")
    with pytest.raises(UserError, match="exists but was not made by this pipeline"):
        Stages(tmp_path, force=force).run("a", fn, outputs=[target], options={}, inputs={})
    assert target.read_text() == "the user's own file" and calls == []


@pytest.mark.parametrize("where", ["outside", "input"])
def test_never_removes_outside_the_run_folder_or_an_input(tmp_path: Path, where: str):
    run = tmp_path / "run"
    victim = tmp_path / "elsewhere.txt" if where == "outside" else run / "model" / "weights.bin"
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text("precious")
    Stages(run).run("a", lambda: None, outputs=[], options={}, inputs={})  # a record: the stage is the pipeline's
    st = Stages(run, force=True, protected=(run / "model",))
    target = victim if where == "outside" else victim.parent
    with pytest.raises(UserError, match="refusing to remove"):
        st.run("a", lambda: None, outputs=[target], options={}, inputs={})
    assert victim.read_text() == "precious"
