"""Prompt texts (pinned exactly: they are part of every reported number) and demonstrations."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfrefine.tasks import Example, demonstration, extract_answer, get_task, is_correct, render_prompt

FIX = Path(__file__).resolve().parents[1] / "fixtures"
MATH = Example("m", "Tom has 3 pens. He buys 2 more. How many pens does he have?", "5")
CHOICE = Example("c", "Where do you buy bread?", "A", choices=("bakery", "garage", "bank"))


def test_math_prompts() -> None:
    assert render_prompt(MATH, "math", "cot") == (
        "Tom has 3 pens. He buys 2 more. How many pens does he have?\n"
        'End with "The answer is N." where N is a number. Let\'s think step by step.')
    assert render_prompt(MATH, "math", "direct") == (
        "Tom has 3 pens. He buys 2 more. How many pens does he have?\nAnswer with only the final answer.")


def test_choice_prompts() -> None:
    assert render_prompt(CHOICE, "choice", "cot") == (
        "Where do you buy bread?\n(A) bakery\n(B) garage\n(C) bank\n"
        'End with "The answer is (X)." where X is the letter. Let\'s think step by step.')
    assert render_prompt(CHOICE, "choice", "direct") == (
        "Where do you buy bread?\n(A) bakery\n(B) garage\n(C) bank\nAnswer with only the letter.")


def test_bad_arguments_are_bugs() -> None:
    with pytest.raises(ValueError):
        render_prompt(MATH, "math", "fewshot")
    with pytest.raises(ValueError):
        render_prompt(MATH, "yesno", "cot")


def test_demonstrations() -> None:
    gsm = get_task("gsm8k").load(FIX / "gsm8k")[1]
    assert demonstration(gsm, "math") == "It sells 90*12 = 1,080 eggs.\nThe answer is 1080."
    assert demonstration(Example("c", "q", "B", ("x", "y"), rationale="Because y."), "choice") == (
        "Because y.\nThe answer is (B).")
    assert demonstration(CHOICE, "choice") is None  # no rationale in the data set
    assert demonstration(Example("m", "q", "4", rationale="2 + 2 = 4.\nThe answer is 4."), "math") == (
        "2 + 2 = 4.\nThe answer is 4.")  # already closed by the teacher: unchanged


@pytest.mark.parametrize("name", ["gsm8k", "commonsenseqa", "openbookqa", "piqa", "socialiqa", "multiarith"])
def test_demonstrations_score_as_correct(name: str) -> None:
    """The closing sentence of a demonstration is exactly what extraction reads back as the gold answer."""
    task = get_task(name)
    for e in task.load(FIX / name):
        demo = demonstration(e, task.kind) or demonstration(
            Example(e.id, e.question, e.gold, e.choices, rationale="Some reasoning with 12 and (A)."), task.kind)
        assert is_correct(extract_answer(demo, task.kind, e.choices), e.gold, task.kind), demo
