"""The embedded offline task: seeded multi-step arithmetic word problems and a programmatic teacher.

The teacher stands in for the paper's LLM teacher: for each problem it writes a short, correct step-by-step
rationale (one operation per line) ending in "The answer is N.", stored in `Example.rationale`.
`arith` (in-domain): one person's collection of objects -- buy, give away, share equally -- in 2-3 operations.
`arith_ood` (out-of-domain): the same story (`_story`: a count changed 2-3 times, small numbers) in another
`Wording`: other objects, verbs and question forms -- packs, finding, losing, equal piles, "end up with", "in the
end". What transfers is the skill, not the surface: that is what makes it out of domain. Its "dev" split
(disjoint from "test") is for calibration, "test" only for reporting. Calibration, on dev (200 questions) with
the seed-0 SFT student of the demo: other settings and question forms (a bus's passengers, "N more than", money
spent) scored about 5% with 2-3 and with 1-2 operations, and openings other than "X has N ..." 2-6%; two
phrasings scored 4% ("Sam gives him 5 coins", an addition worded like the in-domain subtraction "gives") and
2% ("she uses 3 of them"), so the whole wording 12%. Out of a 135M student's reach, they would tell nothing
about transfer; without them this wording scores 18% (seed 0) and 23% (seed 1) on dev.

Determinism: `random.Random` seeded with a string (hashed with SHA-512, independent of PYTHONHASHSEED).
Disjoint splits for every size and seed: a question belongs to "test" iff CRC32(question) % 5 == 0, so the
train (arith) or dev (arith_ood) generator can never produce a test question.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Wording:
    """How a story is told: `str.format` templates over name, subj, friend, obj, k, b, x and y (the result).
    Where a tuple offers several phrasings one is drawn at random."""

    objects: tuple[str, ...]
    batch: str  # k groups of b: the start
    batch_step: str
    start: str  # or a plain count
    add: tuple[str, ...]
    add_step: str
    sub: tuple[str, ...]
    sub_step: str
    split: str  # x shared out into k equal parts: the question
    split_step: str
    end: tuple[str, ...]  # the question when nothing is shared


IN_DOMAIN = Wording(
    _OBJECTS, "{name} buys {k} bags of {b} {obj}.", "{name} has {k} * {b} = {x} {obj}.", "{name} has {x} {obj}.",
    ("{subj} buys {b} more.",), "After buying {b} more: {x} + {b} = {y}.",
    ("{subj} gives {b} to {friend}.",), "After giving {b} away: {x} - {b} = {y}.",
    "{subj} shares them equally among {k} friends. How many {obj} does each friend get?",
    "Each friend gets {x} / {k} = {y}.", ("How many {obj} does {name} have now?",))
# Out of domain: the same reasoning with other objects, verbs and question forms -- packs, finding, losing,
# equal piles, "end up with" (see the module docstring for the phrasings tried and dropped on dev).
OUT_OF_DOMAIN = Wording(
    _OOD_OBJECTS, "{name} gets {k} packs with {b} {obj} in each pack.", "{k} packs of {b}: {k} * {b} = {x} {obj}.",
    "{name} has {x} {obj}.", ("{subj} finds {b} more.",),
    "With {b} more: {x} + {b} = {y}.", ("{subj} loses {b} of them.",),
    "With {b} fewer: {x} - {b} = {y}.",
    "{subj} puts them into {k} equal piles. How many {obj} are in each pile?", "Each pile has {x} / {k} = {y}.",
    ("How many {obj} does {name} have in the end?", "How many {obj} does {name} end up with?"))


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    """One of the phrasings; a single one draws nothing, so adding phrasings never changes another wording's
    problems."""
    return options[0] if len(options) == 1 else rng.choice(options)


def _story(rng: random.Random, n_ops: int, w: Wording) -> Problem | None:
    """A person's count of objects: a start (maybe k groups of b), then additions and subtractions, maybe
    shared out equally at the end; `n_ops` operations in all."""
    (name, pron), (friend, _) = rng.sample(_PEOPLE, 2)
    obj = rng.choice(w.objects)
    v = {"name": name, "subj": pron.capitalize(), "friend": friend, "obj": obj}
    batch, share = rng.random() < 0.5, rng.random() < 0.5
    q: list[str] = []
    steps: list[str] = []
    if batch:
        k, b = rng.randint(2, 5), rng.randint(2, 10)
        x = k * b
        q.append(w.batch.format(**v, k=k, b=b))
        steps.append(w.batch_step.format(**v, k=k, b=b, x=x))
    else:
        x = rng.randint(5, 30)
        q.append(w.start.format(**v, x=x))
    for _ in range(n_ops - batch - share):
        b = rng.randint(1, 10)
        if rng.random() < 0.5:
            q.append(_pick(rng, w.add).format(**v, b=b))
            steps.append(w.add_step.format(b=b, x=x, y=x + b))
            x += b
        else:
            if b >= x:
                return None
            q.append(_pick(rng, w.sub).format(**v, b=b))
            steps.append(w.sub_step.format(b=b, x=x, y=x - b))
            x -= b
    if share:
        ks = [k for k in range(2, 7) if x % k == 0]
        if not ks:
            return None
        k = rng.choice(ks)
        q.append(w.split.format(**v, k=k))
        steps.append(w.split_step.format(k=k, x=x, y=x // k))
        x //= k
    else:
        q.append(_pick(rng, w.end).format(**v))
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
    return _generate(task, split, size, seed, lambda rng, n: _story(rng, n, OUT_OF_DOMAIN if ood else IN_DOMAIN), (2, 3))


def source(ood: bool) -> Source:
    """The `Task.source` of arith / arith_ood: generated, so a data path is a mistake."""
    def load(path: Path | None, split: str, size: int | None, seed: int) -> list[Example]:
        if path is not None:
            fail(f"{'arith_ood' if ood else 'arith'} is generated from a seed; it reads no files (got {path})")
        return generate_arith(split, size, seed, ood)
    return load
