"""Crash-safe files: a torn last line of an append-only log is dropped, complete lines are kept."""

from __future__ import annotations

from pathlib import Path

from selfrefine.files import append_jsonl, drop_torn_tail, read_jsonl


def test_drop_torn_tail_keeps_complete_lines_and_lets_appends_continue(tmp_path: Path):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"step": 1})
    append_jsonl(log, {"step": 2})
    assert drop_torn_tail(log) == 0
    with open(log, "a") as f:
        f.write('{"step": 3, "lo')  # what a kill during an append leaves
    assert drop_torn_tail(log) == len('{"step": 3, "lo')
    append_jsonl(log, {"step": 3})
    assert [r for _, r in read_jsonl(log)] == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_drop_torn_tail_of_a_missing_or_empty_file(tmp_path: Path):
    assert drop_torn_tail(tmp_path / "none.jsonl") == 0
    (tmp_path / "empty.jsonl").write_text("")
    assert drop_torn_tail(tmp_path / "empty.jsonl") == 0
    (tmp_path / "one.jsonl").write_text('{"a"')
    assert drop_torn_tail(tmp_path / "one.jsonl") == 4 and (tmp_path / "one.jsonl").read_text() == ""


def test_remove_stale_temps_removes_only_our_temporaries(tmp_path: Path, capsys):
    from selfrefine.files import remove_stale_temps

    ours = [tmp_path / ".checkpoint.pt.ab12cd_9.tmp", tmp_path / ".s.jsonl.zzzzzzzz.tmp"]
    for p in ours:
        p.write_text("half")
    model_dir = tmp_path / ".merged.q1w2e3r4.tmp"  # a model directory save_model did not finish
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    others = [tmp_path / ".notes.tmp", tmp_path / "x.tmp", tmp_path / ".s.jsonl.short.tmp", tmp_path / "s.jsonl"]
    for p in others:
        p.write_text("keep")
    assert remove_stale_temps(tmp_path, names=["s.jsonl"]) == [ours[1]]
    assert remove_stale_temps(tmp_path) == sorted([ours[0], model_dir])
    assert all(p.read_text() == "keep" for p in others)
    assert "removed 2 temporary file(s) left by an interrupted write" in capsys.readouterr().out
    assert remove_stale_temps(tmp_path / "missing") == []
