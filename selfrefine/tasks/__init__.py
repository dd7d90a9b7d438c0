"""Benchmarks as one interface: `get_task(name).load(...)` gives `Example`s; `render_prompt` turns one into the
user turn; `extract_answer` / `is_correct` score a completion; `demonstration` is the CoT target for SFT.

kind "math": `gold` is a canonical number ("18", "-3", "0.75"). kind "choice": `gold` is an option letter "A".."E"
and `choices` holds the option texts in letter order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import fail


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    gold: str
    choices: tuple[str, ...] | None = None
    rationale: str | None = None  # the data set's own reasoning (GSM8K, the arith teacher); None where it has none


# (path or None, split, size, seed) -> examples
Source = Callable[[Path | None, str, int | None, int], list[Example]]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "math" | "choice"
    source: Source = field(repr=False, compare=False)
    needs_data: bool = True  # False: generated (arith, arith_ood), no data file

    def load(self, path: str | os.PathLike | None = None, limit: int | None = None, split: str = "test",
             size: int | None = None, seed: int = 0, skip: int = 0) -> list[Example]:
        """The examples of one split, in file order; `skip` passes over the first ones (those trained on, when a
        validation split is the rest of a training split), then `limit` (or `size`) keeps the first ones.

        File-based tasks: `path` is the file, or a folder holding the official file names (then `split` picks one;
        "test" means the labelled evaluation split, e.g. CommonsenseQA dev, PIQA valid); without `path`, the folder
        `$SELFREFINE_DATA/<name>`. Generated tasks (arith, arith_ood) take `size` and `seed` and no `path`.
        """
        if limit is not None and limit < 1:
            fail(f"limit must be >= 1, got {limit}")
        if skip < 0:
            fail(f"skip must be >= 0, got {skip}")
        # generated tasks are prefix-stable: the first size + skip questions start with the first `skip`
        examples = self.source(None if path is None else Path(path), split, None if size is None else size + skip,
                               seed)[skip:]
        return examples if limit is None else examples[:limit]


# Imported here, after the types they build on.
from . import arith, loaders  # noqa: E402
from .extract import Graded, extract_answer, grade, is_correct  # noqa: E402
from .prompts import demonstration, render_prompt  # noqa: E402
from .stats import wilson_interval  # noqa: E402

_TASKS = (
    Task("gsm8k", "math", loaders.file_source("gsm8k", loaders.read_gsm8k,
                                             {"train": "train.jsonl", "test": "test.jsonl"})),
    Task("multiarith", "math", loaders.file_source("multiarith", loaders.read_multiarith,
                                                   {"test": "MultiArith.json"})),
    Task("commonsenseqa", "choice", loaders.file_source("commonsenseqa", loaders.read_qa_choices, {
        "train": "train_rand_split.jsonl", "dev": "dev_rand_split.jsonl", "test": "dev_rand_split.jsonl"})),
    Task("cose", "choice", loaders.cose_source),
    Task("openbookqa", "choice", loaders.file_source("openbookqa", loaders.read_qa_choices, {
        "train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"})),
    Task("piqa", "choice", loaders.file_source("piqa", loaders.read_piqa, {
        "train": "train.jsonl", "valid": "valid.jsonl", "test": "valid.jsonl"})),
    Task("socialiqa", "choice", loaders.file_source("socialiqa", loaders.read_socialiqa, {
        "train": "train.jsonl", "dev": "dev.jsonl", "test": "dev.jsonl"})),
    Task("arith", "math", arith.source(ood=False), needs_data=False),
    Task("arith_ood", "math", arith.source(ood=True), needs_data=False),
)
TASKS = {t.name: t for t in _TASKS}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        fail(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    return TASKS[name]


__all__ = ["Example", "Task", "TASK_NAMES", "get_task", "render_prompt", "extract_answer", "grade", "Graded", "is_correct",
           "demonstration", "wilson_interval"]
