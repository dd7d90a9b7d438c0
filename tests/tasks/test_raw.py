"""tasks/raw.py: the `raw` pseudo-task's {id, prompt} JSONL, read as (line, id, prompt); bad records name file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfrefine.errors import UserError
from selfrefine.tasks import raw

RECORDS = [{"id": 7, "prompt": "What is 2 plus 3?"}, {"id": "b", "prompt": "Name a colour.", "extra": 1},
           {"id": 3.5, "prompt": "Count to four."}]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    """The records with a blank line after the first, so file lines and record indices differ."""
    return write_lines(tmp_path / "prompts.jsonl", [json.dumps(RECORDS[0]), "", *map(json.dumps, RECORDS[1:])])


def test_rows_are_line_string_id_and_prompt(prompts: Path):
    rows = raw.load_prompts(prompts)
    assert rows == [(1, "7", RECORDS[0]["prompt"]), (3, "b", RECORDS[1]["prompt"]), (4, "3.5", RECORDS[2]["prompt"])]
    assert all(isinstance(qid, str) for _, qid, _ in rows)


def test_limit_keeps_the_first_records(prompts: Path):
    everything = raw.load_prompts(prompts)
    for limit in range(1, len(RECORDS) + 2):
        assert raw.load_prompts(prompts, limit) == everything[:limit]
    assert raw.load_prompts(str(prompts), None) == everything


def test_missing_path_is_refused(tmp_path: Path):
    for nothing in (None, ""):
        with pytest.raises(UserError, match=f"--task {raw.NAME} needs --data"):
            raw.load_prompts(nothing)
    gone = tmp_path / "gone.jsonl"
    with pytest.raises(UserError, match="file not found") as e:
        raw.load_prompts(gone)
    assert e.value.file == str(gone)


@pytest.mark.parametrize("bad, message", [
    ({"id": "x"}, "missing field 'prompt'"),
    ({"prompt": "Hello?"}, "missing field 'id'"),
    ({"id": "x", "prompt": ""}, "field 'prompt' must be a non-empty string"),
    ({"id": "x", "prompt": " \n\t"}, "field 'prompt' must be a non-empty string"),
    ({"id": "x", "prompt": 5}, "field 'prompt' must be a non-empty string"),
])
def test_bad_record_names_file_and_line(tmp_path: Path, bad: dict, message: str):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(RECORDS[0]), "", json.dumps(bad)])
    with pytest.raises(UserError, match=message) as e:
        raw.load_prompts(path)
    assert (e.value.file, e.value.line) == (str(path), 3)
    assert str(e.value).startswith(f"{path}:3: ")
