"""Prompt templates (the user turn) and demonstrations (the assistant turn the student is fine-tuned on).

Short on purpose: a 135M student on a CPU reads every token of them, thousands of times. The CoT instruction names
the exact closing sentence so that `extract_answer` finds it, and the demonstrations end with that same sentence.
"""

from __future__ import annotations

import re
import string

from . import Example

ANSWER_PREFIX = "The answer is"
_COT = {
    "math": f'End with "{ANSWER_PREFIX} N." where N is a number. Let\'s think step by step.',
    "choice": f'End with "{ANSWER_PREFIX} (X)." where X is the letter. Let\'s think step by step.',
}
_DIRECT = {
    "math": "Answer with only the final answer.",
    "choice": "Answer with only the letter.",
}
_ENDS_WITH_ANSWER = re.compile(rf"{ANSWER_PREFIX} .+\.$")


def format_options(choices: tuple[str, ...]) -> str:
    return "\n".join(f"({letter}) {text}" for letter, text in zip(string.ascii_uppercase, choices))


# The user turn, by task kind; a choice question without separate options is laid out as a math one.
TEMPLATES = {"math": "{question}\n{instruction}", "choice": "{question}\n{options}\n{instruction}"}


def instruction(kind: str, prompt_type: str) -> str:
    """The sentence closing the user turn: how to answer ("cot": reason, then the answer sentence; "direct")."""
    if kind not in _COT:
        raise ValueError(f"unknown task kind {kind!r} (expected 'math' or 'choice')")
    if prompt_type not in ("cot", "direct"):
        raise ValueError(f"unknown prompt type {prompt_type!r} (expected 'cot' or 'direct')")
    return (_COT if prompt_type == "cot" else _DIRECT)[kind]


def render_prompt(example: Example, kind: str, prompt_type: str) -> str:
    """The user-turn text: the question, its lettered options (choice tasks), then the instruction."""
    text = instruction(kind, prompt_type)
    template = TEMPLATES["choice" if kind == "choice" and example.choices else "math"]
    return template.format(question=example.question, options=format_options(example.choices or ()),
                           instruction=text)


def answer_sentence(gold: str, kind: str) -> str:
    """The closing sentence the CoT prompt asks for: "The answer is 18." / "The answer is (C)."."""
    return f"{ANSWER_PREFIX} ({gold})." if kind == "choice" else f"{ANSWER_PREFIX} {gold}."


def demonstration(example: Example, kind: str) -> str | None:
    """A CoT completion built from the data set's own rationale (None when it has none), ending in the answer
    sentence; a rationale that already ends in one (the arith teacher's) is returned as it is."""
    if not example.rationale or not example.rationale.strip():
        return None
    rationale = example.rationale.strip()
    if _ENDS_WITH_ANSWER.search(rationale.rsplit("\n", 1)[-1]):
        return rationale
    return f"{rationale}\n{answer_sentence(example.gold, kind)}"
