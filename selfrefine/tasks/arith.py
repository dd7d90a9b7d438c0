"""The embedded offline task: seeded multi-step arithmetic word problems and a programmatic teacher.

The teacher stands in for the paper's LLM teacher: for each problem it writes a short, correct step-by-step
rationale (one operation per line) ending in "The answer is N.", stored in `Example.rationale`.
`arith` (in-domain): one person's collection of objects -- buy, give away, share equally -- in 2-3 operations.
`arith_ood` (out-of-domain): the same reasoning (a count changed 2-3 times, small numbers) told with other
objects, verbs and question forms than `arith`: packs, finding, losing, using, being given (an
addition worded like the in-domain subtraction "gives"), equal piles, "end up with". What transfers is
the skill, not the surface: that is what makes it out of domain. Other settings and question forms (a bus's
passengers, "N more than", money spent), 1-2 operations, and openings other than "X has N ..." were tried
first on the "dev" split: the seed-0 SFT demo student scored about 5% on the first two and 2-6% on those
openings, out of reach for a 135M model, so they would tell nothing about transfer. Its "dev" split (disjoint from "test") is
for calibrating choices; "test" is only for reporting.

Determinism: `random.Random` seeded with a string (hashed with SHA-512, independent of PYTHONHASHSEED).
Disjoint splits for every size and seed: a question belongs to "test" iff CRC32(question) % 5 == 0, so the
train (arith) or dev (arith_ood) generator can never produce a test question.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Callable

from ..errors import fail
from . import Example, Source

_PEOPLE = (
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Ben", "he"),
    ("Lily", "she"), ("Max", "he"), ("Emma", "she"), ("Tom", "he"), ("Nora", "she"), ("Jack", "he"),
    ("Ella", "she"), ("Noah", "he"), ("Ruby", "she"), ("Finn", "he"),
)
_OBJECTS = ("apples", "pencils", "stickers", "marbles", "cookies", "cards", "shells", "stamps", "balloons", "books")
_OOD_OBJECTS = ("coins", "buttons", "beads", "crayons", "postcards", "pebbles", "badges", "ribbons", "nuts", "tokens")
DEFAULT_SIZE = {"train": 1000, "dev": 200, "test": 200}

Problem = tuple[str, list[str], int]  # question, rationale lines, answer


def _collection(rng: random.Random, n_ops: int) -> Problem | None:
    """In-domain: a person buys (maybe in bags), gives some away, maybe shares the rest equally."""
    (name, pron), (friend, _) = rng.sample(_PEOPLE, 2)
    obj, subj = rng.choice(_OBJECTS), pron.capitalize()
    bags, share = rng.random() < 0.5, rng.random() < 0.5
    q: list[str] = []
    steps: list[str] = []
    if bags:
        k, b = rng.randint(2, 5), rng.randint(2, 10)
        x = k * b
        q.append(f"{name} buys {k} bags of {b} {obj}.")
        steps.append(f"{name} has {k} * {b} = {x} {obj}.")
    else:
        x = rng.randint(5, 30)
        q.append(f"{name} has {x} {obj}.")
    for _ in range(n_ops - bags - share):
        b = rng.randint(1, 10)
        if rng.random() < 0.5:
            q.append(f"{subj} buys {b} more.")
            steps.append(f"After buying {b} more: {x} + {b} = {x + b}.")
            x += b
        else:
            if b >= x:
                return None
            q.append(f"{subj} gives {b} to {friend}.")
            steps.append(f"After giving {b} away: {x} - {b} = {x - b}.")
            x -= b
    if share:
        ks = [k for k in range(2, 7) if x % k == 0]
        if not ks:
            return None
        k = rng.choice(ks)
        q.append(f"{subj} shares them equally among {k} friends. How many {obj} does each friend get?")
        steps.append(f"Each friend gets {x} / {k} = {x // k}.")
        x //= k
    else:
        q.append(f"How many {obj} does {name} have now?")
    return " ".join(q), steps, x


def _reworded(rng: random.Random, n_ops: int) -> Problem | None:
    """Out-of-domain: the in-domain reasoning (a count changed 2-3 times) told in words and with objects and
    question forms the student never trains on -- packs instead of bags, finding, losing, using, being given
    (an addition worded like the in-domain subtraction "gives"), equal piles or boxes instead of friends."""
    (name, pron), (friend, _) = rng.sample(_PEOPLE, 2)
    obj, subj = rng.choice(_OOD_OBJECTS), pron.capitalize()
    them = "her" if pron == "she" else "him"
    packs, split = rng.random() < 0.5, rng.random() < 0.5
    q: list[str] = []
    steps: list[str] = []
    if packs:
        k, b = rng.randint(2, 5), rng.randint(2, 10)
        x = k * b
        q.append(f"{name} gets {k} packs with {b} {obj} in each pack.")
        steps.append(f"{k} packs of {b}: {k} * {b} = {x} {obj}.")
    else:
        x = rng.randint(5, 30)
        q.append(f"{name} has {x} {obj}.")
    for _ in range(n_ops - packs - split):
        b = rng.randint(1, 10)
        if rng.random() < 0.5:
            q.append(rng.choice((f"{subj} finds {b} more.", f"{friend} gives {them} {b} {obj}.")))
            steps.append(f"With {b} more: {x} + {b} = {x + b}.")
            x += b
        else:
            if b >= x:
                return None
            q.append(rng.choice((f"{subj} loses {b} of them.", f"{subj} uses {b} of them.")))
            steps.append(f"With {b} fewer: {x} - {b} = {x - b}.")
            x -= b
    if split:
        ks = [k for k in range(2, 7) if x % k == 0]
        if not ks:
            return None
        k = rng.choice(ks)
        q.append(f"{subj} puts them into {k} equal piles. How many {obj} are in each pile?")
        steps.append(f"Each pile has {x} / {k} = {x // k}.")
        x //= k
    else:
        q.append(rng.choice((f"How many {obj} does {name} have in the end?", f"How many {obj} does {name} end up with?")))
    return " ".join(q), steps, x


def _generate(task: str, split: str, size: int, seed: int, make: Callable[[random.Random, int], Problem | None],
              n_ops: tuple[int, ...]) -> list[Example]:
    rng = random.Random(f"selfrefine/{task}/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(1000 * size):  # a bound, not a budget: rejections are rare
        problem = make(rng, rng.choice(n_ops))
        if problem is None:
            continue
        question, steps, answer = problem
        if question in seen or (zlib.crc32(question.encode()) % 5 == 0) != (split == "test"):
            continue
        seen.add(question)
        rationale = "\n".join([*steps, f"The answer is {answer}."])
        out.append(Example(id=f"{task}-{split}-{len(out)}", question=question, gold=str(answer), rationale=rationale))
        if len(out) == size:
            return out
    fail(f"{task}: could not generate {size} distinct {split} questions")


def generate_arith(split: str = "test", size: int | None = None, seed: int = 0, ood: bool = False) -> list[Example]:
    """`size` problems of the in-domain ("train"/"test") or out-of-domain ("dev"/"test") set, from `seed`."""
    task = "arith_ood" if ood else "arith"
    splits = ("dev", "test") if ood else ("train", "test")
    if split not in splits:
        fail(f"{task} has splits {', '.join(splits)}; got {split!r}")
    size = DEFAULT_SIZE[split] if size is None else size
    if size < 1:
        fail(f"{task}: size must be >= 1, got {size}")
    return _generate(task, split, size, seed, _reworded if ood else _collection, (2, 3))


def source(ood: bool) -> Source:
    """The `Task.source` of arith / arith_ood: generated, so a data path is a mistake."""
    def load(path: Path | None, split: str, size: int | None, seed: int) -> list[Example]:
        if path is not None:
            fail(f"{'arith_ood' if ood else 'arith'} is generated from a seed; it reads no files (got {path})")
        return generate_arith(split, size, seed, ood)
    return load
