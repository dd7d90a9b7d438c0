"""Readers for the official file formats. Every malformed record is a UserError naming its file and line.

Each reader returns `Example`s in file order; ids are the set's own where it has them (CommonsenseQA, OpenBookQA),
else `<task>-<file stem>-<line>` (`<task>-<index>` for MultiArith), so they are unique across splits.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from fractions import Fraction
from pathlib import Path
from typing import Callable

from ..errors import fail
from ..files import read_json, read_jsonl, read_text
from . import Example, Source
from .extract import canonical_number, normalize_number

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<48/2=24>>" annotations


def read_gsm8k(path: Path) -> list[Example]:
    """JSONL {question, answer}; the answer is the rationale, then a last line "#### N"."""
    out = []
    for lineno, rec in read_jsonl(path, required=("question", "answer")):
        rationale, sep, final = str(rec["answer"]).rpartition("####")
        if not sep:
            fail("answer has no '#### N' final line", path, lineno)
        gold = normalize_number(final)
        if gold is None:
            fail(f"final answer {final.strip()!r} is not a number", path, lineno)
        out.append(Example(f"gsm8k-{path.stem}-{lineno}", str(rec["question"]).strip(), gold,
                           rationale=_CALCULATOR.sub("", rationale).strip() or None))
    return out


def _json_array_records(path: Path) -> list[tuple[int, object]]:
    """(line, element) for each element of a top-level JSON array, so errors can name the record's line."""
    data = read_json(path)  # reports bad JSON with its line
    if not isinstance(data, list) or not data:
        fail("expected a non-empty JSON array", path, 1)
    text, decoder, out = read_text(path), json.JSONDecoder(), []
    pos = text.index("[") + 1
    for _ in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        obj, end = decoder.raw_decode(text, pos)
        out.append((text.count("\n", 0, pos) + 1, obj))
        pos = end
    return out


def read_multiarith(path: Path) -> list[Example]:
    """One JSON array of {iIndex, sQuestion, lSolutions, ...}; the gold answer is lSolutions[0]."""
    out = []
    for i, (lineno, rec) in enumerate(_json_array_records(path)):
        if not isinstance(rec, dict) or "sQuestion" not in rec or "lSolutions" not in rec:
            fail("expected an object with 'sQuestion' and 'lSolutions'", path, lineno)
        sols = rec["lSolutions"]
        if not isinstance(sols, list) or not sols or not isinstance(sols[0], (int, float)) or \
                isinstance(sols[0], bool) or not math.isfinite(sols[0]):
            fail("'lSolutions' must be a non-empty list of finite numbers", path, lineno)
        out.append(Example(f"multiarith-{rec.get('iIndex', i)}", str(rec["sQuestion"]).strip(),
                           canonical_number(Fraction(str(sols[0])))))
    return out


def read_qa_choices(path: Path) -> list[Example]:
    """CommonsenseQA / OpenBookQA / ARC JSONL: {id, question: {stem, choices: [{label, text}]}, answerKey}.

    Options keep the file's order and get letters A, B, ... by position, so numeric labels ("1".."4") work too.
    """
    out = []
    for lineno, rec in read_jsonl(path, required=("question", "answerKey")):
        q = rec["question"]
        choices = q.get("choices") if isinstance(q, dict) else None
        if not isinstance(q, dict) or not isinstance(q.get("stem"), str) or not isinstance(choices, list) or not all(
                isinstance(c, dict) and "label" in c and "text" in c for c in choices) or len(choices) < 2:
            fail("'question' must have a 'stem' and a list of 'choices' with 'label' and 'text'", path, lineno)
        labels = [str(c["label"]) for c in choices]
        key = str(rec["answerKey"]).strip()
        if key not in labels:
            fail(f"answerKey {key!r} is not one of the choice labels {labels}", path, lineno)
        out.append(Example(str(rec.get("id", f"{path.stem}-{lineno}")), q["stem"].strip(),
                           string.ascii_uppercase[labels.index(key)],
                           choices=tuple(str(c["text"]).strip() for c in choices)))
    return out


COSE_MIN_WORDS = 5  # shorter CoS-E explanations ("This word is Most relavant") explain nothing


def cose_source(path: Path | None, split: str, size: int | None, seed: int) -> list[Example]:
    """CommonsenseQA questions with the CoS-E human explanations (Rajani et al., 2019) as their rationales.

    `path` is the folder holding `commonsenseqa/` and `cose/` with their official file names (the layout of
    `../shared/data`); `split` train or dev ("test" = dev). Only explanations that say something about the gold
    option are kept: at least `COSE_MIN_WORDS` words, more than the option itself, and one of the option's words
    (of 3+ letters) among them, which drops the many generic ones ("This option is better to this task."). A
    question without one has no rationale and gives no demonstration.
    """
    if size is not None:
        fail("cose is read from files; use limit to take fewer examples, not size")
    split = "dev" if split == "test" else split
    if split not in ("train", "dev"):
        fail(f"cose has splits train, dev; got {split!r}")
    if path is None or not path.is_dir():
        fail("cose needs the data folder holding commonsenseqa/ and cose/ (e.g. --data ../shared/data)", path)
    questions, notes = path / "commonsenseqa" / f"{split}_rand_split.jsonl", path / "cose" / f"cose_{split}_v1.11.jsonl"
    for f in (questions, notes):
        if not f.is_file():
            fail("file not found", f)
    explained = {}
    for lineno, rec in read_jsonl(notes, required=("id", "explanation")):
        text = rec["explanation"].get("open-ended") if isinstance(rec["explanation"], dict) else None
        if not isinstance(text, str):
            fail("'explanation' must be an object with an 'open-ended' string", notes, lineno)
        explained[str(rec["id"])] = " ".join(text.split())
    out = []
    for e in read_qa_choices(questions):
        text = explained.get(e.id, "")
        gold = e.choices[string.ascii_uppercase.index(e.gold)].lower()
        words = set(re.findall(r"[a-z]+", text.lower()))
        keep = (len(text.split()) >= COSE_MIN_WORDS and text.lower().strip(" .") != gold
                and any(w in words for w in re.findall(r"[a-z]{3,}", gold)))
        out.append(Example(e.id, e.question, e.gold, e.choices, rationale=text if keep else None))
    return out


def labels_beside(path: Path) -> Path:
    """`valid.jsonl` -> `valid-labels.lst`, the official naming of PIQA and Social IQa."""
    return path.with_name(f"{path.stem}-labels.lst")


def read_labels(path: Path, n: int, allowed: dict[str, str], questions: Path) -> list[str]:
    """One label per line, aligned with the `n` questions; each mapped through `allowed` to a letter."""
    if not path.is_file():
        fail(f"labels file not found (expected beside {questions.name})", path)
    lines = read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != n:
        fail(f"{len(lines)} labels for {n} questions in {questions}", path, min(len(lines), n) + 1)
    out = []
    for lineno, line in enumerate(lines, 1):
        if line.strip() not in allowed:
            fail(f"label {line.strip()!r} is not one of {', '.join(allowed)}", path, lineno)
        out.append(allowed[line.strip()])
    return out


def _read_labelled(name: str, path: Path, labels: Path | None, fields: tuple[str, ...], allowed: dict[str, str],
                   question: Callable[[dict], str]) -> list[Example]:
    records = read_jsonl(path, required=fields)
    golds = read_labels(labels or labels_beside(path), len(records), allowed, path)
    options = fields[-len(allowed):]
    return [Example(f"{name}-{path.stem}-{lineno}", question(rec).strip(), gold,
                    choices=tuple(str(rec[f]).strip() for f in options))
            for (lineno, rec), gold in zip(records, golds)]


def read_piqa(path: Path, labels: Path | None = None) -> list[Example]:
    """JSONL {goal, sol1, sol2} + `<stem>-labels.lst` with 0/1 (-> A/B)."""
    return _read_labelled("piqa", path, labels, ("goal", "sol1", "sol2"), {"0": "A", "1": "B"},
                          lambda r: str(r["goal"]))


def read_socialiqa(path: Path, labels: Path | None = None) -> list[Example]:
    """JSONL {context, question, answerA..C} + `<stem>-labels.lst` with 1/2/3 (-> A/B/C).

    The question shown is the context followed by the question, as the two are never asked apart."""
    return _read_labelled("socialiqa", path, labels, ("context", "question", "answerA", "answerB", "answerC"),
                          {"1": "A", "2": "B", "3": "C"}, lambda r: f"{str(r['context']).strip()} {r['question']}")


def file_source(name: str, reader: Callable[[Path], list[Example]], files: dict[str, str]) -> Source:
    """A `Task.source` reading one file: `path` itself, or the official file for `split` in the folder `path`
    (default `$SELFREFINE_DATA/<name>`)."""
    def load(path: Path | None, split: str, size: int | None, seed: int) -> list[Example]:
        if size is not None:
            fail(f"{name} is read from files; use limit to take fewer examples, not size")
        if path is None:
            root = os.environ.get("SELFREFINE_DATA")
            if not root:
                official = ", ".join(sorted(set(files.values())))
                fail(f"{name} reads data files: pass a path (a file, or a folder with {official}) "
                     "or set SELFREFINE_DATA to the folder holding <task>/ folders")
            path = Path(root) / name
        if path.is_dir():
            if split not in files:
                fail(f"{name} has splits {', '.join(files)}; got {split!r}", path)
            path = path / files[split]
        if not path.is_file():
            fail("file not found", path)
        return reader(path)
    return load
