"""`selfrefine.paths`: outputs never replace inputs, and are checked writable before any work."""

from __future__ import annotations

import os

import pytest

from selfrefine.errors import UserError
from selfrefine.paths import check_outputs, check_writable


def fails(fn, *args, says: str, file, **kw) -> None:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    assert e.value.file == str(file) and says in e.value.message, str(e.value)


@pytest.fixture()
def d(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "data.jsonl").write_text("{}\n")
    return tmp_path


def test_distinct_paths_pass(d):
    check_outputs({"--model": d / "model", "--data": d / "data.jsonl", "--adapter": None},
                  {"--out": d / "new" / "deeper" / "out.jsonl", "--demos-out": None})
    check_outputs({"--model": d / "model"}, {"--out": d / "run"}, folders=["--out"])


def test_output_equal_to_input(d):
    fails(check_outputs, {"--data": d / "data.jsonl"}, {"--out": d / "data.jsonl"}, says="also the --data input",
          file=d / "data.jsonl")
    fails(check_outputs, {"--model": d / "model"}, {"--out": d / "model"}, folders=["--out"],
          says="also the --model input", file=d / "model")


def test_output_equal_through_links(d):
    (d / "link.jsonl").symlink_to(d / "data.jsonl")
    os.link(d / "data.jsonl", d / "hard.jsonl")
    (d / "dirlink").symlink_to(d, target_is_directory=True)
    for out in (d / "link.jsonl", d / "hard.jsonl", d / "dirlink" / "data.jsonl", d / "model" / ".." / "data.jsonl"):
        fails(check_outputs, {"--data": d / "data.jsonl"}, {"--out": out}, says="also the --data input", file=out)


def test_output_inside_input_folder(d):
    out = d / "model" / "eval.json"
    fails(check_outputs, {"--model": d / "model"}, {"--out": out}, says="inside the --model input", file=out)


def test_output_folder_holding_an_input(d):
    fails(check_outputs, {"--data": d / "data.jsonl"}, {"--out": d}, folders=["--out"],
          says="holds the --data input", file=d)
    check_outputs({"--data": d / "data.jsonl"}, {"--out": d}, folders=["--out"], may_hold_inputs=True)


def test_outputs_colliding(d):
    fails(check_outputs, {}, {"--out": d / "s.jsonl", "--demos-out": d / "s.jsonl"},
          says="--demos-out and --out are the same file", file=d / "s.jsonl")
    p = d / "r.arith.predictions.jsonl"
    fails(check_outputs, {}, [("predictions of arith", p), ("predictions of arith", p)], says="given twice", file=p)


def test_not_writable(d, monkeypatch):
    fails(check_writable, d / "model", says="is a directory", file=d / "model")
    fails(check_writable, d / "data.jsonl", folder=True, says="not a directory", file=d / "data.jsonl")
    under = d / "data.jsonl" / "x" / "out.json"
    fails(check_writable, under, says="is a file, not a directory", file=under)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (root may write anyway)
    fails(check_writable, d / "new" / "out.json", says="not writable", file=d / "new" / "out.json")


def test_writability_checked_after_the_relations(d):
    """An output that is an input folder is reported as such, not as "is a directory"."""
    fails(check_outputs, {"--model": d / "model"}, {"--out": d / "model"}, says="also the --model input",
          file=d / "model")
