"""Wilson interval: its defining property (the score test's acceptance boundary), scipy's values, hand values.
Paired comparison: exact McNemar p against scipy's binomial test, Agresti-Min interval by hand, symmetry.
Seed level: Student's t against its closed forms (1 and 2 degrees of freedom) and scipy's t."""

from __future__ import annotations

import math
import random

import pytest

from selfrefine.tasks import wilson_interval

CASES = [(0, 10), (5, 10), (10, 10), (1, 200), (137, 200), (1319, 1319), (3, 7), (0, 11), (6, 6)]


@pytest.mark.parametrize("k,n", CASES)
def test_ends_are_where_the_score_test_stops_accepting(k: int, n: int) -> None:
    """Wilson's interval is {p : (k/n - p)^2 <= z^2 p (1 - p) / n}; each end inside (0, 1) solves it with equality."""
    z, phat = 1.96, k / n
    low, high = wilson_interval(k, n, z)
    assert 0.0 <= low <= phat <= high <= 1.0
    for p in (low, high):
        if 0.0 < p < 1.0:
            assert (phat - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9, abs=1e-15)
    assert (k == 0) == (low == 0.0) and (k == n) == (high == 1.0)


@pytest.mark.parametrize("k,n", CASES)
def test_matches_scipy(k: int, n: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n, z=1.959963984540054)
    assert low == pytest.approx(ci.low, abs=1e-12) and high == pytest.approx(ci.high, abs=1e-12)


def test_hand_values() -> None:
    # k=0, n=10: high = z^2/n / (1 + z^2/n) = 0.38416 / 1.38416
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.38416 / 1.38416))
    # k=5, n=10: centre 1/2, half-width 1.96 / 1.38416 * sqrt(0.025 + 3.8416 / 400) = 0.2634104
    low, high = wilson_interval(5, 10)
    assert low + high == pytest.approx(1.0) and low == pytest.approx(0.5 - 0.2634104, abs=1e-6)


def test_bad_counts() -> None:
    for k, n in [(0, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            wilson_interval(k, n)


# ---- paired comparison: exact McNemar p and Agresti-Min interval -------------------------------------------

def table_to_lists(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Per-question grades for a 2x2 table, cells interleaved so that nothing relies on position."""
    cells = [(True, True)] * both + [(True, False)] * only_a + [(False, True)] * only_b + [(False, False)] * neither
    random.Random(len(cells)).shuffle(cells)
    return [x for x, _ in cells], [y for _, y in cells]


# (both, only_a, only_b, neither)
TABLES = [(0, 0, 0, 10), (10, 0, 0, 0), (5, 0, 1, 4), (44, 7, 20, 29), (3, 2, 2, 3), (0, 0, 12, 0),
          (0, 9, 0, 0), (100, 30, 45, 25), (1, 1, 0, 0), (0, 1, 1, 0), (200, 61, 80, 9), (1, 0, 6, 0)]


@pytest.mark.parametrize("cells", TABLES)
def test_paired_counts_and_p_match_scipy(cells: tuple[int, int, int, int]) -> None:
    stats = pytest.importorskip("scipy.stats")
    from selfrefine.tasks.stats import paired_comparison

    both, only_a, only_b, neither = cells
    a, b = table_to_lists(*cells)
    r = paired_comparison(a, b)
    n = sum(cells)
    assert (r.n, r.correct_a, r.correct_b, r.only_a, r.only_b) == (n, both + only_a, both + only_b, only_a, only_b)
    assert r.diff == pytest.approx((only_b - only_a) / n, abs=1e-15)
    if only_a + only_b == 0:
        assert r.p == 1.0
    else:
        assert r.p == pytest.approx(stats.binomtest(only_b, only_a + only_b, p=0.5).pvalue, rel=1e-9, abs=1e-300)


def test_p_hand_values_and_large_counts() -> None:
    from selfrefine.tasks.stats import mcnemar_exact_p

    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 1) == 1.0  # 2 * 1/2
    assert mcnemar_exact_p(0, 5) == 2 / 32
    assert mcnemar_exact_p(1, 5) == mcnemar_exact_p(5, 1) == 2 * 7 / 64
    assert mcnemar_exact_p(7, 20) == pytest.approx(2 * sum(math.comb(27, i) for i in range(8)) / 2**27)
    assert mcnemar_exact_p(3, 3) == 1.0
    assert 0.0 < mcnemar_exact_p(0, 1074) < 1e-300  # summed in integers: no underflow to 0 until 2^-1074
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def test_interval_hand_values() -> None:
    from selfrefine.tasks.stats import paired_comparison

    # No discordant question, n=10: d* = 0, variance (1/12) / 12, so +-1.96/12.
    r = paired_comparison(*table_to_lists(4, 0, 0, 6))
    assert r.diff == 0.0 and r.ci95 == pytest.approx((-1.96 / 12, 1.96 / 12), abs=1e-12) and r.p == 1.0
    # only_a=2, only_b=6, n=18 -> n+2=20: d* = 4/20 = 0.2, variance (9/20 - 0.04) / 20 = 0.0205.
    r = paired_comparison(*table_to_lists(5, 2, 6, 5))
    half = 1.96 * math.sqrt(0.0205)  # 0.2806293
    assert r.diff == pytest.approx(4 / 18) and r.ci95 == pytest.approx((0.2 - half, 0.2 + half), abs=1e-12)
    assert r.ci95 == pytest.approx((-0.0806293, 0.4806293), abs=1e-7)
    # All 12 questions B-only: d* = 12/14, variance (13/14 - (12/14)^2) / 14; the top end clips to 1.
    r = paired_comparison(*table_to_lists(0, 0, 12, 0))
    low = 12 / 14 - 1.96 * math.sqrt((13 / 14 - (12 / 14) ** 2) / 14)
    assert r.diff == 1.0 and r.ci95 == pytest.approx((low, 1.0), abs=1e-12) and r.ci95[1] == 1.0


@pytest.mark.parametrize("cells", TABLES)
def test_swapping_a_and_b_mirrors(cells: tuple[int, int, int, int]) -> None:
    from selfrefine.tasks.stats import paired_comparison

    a, b = table_to_lists(*cells)
    ab, ba = paired_comparison(a, b), paired_comparison(b, a)
    assert ba.diff == -ab.diff and ba.ci95 == (-ab.ci95[1], -ab.ci95[0]) and ba.p == ab.p
    assert (ba.only_a, ba.only_b, ba.correct_a, ba.correct_b) == (ab.only_b, ab.only_a, ab.correct_b, ab.correct_a)


def test_estimate_inside_interval_for_every_small_table() -> None:
    """Every 2x2 table with n <= 14 (and a few large ones): -1 <= low <= diff <= high <= 1, and a
    positive width even with no discordant question."""
    from selfrefine.tasks.stats import paired_comparison

    tables = [(t, x, y, n - t - x - y) for n in range(1, 15) for t in range(n + 1) for x in range(n + 1 - t)
              for y in range(n + 1 - t - x)] + TABLES
    for cells in tables:
        r = paired_comparison(*table_to_lists(*cells))
        low, high = r.ci95
        assert -1.0 <= low <= r.diff <= high <= 1.0 and high - low > 0, cells


def test_paired_bad_input() -> None:
    from selfrefine.tasks.stats import paired_comparison

    with pytest.raises(ValueError, match="same questions"):
        paired_comparison([True, False], [True])
    with pytest.raises(ValueError, match="no questions"):
        paired_comparison([], [])


@pytest.mark.parametrize("t", [-50.0, -3.0, -1e-9, 0.0, 1e-6, 0.4, 2.5, 1e4])
def test_student_t_matches_its_closed_forms(t: float) -> None:
    from selfrefine.tasks.stats import student_t_cdf

    r = math.sqrt(2 + t * t)  # the lower tails in forms without cancellation: 0.5 - 0.4999... loses digits
    cauchy = 0.5 + math.atan(t) / math.pi if t >= 0 else -math.atan(1 / t) / math.pi
    two = 0.5 + t / (2 * r) if t >= 0 else 1 / (r * (r - t))
    assert student_t_cdf(t, 1) == pytest.approx(cauchy, rel=1e-13)
    assert student_t_cdf(t, 2) == pytest.approx(two, rel=1e-13)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 30, 300])
def test_student_t_cdf_and_quantile_match_scipy(df: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    from selfrefine.tasks.stats import student_t_cdf, student_t_quantile

    for t in (-40.0, -2.2, -0.3, 0.0, 0.9, 3.1, 25.0):
        assert student_t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-11, abs=1e-14)
    for q in (1e-4, 0.025, 0.3, 0.5, 0.975, 0.9999):
        assert student_t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9, abs=1e-12)


def test_seed_level_is_the_one_sample_t_test() -> None:
    stats = pytest.importorskip("scipy.stats")
    from selfrefine.tasks.stats import seed_level

    rng = random.Random(0)
    for k in (2, 3, 4, 8):
        values = [rng.uniform(-0.1, 0.15) for _ in range(k)]
        s = seed_level(values)
        assert s.mean == pytest.approx(sum(values) / k) and s.sd == pytest.approx(stats.tstd(values))
        assert s.p == pytest.approx(stats.ttest_1samp(values, 0).pvalue, rel=1e-9)
        low, high = stats.t.interval(0.95, k - 1, loc=s.mean, scale=stats.sem(values))
        assert s.ci95 == pytest.approx((low, high), rel=1e-9)


def test_seed_level_edge_cases() -> None:
    from selfrefine.tasks.stats import seed_level

    one = seed_level([0.05])
    assert (one.mean, one.sd, one.ci95, one.p) == (0.05, 0.0, None, None)
    assert seed_level([0.0, 0.0, 0.0]).p == 1.0 and seed_level([0.02, 0.02]).p == 0.0
    with pytest.raises(ValueError, match="no values"):
        seed_level([])
