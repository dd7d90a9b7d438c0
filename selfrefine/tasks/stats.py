"""Wilson score interval: the binomial confidence interval that stays inside [0, 1] and behaves at k=0 or k=n,
where the normal (Wald) interval collapses to a width of zero. Accuracies on a few hundred questions need it.

Paired comparison: two models graded on the same questions, the exact McNemar test and Agresti and Min's
adjusted Wald interval for the difference of their accuracies.

Seed level: one number per seed (a paired difference, say), Student's t interval and test of their mean. With a
handful of seeds the t distribution's heavy tails are the honest width; the normal interval would be too narrow."""

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


def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by Lentz's continued fraction (Numerical Recipes,
    section 6.4), evaluated where it converges fast (x < (a + 1) / (a + b + 2)) and by symmetry elsewhere."""
    if not 0 <= x <= 1:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0, 1):
        return float(x)
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d, f = 1e-300, 1.0, 0.0, 1.0  # f = 1 / (1 + d1 / (1 + d2 / ...)), d_i the fraction's terms
    for i in range(400):
        m = i // 2
        if i == 0:
            term = 1.0
        elif i % 2:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 + term * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + term / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1) < 1e-15:
            return front * (f - 1)
    raise ArithmeticError(f"incomplete beta did not converge at x={x}, a={a}, b={b}")


def student_t_cdf(t: float, df: int) -> float:
    """P[T <= t] for Student's t with `df` degrees of freedom: the two tails beyond |t| hold I_{df/(df+t^2)}(df/2,
    1/2), the middle I_{t^2/(df+t^2)}(1/2, df/2); the smaller of the two is computed, so neither loses digits."""
    if t * t < df:
        middle = incomplete_beta(t * t / (df + t * t), 0.5, df / 2)
        return 0.5 + math.copysign(middle, t) / 2
    tails = incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return 1 - tails / 2 if t > 0 else tails / 2


def student_t_quantile(q: float, df: int) -> float:
    """The t with P[T <= t] = q, by bisection on the cdf (monotone; 200 halvings reach double precision)."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > q:
        lo *= 2
    while student_t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class SeedLevel:
    """Per-seed values (each seed's paired difference, say) as one sample of size k: their mean, sample sd, the
    t interval of the mean and the two-sided one-sample t-test of mean 0 (None for both below two seeds)."""

    values: tuple[float, ...]
    mean: float
    sd: float
    ci95: tuple[float, float] | None
    p: float | None


def seed_level(values: Sequence[float]) -> SeedLevel:
    """The mean of `values` with Student's t: mean +- t_{0.975, k-1} * sd / sqrt(k), and p = P[|T| >= |t|] for
    t = mean / (sd / sqrt(k)) (1.0 when every value is 0; 0.0 when they are equal and not 0: no spread at all)."""
    k = len(values)
    if k == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / k
    if k < 2:
        return SeedLevel(tuple(values), mean, 0.0, None, None)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (k - 1))
    se = sd / math.sqrt(k)
    half = student_t_quantile(0.975, k - 1) * se
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = 2 * student_t_cdf(-abs(mean) / se, k - 1)
    return SeedLevel(tuple(values), mean, sd, (mean - half, mean + half), p)
