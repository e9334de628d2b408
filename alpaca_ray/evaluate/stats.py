"""Win rates and their uncertainty, from per-item scores. Plain numpy, no Ray.

A *score* is model A's share of one pair, in 0..1: a win is 1, a tie 0.5, a loss 0, and a probability-weighted
judge (AlpacaEval 2's) gives anything in between. Outcomes may be given as "A", "B", "tie" or as scores. The
win rate is the mean score, so ties count as half a win and fractional preferences count as they are
(AlpacaEval's ``win_rate``); the *discrete* win rate first rounds each score to a win, a loss or (exactly 0.5)
a tie (AlpacaEval's ``discrete_win_rate``). Confidence intervals are percentile bootstraps over items; the
standard error is the sample standard deviation over the square root of n (pandas' ``sem``, as AlpacaEval).
The length-controlled win rate lives in :mod:`alpaca_ray.evaluate.length_control`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

SCORE = {"A": 1.0, "tie": 0.5, "B": 0.0}
CHOICES = ("A", "B", "tie")
Outcome = str | float


def scores_of(outcomes: Sequence[Outcome]) -> np.ndarray:
    """Scores in 0..1 from "A"/"B"/"tie" or numbers (already scores); anything else is a ValueError."""
    out = np.empty(len(outcomes), dtype=float)
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, str):
            if outcome not in SCORE:
                raise ValueError(f"outcome {i}: expected 'A', 'B', 'tie' or a score in 0..1, got {outcome!r}")
            out[i] = SCORE[outcome]
        else:
            value = float(outcome)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"outcome {i}: a score must be in 0..1 (model A's share of the pair), got {value}")
            out[i] = value
    return out


def discrete_scores(scores: np.ndarray) -> np.ndarray:
    """Each score rounded to 1 (A won), 0 (B won) or 0.5 (exactly a tie)."""
    return np.where(scores > 0.5, 1.0, np.where(scores < 0.5, 0.0, 0.5))


def win_rate(outcomes: Sequence[Outcome]) -> float:
    """Model A's win rate (mean score: ties half a win, fractional preferences as given); NaN for no items."""
    return float(scores_of(outcomes).mean()) if len(outcomes) else math.nan


def standard_error(scores: Sequence[float] | np.ndarray) -> float:
    """The standard error of the mean score (ddof 1, as pandas' ``sem``); NaN below two items."""
    values = np.asarray(scores, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


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


def summarize(outcomes: Sequence[Outcome], samples: int = 2000, seed: int = 0) -> dict:
    """Counts (wins: score above 0.5, losses: below, ties: exactly 0.5), the win rate, its 95% bootstrap
    interval and standard error, and the discrete win rate."""
    scores = scores_of(outcomes)
    low, high = bootstrap_ci(scores, samples=samples, seed=seed)
    return {"n": int(scores.size), "wins": int(np.sum(scores > 0.5)), "losses": int(np.sum(scores < 0.5)),
            "ties": int(np.sum(scores == 0.5)), "win_rate": float(scores.mean()) if scores.size else math.nan,
            "ci_low": low, "ci_high": high, "standard_error": standard_error(scores),
            "discrete_win_rate": float(discrete_scores(scores).mean()) if scores.size else math.nan}


def by_group(outcomes: Sequence[Outcome], groups: Sequence[str], samples: int = 2000, seed: int = 0
             ) -> dict[str, dict]:
    """:func:`summarize` per group (category, length bucket), groups sorted by size then name."""
    members: dict[str, list[Outcome]] = defaultdict(list)
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


def longer_answer_win_rate(outcomes: Sequence[Outcome], lengths_a: Sequence[int], lengths_b: Sequence[int]) -> dict:
    """How often the longer answer won among decided pairs (score not 0.5) of different length (0.5: no bias)."""
    won = decided = 0
    for score, la, lb in zip(scores_of(outcomes), lengths_a, lengths_b, strict=True):
        if score == 0.5 or la == lb:
            continue
        decided += 1
        won += int((score > 0.5) == (la > lb))
    return {"decided_pairs": decided, "longer_won": won, "rate": won / decided if decided else math.nan}


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
