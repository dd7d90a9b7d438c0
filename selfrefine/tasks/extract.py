"""Answer extraction and scoring: pure functions from a completion's text to a normalised answer.

These are all the rules; tests/tasks/test_tasks_extract.py pins each one, on made-up and on real completions.

1. An answer is read only from an answer STATEMENT or from a BARE reply (rule 4). Nothing else counts: not the
   last number of the reasoning, not the last "(X)" it mentions.
2. Statements. One opens at "answer is" (any case; "The final answer is" too), "answer:" or "answer =", at
   "####" (GSM8K's marker) or at "\\boxed{". Its text is what follows the marker (an optional ":" and white space,
   line breaks included, skipped) up to the end of that sentence: a line break, or ".", "!" or "?" followed by
   white space or the end of the text (so not a decimal point), or the next marker, whichever comes first. A
   "\\boxed{...}" statement is the content of its braces (\\frac, \\times, \\div, \\cdot, \\text read as
   written; braces never closed state nothing). A statement "states something" when rule 3 (numbers) or
   rule 5 (choices) reads a value from it; of several statements the last one that states something wins (a
   model that restates or corrects itself means the last one).
3. Numbers ("math"). If the statement contains "=", only its text after the last "=" is read ("28 - 3 = 25"
   -> 25). There the first arithmetic expression is evaluated exactly (fractions.Fraction, by a small
   recursive-descent parser; the text is never eval'ed): numbers as written ("-3", "$1,200.50", "€5", "3/4",
   "18.0"; a "%" sign is dropped: "25%" -> 25; a number glued to a letter, like the "2" of "v2", is not one),
   the operators + - * / x × ÷ between operands, unary minus, parentheses, the usual precedence. The
   expression ends before an operator with no operand after it and before anything else, so trailing words
   are fine ("25 apples." -> 25, "25 - the rest" -> 25). A division by zero or a parenthesis left open: that
   statement states nothing (so does one nested over 50 parentheses or signs deep).
4. Bare reply, what the direct prompt ("Answer with only the final answer." / "... only the letter.") asks
   for. The whole completion, stripped of white space, of surrounding "*", quotes and backticks and of
   trailing ".", "!" or ":", must be ONE line (no line break inside) and be exactly:
     math:   an arithmetic expression (rule 3, "=" allowed: "10-3=7" -> 7, every part before the last "=" an
             expression too), optionally followed by at most two words of letters ("7 apples", "$25 dollars",
             "3 toy cars"), and nothing else;
     choice: a letter ("C", "(C)", "C)", "C.", "C:"), or such a letter followed by that same option's text
             ("(C) department store", "C: department store"), or exactly one option's text ("department
             store"); case-insensitive.
   A statement that states something wins over a bare reading (a bare reply has no marker unless it is one,
   like "Answer: 42").
5. Choices ("choice"). Letters run A, B, ... over the options (A-E when the options are unknown); a letter
   outside them is not one (then c. may still apply). In a statement, in this order:
     a. the statement's line opens with an option's text: that option ("The answer is A Season." is the
        option "A Season", not the letter A; the line is used so that an option holding ". " is whole);
     b. a letter right after the marker: "(c)", "C" not glued to a word ("C's" neither), a lower-case "c"
        only with nothing but punctuation after it ("answer: c", yet not "the answer is a bank"), optionally
        after "option"/"choice" ("option D");
     c. else the option whose text appears first in the statement (the longest one on a tie).
   A letter directly followed by ANOTHER option's text ("The answer is (C) library." where library is (B))
   contradicts itself: that statement states nothing (a bare reply's text must be its letter's option, rule 4).
6. Scoring (`grade`): an answer counts only when it was stated or given bare AND the model finished
   (finish_reason "stop"); a completion cut at the token limit ("length") is never correct, even where its
   text holds the right answer (its `pred` is still reported). Numbers are compared by exact value ("18.0" ==
   "18", "3/4" == "0.75"), letters case-insensitively.
"""

from __future__ import annotations

import operator
import re
import string
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

# Where a statement opens (rule 2). `\boxed{` covers math-tuned models; `####` is GSM8K's own marker.
_MARKER = re.compile(r"\banswer\s*(?:is\b\s*:?|:|=)|####|\\boxed\s*\{", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\n|[.!?](?=\s|$)")

# A number as people write it (rule 3): optional sign and currency, thousands separators, decimals, or a plain
# fraction. Used for gold answers and predictions (`parse_number`); the parser below reads the same forms.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<neg>-\s?)?[$€£]?\s?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?:(?P<dec>\.\d+)|/(?P<den>[1-9]\d*))?"
)
# One operand of an expression: currency, a sign after it ("$-0.5"), digits with thousands commas, decimals, "%".
_OPERAND = re.compile(r"[$€£]?\s?(?P<neg>-)?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<dec>\.\d+)?%?")
# Where the first expression of a statement may start: a number not glued to a word (the "2" of "v2" is not
# one), with its sign or currency, or an opening parenthesis (not LaTeX's "\(") that holds one.
_EXPR_START = re.compile(r"(?<![\w.])(?:[-−+]\s?)?[$€£]?\s?-?\d|(?<![\\\w])\((?=\s*[-−$€£\d(])")
_MINUS, _PLUS, _TIMES, _DIVIDE = "-−", "+", "*×xX", "/÷"
_APPLY = {**dict.fromkeys(_PLUS, operator.add), **dict.fromkeys(_MINUS, operator.sub),
          **dict.fromkeys(_TIMES, operator.mul), **dict.fromkeys(_DIVIDE, operator.truediv)}
_MAX_DEPTH = 50  # nested parentheses and signs
_UNIT_WORDS = re.compile(r"(?:\s+[A-Za-z]+){0,2}\s*")

# A choice letter right after an answer marker (rule 5b): "(c)", "C" not glued to a word, or a lower-case "c"
# only when nothing but punctuation follows ("answer: c", yet not "the answer is a bank": there the option text
# decides).
_LETTER_AFTER_MARKER = re.compile(
    r"^[\s*\"'`]*(?:(?:option|choice)\s*)?"
    r"(?:\((?P<p>[A-Za-z])\)|(?P<u>[A-Z])(?![\w'])|(?P<l>[a-z])(?=\s*(?:[.,;:!)\"'*]|$)))"
)
# A bare choice reply (rule 4): "(C)", "C)", "C.", "C:" or a lone "C", then maybe the option's text.
_BARE_LETTER = re.compile(r"(?:\((?P<p>[A-Za-z])\)|(?P<l>[A-Za-z])(?:[).:]|(?=\s*$)))\s*(?P<rest>.*)", re.DOTALL)
_SEPARATOR = " \t*\"'`).:-"  # between a letter and the option text after it: "(C) mall", "C: mall", "C - mall"


class _NoAnswer(Exception):
    """A statement or reply whose expression cannot be evaluated: division by zero, a parenthesis left open."""


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


class _Parser:
    """Recursive descent over `text` from `pos`, exact arithmetic:
        expr := term (("+" | "-") term)*      term := factor (("*" | "x" | "×" | "/" | "÷") factor)*
        factor := ("-" | "+") factor | "(" expr ")" | number
    Each method returns the value and leaves `pos` after it, or returns None and leaves `pos` where it was; an
    operator with no operand after it is not consumed (so the expression ends before it)."""

    def __init__(self, text: str, pos: int = 0) -> None:
        self.text, self.pos, self.depth = text, pos, 0

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def _peek(self, chars: str) -> str | None:
        self._skip()
        c = self.text[self.pos: self.pos + 1]
        return c if c and c in chars else None

    def _chain(self, operand, ops: str) -> Fraction | None:
        """operand (op operand)*, left to right; an operator with no operand after it ends the chain before it."""
        value = operand()
        while value is not None:
            start = self.pos
            op = self._peek(ops)
            if op is not None:
                self.pos += 1
            rhs = None if op is None else operand()
            if rhs is None:
                self.pos = start
                return value
            if op in _DIVIDE and rhs == 0:
                raise _NoAnswer("division by zero")
            value = _APPLY[op](value, rhs)
        return value

    def expr(self) -> Fraction | None:
        return self._chain(self.term, _PLUS + _MINUS)

    def term(self) -> Fraction | None:
        return self._chain(self.factor, _TIMES + _DIVIDE)

    def factor(self) -> Fraction | None:
        start = self.pos
        c = self._peek(_MINUS + _PLUS + "(")
        if c is not None:
            self.pos += 1
            self.depth += 1
            if self.depth > _MAX_DEPTH:  # a degenerate "((((((..." must not exhaust the stack
                raise _NoAnswer("nested too deep")
            value = self.expr() if c == "(" else self.factor()
            self.depth -= 1
            if value is None:
                self.pos = start
                return None
            if c == "(":
                if self._peek(")") is None:
                    raise _NoAnswer("a parenthesis left open")
                self.pos += 1
            return -value if c in _MINUS else value
        m = _OPERAND.match(self.text, self.pos)
        if m is None:
            self.pos = start
            return None
        self.pos = m.end()
        v = Fraction(m["int"].replace(",", "") + (m["dec"] or ""))
        return -v if m["neg"] else v


def _first_expression(text: str) -> Fraction | None:
    """The value of the first arithmetic expression in `text` (rule 3), None if none or if it cannot be evaluated."""
    m = _EXPR_START.search(text)
    if m is None:
        return None
    try:
        return _Parser(text, m.start()).expr()
    except _NoAnswer:
        return None


def _statement_number(statement: str) -> Fraction | None:
    return _first_expression(statement.rpartition("=")[2])


def _bare_number(reply: str) -> Fraction | None:
    """Rule 4, math: the whole reply is an expression ("=" allowed), maybe with one or two unit words after it."""
    *before, last = reply.split("=")
    try:
        for part in before:
            p = _Parser(part)
            if p.expr() is None or part[p.pos:].strip():
                return None
        p = _Parser(last)
        value = p.expr()
    except _NoAnswer:
        return None
    return value if value is not None and _UNIT_WORDS.fullmatch(last, p.pos) else None


_LATEX = [
    (re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}"), r"(\1)/(\2)"),
    (re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\times"), "×"), (re.compile(r"\\div"), "÷"), (re.compile(r"\\cdot"), "*"),
    (re.compile(r"\\([$%])"), r"\1"), (re.compile(r"\\[,;! ]|\\left|\\right|[{}]"), ""),
]


def _boxed(text: str, start: int) -> str | None:
    """The content of the braces opened just before `start`, or None if they never close (a cut completion)."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            content = text[start:i]
            for pattern, repl in _LATEX:
                content = pattern.sub(repl, content)
            return content
    return None


def _statements(text: str) -> list[tuple[str, str]]:
    """(statement, its first line) for each answer statement (rule 2), the last statement first."""
    markers = list(_MARKER.finditer(text))
    out = []
    for m, end in zip(markers, [n.start() for n in markers[1:]] + [len(text)]):
        if m.group().endswith("{"):
            content = _boxed(text, m.end())
            if content is not None:
                out.append((content.strip(), content.strip()))
            continue
        segment = text[m.end():end].lstrip()
        cut = _SENTENCE_END.search(segment)
        out.append((segment[: cut.start()] if cut else segment, segment.split("\n", 1)[0]))
    return out[::-1]


def _bare(text: str) -> str | None:
    """The reply stripped as rule 4 says, or None if it spans more than one line."""
    prev = None
    while text != prev:
        prev, text = text, text.strip().strip("*\"'`").rstrip(".!:")
    return None if "\n" in text else text


def extract_number(text: str) -> str | None:
    """The canonical number of the last statement that states one, else of a bare reply; None (rules 2-4)."""
    for statement, _ in _statements(text):
        value = _statement_number(statement)
        if value is not None:
            return canonical_number(value)
    reply = _bare(text)
    value = _bare_number(reply) if reply else None
    return None if value is None else canonical_number(value)


def _option_at(segment: str, choices: tuple[str, ...] | None, letters: str) -> tuple[int, str] | None:
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


def _opening_option(segment: str, choices: tuple[str, ...] | None, letters: str, strip: str) -> str | None:
    """The letter of the option whose text opens `segment` (after the characters in `strip`), if any."""
    option = _option_at(segment, choices, letters)
    return option[1] if option and option[0] == len(segment) - len(segment.lstrip(strip)) else None


def _letter(m: re.Match | None, letters: str) -> str | None:
    letter = m and next((g for g in (m.group(k) for k in ("p", "u", "l") if k in m.re.groupindex) if g), None)
    return letter.upper() if letter and letter.upper() in letters else None


def _statement_choice(statement: str, line: str, choices: tuple[str, ...] | None, letters: str) -> str | None:
    """Rule 5: the option a statement names, or None (nothing stated, or a letter contradicted by its text)."""
    opening = _opening_option(line, choices, letters, " *\"'`")
    if opening:
        return opening  # "The answer is A Season." is the option "A Season", not the letter A
    m = _LETTER_AFTER_MARKER.match(statement)
    letter = _letter(m, letters)
    if letter:
        follower = _opening_option(statement[m.end():], choices, letters, _SEPARATOR)
        return None if follower and follower != letter else letter
    option = _option_at(statement, choices, letters)
    return option[1] if option else None


def _bare_choice(reply: str, choices: tuple[str, ...] | None, letters: str) -> str | None:
    """Rule 4, choice: a letter alone, a letter with its own option's text, or exactly one option's text."""
    m = _BARE_LETTER.fullmatch(reply)
    letter = _letter(m, letters)
    if letter:
        rest = m["rest"].strip()
        if not rest:
            return letter
        if choices and rest.lower() == choices[letters.index(letter)].strip().lower():
            return letter
    matching = [lt for lt, option in zip(letters, choices or ()) if reply.lower() == option.strip().lower()]
    return matching[0] if len(matching) == 1 else None


def extract_choice(text: str, choices: tuple[str, ...] | None = None) -> str | None:
    """An upper-case option letter from the last statement that names one, else from a bare reply; None (rules
    2, 4, 5)."""
    letters = string.ascii_uppercase[: len(choices)] if choices else "ABCDE"
    for statement, line in _statements(text):
        letter = _statement_choice(statement, line, choices, letters)
        if letter:
            return letter
    reply = _bare(text)
    return _bare_choice(reply, choices, letters) if reply else None


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
