"""Wilson score interval: the binomial confidence interval that stays inside [0, 1] and behaves at k=0 or k=n,
where the normal (Wald) interval collapses to a width of zero. Accuracies on a few hundred questions need it."""

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


def paired_comparison(a: Sequence[bool], b: Sequence[bool], z: float = 1.96) -> PairedComparison:
    """STUB: to be implemented (exact McNemar p; interval for the paired difference)."""
    raise NotImplementedError
