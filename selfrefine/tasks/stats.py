"""Wilson score interval: the binomial confidence interval that stays inside [0, 1] and behaves at k=0 or k=n,
where the normal (Wald) interval collapses to a width of zero. Accuracies on a few hundred questions need it.

Paired comparison: two models graded on the same questions, the exact McNemar test and Agresti and Min's
adjusted Wald interval for the difference of their accuracies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """(low, high) for the success rate after `k` successes in `n` trials (z=1.96: 95%)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # The ends are exactly 0 at k=0 and 1 at k=n; say so rather than trust rounding to land there.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


@dataclass(frozen=True)
class PairedComparison:
    """Two models graded on the same questions: B against A (diff = accuracy(B) - accuracy(A))."""

    n: int
    correct_a: int
    correct_b: int
    only_a: int  # questions A got right and B wrong
    only_b: int  # questions B got right and A wrong
    diff: float
    ci95: tuple[float, float]
    p: float  # exact McNemar (two-sided binomial test on the discordant questions)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Exact McNemar p-value: the two-sided binomial test of `only_b` against `only_a` discordant questions
    with success probability 1/2, i.e. min(1, 2 * P[X <= min(only_a, only_b)]) for X ~ Binomial(d, 1/2),
    d = only_a + only_b. Summed exactly in integers; 1.0 when there is no discordant question."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    d = only_a + only_b
    if d == 0:
        return 1.0
    tail = sum(math.comb(d, i) for i in range(min(only_a, only_b) + 1))  # numerator over 2**d
    return min(1.0, 2 * tail / 2**d)  # int / int is correctly rounded, even for d in the thousands


def paired_comparison(a: Sequence[bool], b: Sequence[bool], z: float = 1.96) -> PairedComparison:
    """Compare B with A graded on the same questions (`a[i]`, `b[i]`: question i answered correctly).

    `diff` = accuracy(B) - accuracy(A) = (only_b - only_a) / n. `p` is the exact McNemar test
    (`mcnemar_exact_p`): only the discordant questions carry information about the difference.

    `ci95` (for z=1.96) is Agresti and Min's adjusted Wald interval for the difference of matched proportions:
    add 1/2 to each of the four cells of the 2x2 table (n -> n + 2, only_a -> only_a + 1/2, only_b -> only_b + 1/2)
    and take the Wald interval of the adjusted table,

        d* = (only_b - only_a) / (n + 2)
        d* +- z * sqrt(((only_a + only_b + 1) / (n + 2) - d*^2) / (n + 2)),

    clipped to [-1, 1]. Unlike the plain Wald interval it does not collapse to a single point when no question is
    discordant (its width there is 2z / (n + 2)), and its coverage stays close to nominal for small n.
    Reference: A. Agresti and Y. Min, "Simple improved confidence intervals for comparing matched proportions",
    Statistics in Medicine 24(5):729-740, 2005 (the "add 0.5 to every cell" interval; Newcombe 1998's method 10
    is the main alternative). The interval is centred on the shrunken d*, so it is not symmetric about `diff`
    (it contains `diff` at z=1.96 in every table up to n=14, checked exhaustively by the tests).
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must grade the same questions: {len(a)} != {len(b)} answers")
    n = len(a)
    if n == 0:
        raise ValueError("no questions to compare")
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    a, b = [bool(x) for x in a], [bool(x) for x in b]
    correct_a, correct_b = sum(a), sum(b)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    m = n + 2
    center = (only_b - only_a) / m
    half = z * math.sqrt(((only_a + only_b + 1) / m - center * center) / m)  # > 0: (d+1)(n+2) > d^2
    ci = (max(-1.0, center - half), min(1.0, center + half))
    return PairedComparison(n=n, correct_a=correct_a, correct_b=correct_b, only_a=only_a, only_b=only_b,
                            diff=(correct_b - correct_a) / n, ci95=ci, p=mcnemar_exact_p(only_a, only_b))
