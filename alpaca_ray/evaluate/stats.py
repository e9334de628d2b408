"""Win rates and their uncertainty, from per-item outcomes. Plain numpy/scipy, no Ray.

Scores are from model A's side: a win is 1, a tie 0.5, a loss 0, so the win rate counts ties as half a
win (AlpacaEval's convention). Confidence intervals are percentile bootstraps over items.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

SCORE = {"A": 1.0, "tie": 0.5, "B": 0.0}
CHOICES = ("A", "B", "tie")


def scores_of(outcomes: Sequence[str]) -> np.ndarray:
    return np.array([SCORE[o] for o in outcomes], dtype=float)


def win_rate(outcomes: Sequence[str]) -> float:
    """Model A's win rate, ties counted as half a win; NaN for no items."""
    return float(scores_of(outcomes).mean()) if len(outcomes) else math.nan


def bootstrap_ci(scores: Sequence[float] | np.ndarray, samples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampling items with replacement)."""
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return (float(low), float(high))


def summarize(outcomes: Sequence[str], samples: int = 2000, seed: int = 0) -> dict:
    """Counts, win rate and its 95% bootstrap interval for a list of "A"/"B"/"tie" outcomes."""
    counts = Counter(outcomes)
    low, high = bootstrap_ci(scores_of(outcomes), samples=samples, seed=seed)
    return {"n": len(outcomes), "wins": counts["A"], "losses": counts["B"], "ties": counts["tie"],
            "win_rate": win_rate(outcomes), "ci_low": low, "ci_high": high}


def by_group(outcomes: Sequence[str], groups: Sequence[str], samples: int = 2000, seed: int = 0) -> dict[str, dict]:
    """:func:`summarize` per group (category, length bucket), groups sorted by size then name."""
    members: dict[str, list[str]] = defaultdict(list)
    for outcome, group in zip(outcomes, groups, strict=True):
        members[group].append(outcome)
    order = sorted(members, key=lambda g: (-len(members[g]), g))
    return {g: summarize(members[g], samples=samples, seed=seed) for g in order}


def length_bucket(length_a: int, length_b: int, margin: float = 0.2) -> str:
    """Which answer is longer, in words: more than ``margin`` (relative) apart, or "similar"."""
    longest = max(length_a, length_b, 1)
    if abs(length_a - length_b) <= margin * longest:
        return "similar length"
    return "A longer" if length_a > length_b else "B longer"


LENGTH_BUCKETS = ("A longer", "similar length", "B longer")


def longer_answer_win_rate(outcomes: Sequence[str], lengths_a: Sequence[int], lengths_b: Sequence[int]) -> dict:
    """How often the longer answer won among decided pairs of different length (0.5: no length bias)."""
    won = decided = 0
    for outcome, la, lb in zip(outcomes, lengths_a, lengths_b, strict=True):
        if outcome == "tie" or la == lb:
            continue
        decided += 1
        won += (outcome == "A") == (la > lb)
    return {"decided_pairs": decided, "longer_won": won, "rate": won / decided if decided else math.nan}


def _fit_length_model(y: np.ndarray, x: np.ndarray, l2: float, steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression ``P(A wins) = sigmoid(theta + phi * x)`` on soft labels, by damped Newton steps.

    ``y`` and ``x`` are (fits, items): many fits (bootstrap resamples) are solved at once. A ridge of ``l2``
    on ``phi`` and a tiny one on ``theta`` keep the optimum finite (every pair won, perfectly separable
    lengths); ``theta`` is then clipped to +-10 (a 99.995% win rate). Returns (theta, phi), each (fits,).
    """
    y, x = np.atleast_2d(y), np.atleast_2d(x)
    theta, phi = np.zeros(y.shape[0]), np.zeros(y.shape[0])
    ridge_theta = 1e-6
    for _ in range(steps):
        z = theta[:, None] + phi[:, None] * x
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # the sigmoid, without overflow
        residual, weight = p - y, p * (1.0 - p)
        g_theta = residual.mean(axis=1) + 2 * ridge_theta * theta
        g_phi = (residual * x).mean(axis=1) + 2 * l2 * phi
        h_tt = weight.mean(axis=1) + 2 * ridge_theta
        h_tp = (weight * x).mean(axis=1)
        h_pp = (weight * x * x).mean(axis=1) + 2 * l2
        det = h_tt * h_pp - h_tp * h_tp
        step_theta = (h_pp * g_theta - h_tp * g_phi) / det
        step_phi = (h_tt * g_phi - h_tp * g_theta) / det
        # Damping: Newton steps on nearly flat (separable) fits can be huge; a few bounded steps converge.
        scale = np.minimum(1.0, 2.0 / np.maximum(np.abs(step_theta), np.abs(step_phi)).clip(min=1e-12))
        theta, phi = theta - scale * step_theta, phi - scale * step_phi
        if max(np.abs(step_theta).max(), np.abs(step_phi).max()) < 1e-9:
            break
    return np.clip(theta, -10.0, 10.0), phi


def _length_feature(lengths_a: np.ndarray, lengths_b: np.ndarray) -> np.ndarray:
    """``tanh(d / std(d))`` per row, ``d`` the length difference A - B (zero where lengths never vary)."""
    d = np.asarray(lengths_a, dtype=float) - np.asarray(lengths_b, dtype=float)
    spread = d.std(axis=-1, keepdims=True)
    return np.where(spread > 0, np.tanh(d / np.where(spread > 0, spread, 1.0)), 0.0)


def length_controlled_win_rate(outcomes: Sequence[str], lengths_a: Sequence[int], lengths_b: Sequence[int],
                               l2: float = 1e-3) -> dict:
    """AlpacaEval 2's length-controlled win rate, for one pair of models.

    A logistic regression of the preference (win 1, tie 0.5, loss 0) on ``tanh(d / std(d))`` where ``d`` is
    the difference in answer length (A minus B, in words), then the win rate it predicts at zero length
    difference: ``sigmoid(theta)``. AlpacaEval also fits an instruction-difficulty term shared across many
    models; with two models it is not identifiable, so it is left out. With no length variation this is the
    plain win rate.
    """
    y = scores_of(outcomes)
    if y.size == 0:
        return {"win_rate": math.nan, "theta": math.nan, "length_coef": math.nan}
    theta, phi = _fit_length_model(y, _length_feature(lengths_a, lengths_b), l2)
    theta, phi = float(theta[0]), float(phi[0])
    return {"win_rate": float(1.0 / (1.0 + math.exp(-theta))), "theta": theta, "length_coef": phi}


def length_controlled_ci(outcomes: Sequence[str], lengths_a: Sequence[int], lengths_b: Sequence[int],
                         samples: int = 1000, seed: int = 0, l2: float = 1e-3) -> tuple[float, float]:
    """Percentile bootstrap interval of the length-controlled win rate (a refit per resample, all at once)."""
    n = len(outcomes)
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n, size=(samples, n))
    y = scores_of(outcomes)[pick]
    x = _length_feature(np.asarray(lengths_a, dtype=float)[pick], np.asarray(lengths_b, dtype=float)[pick])
    theta, _ = _fit_length_model(y, x, l2)
    low, high = np.quantile(1.0 / (1.0 + np.exp(-theta)), [0.025, 0.975])
    return (float(low), float(high))


# ---------------------------------------------------------------------------------------------------
# Agreement between raters, and between raters and the LLM judge


def cohens_kappa(first: Sequence[str], second: Sequence[str], labels: Sequence[str] = CHOICES) -> float:
    """Cohen's kappa of two raters over the same items (NaN when chance agreement is total)."""
    if len(first) != len(second):
        raise ValueError("both raters must rate the same items")
    n = len(first)
    if n == 0:
        return math.nan
    observed = sum(a == b for a, b in zip(first, second)) / n
    count_a, count_b = Counter(first), Counter(second)
    expected = sum(count_a[label] * count_b[label] for label in labels) / (n * n)
    if expected >= 1.0:
        return math.nan
    return (observed - expected) / (1.0 - expected)


def fleiss_kappa(ratings_per_item: Sequence[Sequence[str]], labels: Sequence[str] = CHOICES) -> float:
    """Fleiss' kappa over items rated by two or more raters (the number of raters may vary by item)."""
    items = [r for r in ratings_per_item if len(r) >= 2]
    if not items:
        return math.nan
    per_item_agreement = []
    totals: Counter = Counter()
    for ratings in items:
        counts = Counter(ratings)
        m = len(ratings)
        per_item_agreement.append((sum(c * c for c in counts.values()) - m) / (m * (m - 1)))
        totals.update(ratings)
    n_ratings = sum(totals.values())
    p_bar = float(np.mean(per_item_agreement))
    p_expected = sum((totals[label] / n_ratings) ** 2 for label in labels)
    if p_expected >= 1.0:
        return math.nan
    return (p_bar - p_expected) / (1.0 - p_expected)


def pairwise_agreement(ratings_per_item: Sequence[Sequence[str]]) -> dict:
    """The share of rater pairs (on the same item) who chose the same, over all such pairs."""
    agree = pairs = 0
    for ratings in ratings_per_item:
        for i in range(len(ratings)):
            for j in range(i + 1, len(ratings)):
                pairs += 1
                agree += ratings[i] == ratings[j]
    return {"pairs": pairs, "agreement": agree / pairs if pairs else math.nan}


def majority(ratings: Sequence[str]) -> str:
    """The most common choice; a tie between choices is a "tie" outcome."""
    counts = Counter(ratings).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "tie"
    return counts[0][0]
