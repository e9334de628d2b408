"""The evaluate stage's statistics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alpaca_ray.evaluate import stats


def test_win_rate_counts_ties_as_half():
    assert stats.win_rate(["A", "A", "B", "tie"]) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert stats.win_rate(["tie"] * 5) == 0.5
    assert math.isnan(stats.win_rate([]))
    summary = stats.summarize(["A", "B", "B", "tie"], samples=500)
    assert (summary["n"], summary["wins"], summary["losses"], summary["ties"]) == (4, 1, 2, 1)
    assert summary["win_rate"] == pytest.approx(1.5 / 4)


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_n():
    assert stats.bootstrap_ci([0.5] * 10) == (0.5, 0.5)  # no variation, no uncertainty
    widths = []
    for n in (20, 200, 2000):
        scores = np.array([1.0, 0.0, 0.5, 1.0] * (n // 4))
        low, high = stats.bootstrap_ci(scores, samples=1000, seed=1)
        assert low <= scores.mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # about 1.96 standard errors each side for a large sample
    scores = np.array([1.0, 0.0] * 1000)
    low, high = stats.bootstrap_ci(scores, samples=2000, seed=0)
    standard_error = scores.std() / math.sqrt(scores.size)
    assert (high - low) / 2 == pytest.approx(1.96 * standard_error, rel=0.1)
    assert stats.bootstrap_ci([1.0, 0.0], seed=3) == stats.bootstrap_ci([1.0, 0.0], seed=3)  # seeded


def test_by_group_and_length_buckets():
    groups = stats.by_group(["A", "B", "tie", "A"], ["x", "y", "x", "x"], samples=200)
    assert list(groups) == ["x", "y"]  # biggest group first
    assert groups["x"]["wins"] == 2 and groups["x"]["ties"] == 1 and groups["y"]["losses"] == 1
    assert stats.length_bucket(10, 10) == "similar length"
    assert stats.length_bucket(12, 10) == "similar length"  # within 20% of the longer
    assert stats.length_bucket(13, 10) == "A longer"
    assert stats.length_bucket(10, 30) == "B longer"
    longer = stats.longer_answer_win_rate(["A", "B", "tie", "A"], [10, 5, 9, 3], [5, 9, 1, 3])
    assert longer == {"decided_pairs": 2, "longer_won": 2, "rate": 1.0}  # tie and equal length skipped


def test_length_controlled_win_rate_without_length_variation_is_the_win_rate():
    from alpaca_ray.evaluate.length_control import length_controlled_win_rate

    outcomes = ([1.0] * 6 + [0.0] * 3 + [0.5] * 3) * 10
    lc = length_controlled_win_rate(outcomes, ["same"] * 120, ["size"] * 120, bootstrap_samples=0)
    assert lc["win_rate"] == pytest.approx(stats.win_rate(outcomes), abs=0.02)  # L1 shrinks the weight a little
    # on a dozen pairs cross-validation picks the strongest penalty (AlpacaEval's fit does the same): 50%
    small = length_controlled_win_rate(outcomes[:12], ["same"] * 12, ["size"] * 12, bootstrap_samples=0)
    assert small["win_rate"] == 0.5 and "every weight is zero" in small["note"]
    assert length_controlled_win_rate([0.5] * 4, ["a", "bb" * 20, "ccc", "d" * 9], ["x" * 9, "yy", "z" * 30, "w"],
                                      bootstrap_samples=0)["win_rate"] == 0.5


def test_cohens_kappa_by_hand():
    # observed 3/4; chance (2*1 + 2*3)/16 = 1/2; kappa (3/4 - 1/2) / (1/2) = 1/2
    assert stats.cohens_kappa(["A", "A", "B", "B"], ["A", "B", "B", "B"]) == pytest.approx(0.5)
    assert stats.cohens_kappa(["A", "B", "tie"], ["A", "B", "tie"]) == pytest.approx(1.0)
    assert math.isnan(stats.cohens_kappa(["A", "A"], ["A", "A"]))  # chance agreement is total
    with pytest.raises(ValueError):
        stats.cohens_kappa(["A"], [])


def test_fleiss_kappa_matches_the_textbook_example():
    # Fleiss (1971) as tabulated on Wikipedia: 10 items, 14 raters, 5 categories, kappa = 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    labels = ["1", "2", "3", "4", "5"]
    ratings = [[label for label, count in zip(labels, row) for _ in range(count)] for row in table]
    assert stats.fleiss_kappa(ratings, labels) == pytest.approx(0.210, abs=0.001)
    # two raters: [A,A] [B,B] [A,B] -> P_bar 2/3, P_e 1/2, kappa 1/3
    assert stats.fleiss_kappa([["A", "A"], ["B", "B"], ["A", "B"]]) == pytest.approx(1 / 3)
    assert math.isnan(stats.fleiss_kappa([["A"], ["B"]]))  # no item with two raters


def test_pairwise_agreement_and_majority():
    assert stats.pairwise_agreement([["A", "A", "B"], ["tie", "tie"], ["B"]]) == {"pairs": 4, "agreement": 0.5}
    assert stats.majority(["A", "A", "B"]) == "A"
    assert stats.majority(["A", "B"]) == "tie"
    assert stats.majority(["B"]) == "B"
