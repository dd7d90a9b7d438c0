"""The task registry (`selfrefine/tasks/__init__.py`): the names, their kinds, and what `Task.load` hands its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfrefine.errors import UserError
from selfrefine.tasks import TASK_NAMES, Example, Task, get_task


def test_registry() -> None:
    assert TASK_NAMES == (
        "gsm8k", "multiarith", "commonsenseqa", "cose", "openbookqa", "piqa", "socialiqa", "arith", "arith_ood")
    assert get_task("piqa").kind == "choice" and get_task("arith").kind == "math"
    with pytest.raises(UserError, match="known tasks: gsm8k, multiarith"):
        get_task("gsm9k")


def test_load_passes_its_arguments_to_the_source_and_keeps_the_first_examples() -> None:
    calls = []

    def source(path, split, size, seed):
        calls.append((path, split, size, seed))
        return [Example(f"e{i}", f"question {i}", str(i)) for i in range(5)]

    task = Task("fake", "math", source)
    assert [e.id for e in task.load("some/dir", limit=2, split="train", size=9, seed=4)] == ["e0", "e1"]
    assert len(task.load()) == 5  # no limit: every example
    assert calls == [(Path("some/dir"), "train", 9, 4), (None, "test", None, 0)]
    with pytest.raises(UserError, match="limit must be >= 1"):
        task.load(limit=0)
    assert len(calls) == 2  # refused before reading anything
