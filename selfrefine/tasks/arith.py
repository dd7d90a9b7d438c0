"""The embedded offline task: seeded multi-step arithmetic word problems and a programmatic teacher.

The teacher stands in for the paper's LLM teacher: for each problem it writes a short, correct step-by-step
rationale (one operation per line) ending in "The answer is N.", stored in `Example.rationale`.
`arith` (in-domain): one person's collection of objects -- buy, give away, share equally -- in 2-3 operations.
`arith_ood` (out-of-domain): a shop's stock, other wording and operations (boxes delivered, sales, returns,
revenue, packing) in 3-4 operations. Numbers stay small; division is always exact.

Determinism: `random.Random` seeded with a string (hashed with SHA-512, independent of PYTHONHASHSEED).
Disjoint splits for every size and seed: a question belongs to "test" iff CRC32(question) % 5 == 0, so the
train and test generators can never produce the same question.
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
_SHOPS = (
    ("bakery", "muffins"), ("bookshop", "notebooks"), ("florist", "roses"), ("toy shop", "toy cars"),
    ("fruit stall", "oranges"), ("sweet shop", "lollipops"),
)
DEFAULT_SIZE = {"train": 1000, "test": 200}

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


def _shop(rng: random.Random, n_ops: int) -> Problem | None:
    """Out-of-domain: a shop's stock changes through the day; then its revenue, bag count, or what is left."""
    place, item = rng.choice(_SHOPS)
    final = rng.choice(("price", "bags", "left"))
    budget = n_ops - (final != "left")
    x = rng.randint(10, 40)
    q, steps = [f"A {place} starts the day with {x} {item}."], []
    while budget > 0:
        op = rng.choice(("delivery", "sale", "customer", "return") if budget >= 2 else ("sale", "customer", "return"))
        b = rng.randint(2, 12)
        if op == "delivery":
            k, c = rng.randint(2, 4), rng.randint(3, 10)
            q.append(f"A delivery brings {k} boxes with {c} {item} in each.")
            steps += [f"The delivery has {k} * {c} = {k * c}.", f"Now there are {x} + {k * c} = {x + k * c}."]
            x, budget = x + k * c, budget - 2
            continue
        if op == "return":
            q.append(f"Later, {b} {item} are brought back.")
            steps.append(f"With {b} brought back: {x} + {b} = {x + b}.")
            x, budget = x + b, budget - 1
            continue
        if b >= x:
            return None
        if op == "sale":
            q.append(f"By noon it has sold {b} of them.")
            steps.append(f"After selling {b}: {x} - {b} = {x - b}.")
        else:
            name = rng.choice(_PEOPLE)[0]
            q.append(f"{name} buys {b} {item}.")
            steps.append(f"After {name} buys {b}: {x} - {b} = {x - b}.")
        x, budget = x - b, budget - 1
    if final == "price":
        p = rng.randint(2, 5)
        q.append(f"If it sells all of them at ${p} each, how many dollars does it get?")
        steps.append(f"{x} {item} at ${p} each give {x} * {p} = {x * p}.")
        x *= p
    elif final == "bags":
        ks = [k for k in range(2, 7) if x % k == 0]
        if not ks:
            return None
        k = rng.choice(ks)
        q.append(f"It packs them all into bags of {k}. How many bags does it fill?")
        steps.append(f"{x} / {k} = {x // k} bags.")
        x //= k
    else:
        q.append(f"How many {item} does the {place} have at the end of the day?")
    return " ".join(q), steps, x


def _generate(task: str, split: str, size: int, seed: int, make: Callable[[random.Random, int], Problem | None],
              n_ops: tuple[int, ...], partition: bool) -> list[Example]:
    rng = random.Random(f"selfrefine/{task}/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(1000 * size):  # a bound, not a budget: rejections are rare
        problem = make(rng, rng.choice(n_ops))
        if problem is None:
            continue
        question, steps, answer = problem
        if question in seen or (partition and (zlib.crc32(question.encode()) % 5 == 0) != (split == "test")):
            continue
        seen.add(question)
        rationale = "\n".join([*steps, f"The answer is {answer}."])
        out.append(Example(id=f"{task}-{split}-{len(out)}", question=question, gold=str(answer), rationale=rationale))
        if len(out) == size:
            return out
    fail(f"{task}: could not generate {size} distinct {split} questions")


def generate_arith(split: str = "test", size: int | None = None, seed: int = 0, ood: bool = False) -> list[Example]:
    """`size` problems of the in-domain ("train"/"test") or out-of-domain ("test" only) set, from `seed`."""
    task = "arith_ood" if ood else "arith"
    splits = ("test",) if ood else ("train", "test")
    if split not in splits:
        fail(f"{task} has splits {', '.join(splits)}; got {split!r}")
    size = DEFAULT_SIZE[split] if size is None else size
    if size < 1:
        fail(f"{task}: size must be >= 1, got {size}")
    if ood:
        return _generate(task, split, size, seed, _shop, (3, 4), partition=False)
    return _generate(task, split, size, seed, _collection, (2, 3), partition=True)


def source(ood: bool) -> Source:
    """The `Task.source` of arith / arith_ood: generated, so a data path is a mistake."""
    def load(path: Path | None, split: str, size: int | None, seed: int) -> list[Example]:
        if path is not None:
            fail(f"{'arith_ood' if ood else 'arith'} is generated from a seed; it reads no files (got {path})")
        return generate_arith(split, size, seed, ood)
    return load
