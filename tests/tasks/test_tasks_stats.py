"""Wilson interval: its defining property (the score test's acceptance boundary), scipy's values, hand values."""

from __future__ import annotations

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
