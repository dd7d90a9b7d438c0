"""Answer extraction and scoring: pure functions from a completion's text to a normalised answer.

The rule for both kinds: an explicit answer statement ("The answer is ...", "answer:", "####") wins, and of
several the last one that states something wins (a model that restates or corrects itself means the last one);
only without any statement do we fall back to weaker evidence (the last number; a bare letter or option text).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

# Where a completion states its answer. `\boxed{` covers math-tuned models; `####` is GSM8K's own marker.
_MARKER = re.compile(r"\banswer\s*(?:is|:|=)|####|\\boxed\{", re.IGNORECASE)

# A number as people write it: optional sign and currency, thousands separators, decimals, or a plain fraction.
# The look-behind keeps "x2" or the "3" of "10-3" from reading as numbers of their own ("10-3" is a subtraction).
_NUMBER = re.compile(
    r"(?<![\w.])(?P<neg>-\s?)?[$€£]?\s?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?:(?P<dec>\.\d+)|/(?P<den>[1-9]\d*))?"
)

# A choice letter right after an answer marker: "(c)", "C" not glued to a word, or a lower-case "c" only when
# nothing but punctuation follows ("answer: c", yet not "the answer is a bank": there the option text decides).
_LETTER_AFTER_MARKER = re.compile(
    r"^[\s*\"'`]*(?:(?:option|choice)\s*)?"
    r"(?:\((?P<p>[A-Za-z])\)|(?P<u>[A-Z])(?![\w'])|(?P<l>[a-z])(?=\s*(?:[.,;:!)\"'*]|$)))"
)
# A reply that is only a letter, or starts with "(C)", "C)", "C." or "C:" (a direct answer).
_LEADING_LETTER = re.compile(r"^[\s*\"'`]*(?:\((?P<p>[A-Za-z])\)|(?P<l>[A-Za-z])(?:\)|[.:](?!\w)|\s*$))")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def parse_number(text: str) -> Fraction | None:
    """The exact value of one written number ("$1,200.50", "-3", "3/4", "18.0"), or None."""
    m = _NUMBER.fullmatch(text.strip())
    return None if m is None else _value(m)


def canonical_number(value: Fraction) -> str:
    """One spelling per value: "18" for 18.0, "0.75" for 3/4, and "1/3" where no finite decimal exists."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


def normalize_number(text: str) -> str | None:
    value = parse_number(text)
    return None if value is None else canonical_number(value)


def _value(m: re.Match) -> Fraction:
    v = Fraction(m["int"].replace(",", "") + (m["dec"] or ""))
    if m["den"]:
        v /= int(m["den"])
    return -v if m["neg"] else v


def _segments_after_markers(text: str) -> list[str]:
    """The text after each answer marker, up to the next marker, last statement first."""
    starts = [m.end() for m in _MARKER.finditer(text)]
    ends = [m.start() for m in _MARKER.finditer(text)][1:] + [len(text)]
    return [text[s:e] for s, e in zip(starts, ends)][::-1]


def extract_number(text: str) -> str | None:
    """The first number of the last answer statement that has one, else the last number in the text."""
    for segment in _segments_after_markers(text):
        m = _NUMBER.search(segment)
        if m:
            return canonical_number(_value(m))
    numbers = list(_NUMBER.finditer(text))
    return canonical_number(_value(numbers[-1])) if numbers else None


def _option_in(segment: str, choices: tuple[str, ...] | None, letters: str) -> tuple[int, str] | None:
    """(position, letter) of the option whose text appears first in `segment` (the longest on a tie)."""
    best: tuple[int, int, str] | None = None
    for letter, option in zip(letters, choices or ()):
        option = option.strip()
        if not option:
            continue
        m = re.search(rf"(?<!\w){re.escape(option)}(?!\w)", segment, re.IGNORECASE)
        if m and (best is None or (m.start(), -len(option)) < best[:2]):
            best = (m.start(), -len(option), letter)
    return None if best is None else (best[0], best[2])


def _bare(text: str) -> str:
    return text.strip().strip(".!\"'*` ").lower()


def extract_choice(text: str, choices: tuple[str, ...] | None = None) -> str | None:
    """An upper-case option letter, from the last answer statement (its letter or its option text), else from a
    reply that is only a letter or only an option's text, else the last "(X)" in the text."""
    letters = string.ascii_uppercase[: len(choices)] if choices else "ABCDE"

    def valid(m: re.Match | None) -> str | None:
        letter = m and next((g for g in m.groups() if g), None)
        return letter.upper() if letter and letter.upper() in letters else None

    for segment in _segments_after_markers(text):
        line = segment.split("\n", 1)[0]
        option = _option_in(line, choices, letters)
        if option and option[0] == len(line) - len(line.lstrip(" *\"'`")):
            return option[1]  # the statement opens with an option's text: "The answer is A Season." is not "A"
        letter = valid(_LETTER_AFTER_MARKER.match(segment)) or (option and option[1])
        if letter:
            return letter
    letter = valid(_LEADING_LETTER.match(text))
    if letter:
        return letter
    if choices:
        for letter, option in zip(letters, choices):
            if _bare(text) == _bare(option):
                return letter
    found = [m for m in _PAREN_LETTER.findall(text) if m in letters]
    return found[-1] if found else None


def extract_answer(text: str, kind: str, choices: tuple[str, ...] | None = None) -> str | None:
    """The normalised answer of a completion: a canonical number ("math") or a letter ("choice"); None if absent."""
    if kind == "math":
        return extract_number(text)
    if kind == "choice":
        return extract_choice(text, choices)
    raise ValueError(f"unknown task kind {kind!r} (expected 'math' or 'choice')")


def is_correct(pred: str | None, gold: str, kind: str) -> bool:
    """Exact match after normalisation: numbers by value (so "18.0" == "18" and "3/4" == "0.75"), letters by case."""
    if pred is None:
        return False
    if kind == "math":
        p, g = parse_number(pred), parse_number(gold)
        return p is not None and p == g
    if kind == "choice":
        return pred.strip().upper() == gold.strip().upper()
    raise ValueError(f"unknown task kind {kind!r} (expected 'math' or 'choice')")


@dataclass(frozen=True)
class Graded:
    """One completion scored: what it answered, whether it stated an answer at all, and whether it counts."""

    pred: str | None
    answer_found: bool
    correct: bool


def grade(text: str, finish_reason: str, gold: str, kind: str, choices: tuple[str, ...] | None = None) -> Graded:
    """An answer counts only when the model stated it and finished: a completion cut at the token limit
    ("length") is wrong even where its text holds the right answer (its `pred` is still reported)."""
    if finish_reason not in ("stop", "length"):
        raise ValueError(f"finish_reason must be 'stop' or 'length', got {finish_reason!r}")
    pred = extract_answer(text, kind, choices)
    return Graded(pred, pred is not None, finish_reason == "stop" and is_correct(pred, gold, kind))
