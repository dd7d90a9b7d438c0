"""The embedded arith task: determinism, correct answers (recomputed from the question text by an independent
parser), disjoint splits, and a teacher rationale whose every step and final statement are right."""

from __future__ import annotations

import hashlib
import re

import pytest

from selfrefine.errors import UserError
from selfrefine.tasks import Example, demonstration, extract_answer, get_task

ARITH, OOD = get_task("arith"), get_task("arith_ood")

# One rule per sentence form: (pattern, how it changes the running quantity). Written from the question wording
# alone, so it checks the generator's answers without sharing its code.
RULES = [
    (r"^\w+ has (\d+) [\w ]+$", lambda x, a: a),
    (r"^\w+ buys (\d+) bags of (\d+) [\w ]+$", lambda x, a, b: a * b),
    (r"^(?:He|She) buys (\d+) more$", lambda x, a: x + a),
    (r"^(?:He|She) gives (\d+) to \w+$", lambda x, a: x - a),
    (r"^(?:He|She) shares them equally among (\d+) friends$", lambda x, a: x / a),
    (r"^\w+ gets (\d+) packs with (\d+) [\w ]+ in each pack$", lambda x, a, b: a * b),
    (r"^(?:He|She) finds (\d+) more$", lambda x, a: x + a),
    (r"^\w+ gives (?:her|him) (\d+) [\w ]+$", lambda x, a: x + a),
    (r"^(?:He|She) (?:loses|uses) (\d+) of them$", lambda x, a: x - a),
    (r"^(?:He|She) puts them into (\d+) equal piles$", lambda x, a: x / a),
    (r"^How many [\w ]+$", lambda x: x),
]
def solve(question: str) -> float:
    x = None
    for sentence in re.split(r"(?<=[.?])\s+", question):
        for pattern, rule in RULES:
            m = re.match(pattern, sentence.rstrip(".?"))
            if m:
                x = rule(x, *map(int, m.groups()))
                assert x is not None and x >= 0, sentence
                break
        else:
            raise AssertionError(f"unparsed sentence: {sentence!r}")
    return x


def check_example(e: Example, steps: tuple[int, ...]) -> None:
    answer = solve(e.question)
    assert answer == int(answer) and str(int(answer)) == e.gold  # exact integer division only
    lines = e.rationale.split("\n")
    assert lines[-1] == f"The answer is {e.gold}." and len(lines) - 1 in steps
    for line in lines[:-1]:  # every teacher step is true arithmetic
        expr, c = re.search(r"(\d+(?: [-+*/] \d+)+) = (\d+)", line).groups()
        assert eval(expr) == int(c), line  # digits and operators only (the pattern)
    assert extract_answer(e.rationale, "math") == e.gold
    assert demonstration(e, "math") == e.rationale
    assert len(e.question.split()) <= 60 and len(e.rationale.split()) <= 60  # short: read on a CPU


def test_in_domain_answers_and_rationales() -> None:
    for e in ARITH.load(split="train", size=300) + ARITH.load(split="test"):
        check_example(e, (2, 3))


def test_out_of_domain_answers_and_rationales() -> None:
    """The same reasoning in other words: every in-domain verb and object is gone, every new phrasing occurs."""
    ood = OOD.load() + OOD.load(split="dev")
    for e in ood:
        check_example(e, (2, 3))
    text = " ".join(e.question for e in ood)
    for phrase in ("packs with", "finds", "loses", "equal piles", "end up with", "in the end"):
        assert phrase in text, phrase
    assert " gives " not in text and " uses " not in text  # the phrasings dropped on dev (the module docstring)
    in_domain = ARITH.load(split="train")
    for phrase in (" buys ", " bags of ", " shares them ", " friends"):
        assert phrase not in text and any(phrase in e.question for e in in_domain), phrase
    assert not {w for e in ood for w in e.question.split()} & {"apples", "pencils", "marbles", "stamps"}


def test_sizes_and_defaults() -> None:
    assert len(ARITH.load(split="train")) == 1000 and len(ARITH.load()) == 200 and len(OOD.load()) == 200
    assert len(OOD.load(split="dev")) == 200
    assert len(ARITH.load(size=7)) == 7 and len(ARITH.load(size=50, limit=5)) == 5
    assert ARITH.load(size=20) == ARITH.load(size=200)[:20]  # a bigger set extends a smaller one
    ids = [e.id for e in ARITH.load(split="train")]
    assert len(set(ids)) == len(ids) and ids[0] == "arith-train-0"


def test_skip_gives_the_questions_after_those_trained_on() -> None:
    """A validation split from the training split: `skip` passes over the first questions, for any size."""
    train = ARITH.load(split="train", size=40)
    val = ARITH.load(split="train", size=25, skip=40)
    assert val == ARITH.load(split="train", size=65)[40:] and len(val) == 25
    assert not {e.question for e in train} & {e.question for e in val}
    assert val[0].id == "arith-train-40" and ARITH.load(split="train", size=65, skip=40, limit=3) == val[:3]
    with pytest.raises(UserError, match="skip"):
        ARITH.load(skip=-1)


def test_splits_disjoint_and_no_duplicates() -> None:
    train = {e.question for e in ARITH.load(split="train", size=3000)}
    for seed in (0, 1):
        test = [e.question for e in ARITH.load(split="test", size=500, seed=seed)]
        assert len(set(test)) == len(test) and not train & set(test)
    assert len(train) == 3000
    assert not train & {e.question for e in OOD.load()}
    assert not {e.question for e in OOD.load(split="dev", size=1000)} & {e.question for e in OOD.load(size=500)}


def digest(examples: list[Example]) -> str:
    return hashlib.sha256("\n".join(f"{e.question}|{e.gold}" for e in examples).encode()).hexdigest()[:16]


def test_deterministic_across_machines() -> None:
    """Pinned values: a change here changes every arith number ever reported, so it must be deliberate."""
    assert digest(ARITH.load(split="train", size=50)) == "732c0c3f30730565"
    assert digest(ARITH.load(split="test", size=50)) == "8460b698fa448207"
    assert digest(OOD.load(size=50)) == "eb0432d38476f03f"
    first = ARITH.load(size=1)[0]
    assert first.question == ("Jack has 24 shells. He buys 1 more. He gives 3 to Mia. "
                              "He shares them equally among 2 friends. How many shells does each friend get?")
    assert ARITH.load(seed=1) != ARITH.load(seed=0) and ARITH.load(seed=3) == ARITH.load(seed=3)


@pytest.mark.parametrize("call,message", [
    (lambda: OOD.load(split="train"), "arith_ood has splits dev, test"),
    (lambda: ARITH.load(split="dev"), "arith has splits train, test"),
    (lambda: ARITH.load(size=0), "size must be >= 1"),
    (lambda: ARITH.load(path="data.jsonl"), "reads no files"),
])
def test_user_errors(call, message: str) -> None:
    with pytest.raises(UserError, match=message):
        call()
