"""The `raw` pseudo-task of sample.py: `{id, prompt}` JSONL records, sampled as written, with no gold answer
(so nothing is graded): for sampling a teacher or a student on prompts of one's own."""

from __future__ import annotations

import os

from ..errors import fail
from ..files import read_jsonl

NAME = "raw"


def load_prompts(path: str | os.PathLike | None, limit: int | None = None) -> list[tuple[int, str, str]]:
    """(line, id, prompt) of the first `limit` records."""
    if not path:
        fail(f"--task {NAME} needs --data with {{id, prompt}} JSONL records")
    rows = read_jsonl(path, required=("id", "prompt"))[:limit]
    for line, r in rows:
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            fail("field 'prompt' must be a non-empty string", path, line)
    return [(line, str(r["id"]), r["prompt"]) for line, r in rows]
