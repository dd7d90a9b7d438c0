"""User errors: `FILE:LINE: message` (or `FILE: message`, or the message alone), and `cli_main` turning them into
one line on stderr with the error's exit code, while any other exception keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfrefine.errors import UserError, cli_main, fail


@pytest.mark.parametrize("file,line,expected", [
    (Path("data") / "demos.jsonl", 7, "data/demos.jsonl:7: empty completion"),
    ("demos.jsonl", None, "demos.jsonl: empty completion"),
    (None, None, "empty completion"),
])
def test_message_names_file_and_line(file, line, expected: str) -> None:
    with pytest.raises(UserError) as info:
        fail("empty completion", file, line)
    e = info.value
    assert str(e) == expected and e.message == "empty completion" and e.line == line
    assert e.file == (None if file is None else str(file)) and e.exit_code == 2


def test_cli_main_prints_one_line_and_exits_with_the_code(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(lambda: fail("field 'prompt' must be a non-empty string", "pairs.jsonl", 3))
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: pairs.jsonl:3: field 'prompt' must be a non-empty string\n"

    class Diverged(UserError):
        exit_code = 3

    def diverge() -> None:
        raise Diverged("non-finite loss at step 5")

    with pytest.raises(SystemExit) as info:
        cli_main(diverge)
    assert info.value.code == 3 and capsys.readouterr().err == "error: non-finite loss at step 5\n"


def test_cli_main_lets_bugs_through(capsys: pytest.CaptureFixture) -> None:
    def bug() -> None:
        raise KeyError("not a user mistake")

    with pytest.raises(KeyError, match="not a user mistake"):
        cli_main(bug)
    assert capsys.readouterr().err == ""
    assert cli_main(lambda: None) is None  # a clean run returns
