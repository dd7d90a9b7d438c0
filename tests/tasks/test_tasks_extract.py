"""Answer extraction and scoring on hand-checked completions, tricky ones included."""

from __future__ import annotations

from fractions import Fraction

import pytest

from selfrefine.tasks.extract import canonical_number, extract_answer, is_correct, normalize_number, parse_number

MATH = [
    ("The answer is 18.", "18"),
    ("She makes 9 * 2 = $18 every day.\nThe answer is $18.", "18"),
    ("Total cost: $1,200.50 in all. The answer is $1,200.50.", "1200.5"),
    ("It drops 8 degrees, so 5 - 8 = -3.\nThe answer is -3.", "-3"),
    ("Each gets 3/4 of a pie. The answer is 3/4.", "0.75"),
    ("The answer is 1/3.", "1/3"),
    ("The answer is 18.0.", "18"),
    ("The answer is 18.50", "18.5"),
    ("The answer is 1,080.", "1080"),
    ("The answer is 5. So the answer is 5.", "5"),  # restated
    ("The answer is 5. Wait, 2 + 4 = 6. The answer is 6.", "6"),  # corrected: the last statement wins
    ("The answer is 18. Check: 9 * 2 = 18 and 3 + 4 = 7.", "18"),  # numbers in reasoning after the answer
    ("The answer is 12.\n\nQuestion: Bob has 3 pens and buys 4 more.", "12"),  # rambling on to a new question
    ("He has 12 + 5 = 17 apples.", "17"),  # no statement: the last number
    ("10-3=7", "7"),  # a subtraction, not "-3"
    ("#### 72", "72"),
    ("Answer: 42", "42"),
    ("The final answer is \\boxed{25}.", "25"),
    ("The answer is:\n36", "36"),
    ("The answer is 42 apples, since 40 + 2 = 42.", "42"),
    ("The answer is unclear, but he has 40 + 2 = 42 apples.", "40"),  # a statement's first number counts
    ("I do not know.", None),  # no answer at all
    ("", None),
    ("The answer is N.", None),  # the template echoed back
    ("v2 of the plan", None),  # "2" is part of a word
    ("It costs 0.5 dollars. The answer is $-0.5", "-0.5"),
    ("The balance is -$5. The answer is -$5.", "-5"),
    ("THE ANSWER IS 9", "9"),
]

CHOICES = ("bank", "library", "department store", "mall", "new york")
CHOICE = [
    ("The answer is (C).", "C"),
    ("The answer is C.", "C"),
    ("answer: c", "C"),
    ("The answer is (c)", "C"),
    ("So the answer is option D.", "D"),
    ("The answer is (B). Wait, I mean the answer is (E).", "E"),
    ("The answer is (B). So the answer is (B).", "B"),
    ("The answer is department store.", "C"),  # the option's text
    ('The answer is "library".', "B"),
    ("The answer is a bank.", "A"),  # "a" is an article here; the option text decides
    ("The answer is a mall, not a bank.", "D"),
    ("(D)", "D"),
    ("D", "D"),
    ("b) library", "B"),
    ("E. new york", "E"),
    ("mall", "D"),
    ("A person would go to (A) or maybe (D) mall.", "D"),  # no statement: the last "(X)"
    ("A person would go there.", None),  # "A" the article is not an answer
    ("The answer is (F).", None),  # not one of five options
    ("I am not sure.", None),
]


@pytest.mark.parametrize("text,expected", MATH)
def test_extract_math(text: str, expected: str | None) -> None:
    assert extract_answer(text, "math") == expected


@pytest.mark.parametrize("text,expected", CHOICE)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_answer(text, "choice", CHOICES) == expected


def test_choice_letters_limited_by_option_count() -> None:
    assert extract_answer("The answer is (C).", "choice", ("yes", "no")) is None
    assert extract_answer("The answer is (B).", "choice", ("yes", "no")) == "B"
    assert extract_answer("The answer is (E).", "choice", None) == "E"  # unknown options: A-E


def test_number_normalisation() -> None:
    assert parse_number("$1,200.50") == Fraction(240100, 200)
    assert parse_number("-3") == -3 and parse_number("3/4") == Fraction(3, 4)
    assert parse_number("three") is None and parse_number("12 apples") is None
    assert [normalize_number(s) for s in ("18.0", "007", "2.500", "1/8", "-6/4")] == ["18", "7", "2.5", "0.125", "-1.5"]
    assert canonical_number(Fraction(2, 3)) == "2/3"


@pytest.mark.parametrize("pred,gold,kind,ok", [
    ("18", "18", "math", True), ("18.0", "18", "math", True), ("0.75", "3/4", "math", True),
    ("1,080", "1080", "math", True), ("17", "18", "math", False), (None, "18", "math", False),
    ("x", "18", "math", False), ("c", "C", "choice", True), ("B", "C", "choice", False), (None, "C", "choice", False),
])
def test_is_correct(pred: str | None, gold: str, kind: str, ok: bool) -> None:
    assert is_correct(pred, gold, kind) is ok


def test_unknown_kind_is_a_bug() -> None:
    with pytest.raises(ValueError):
        extract_answer("The answer is 3.", "yesno")
    with pytest.raises(ValueError):
        is_correct("3", "3", "yesno")


def test_options_that_start_like_letters() -> None:
    """Real OpenBookQA / Social IQa options open with "A ..."; the statement's option text wins over the letter."""
    obqa = ("A session", "A Match", "A Season", "Autumn")
    assert extract_answer("The answer is A Season.", "choice", obqa) == "C"
    assert extract_answer("A Season", "choice", obqa) == "C"
    assert extract_answer("The answer is (A).", "choice", obqa) == "A"
    assert extract_answer("The answer is B and D.", "choice", ("B and D", "fur", "ears", "tails")) == "A"
    assert extract_answer("The answer is C because a store sells it.", "choice", CHOICES) == "C"
