"""The set-similarity-join filters of the dedup kernel: every bound checked against rouge_score's own float
arithmetic and Alpaca's loop on generated edge cases (exactly 0.7, multisets, empty and one-token texts,
partner lengths at the very ends of the length filter)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from rouge_score import scoring

from alpaca_ray.dedup import NearDuplicateFilter, brute_force_filter, dedup_instructions, reference_filter
from alpaca_ray.dedup.exact import (
    PrefixIndex,
    TokenCorpus,
    _bitmap_overlap_bound,
    _fmeasure,
    _min_lcs,
    _prefix_length,
    _signature,
)
from tests.support.dedup_data import mixed_workload

THRESHOLDS = [0.0, 0.1, 0.35, 0.5, 0.7, 0.75, 0.9, 1.0]


def rouge_f(lcs: int, m: int, n: int) -> float:
    """rouge_score's F for an LCS length, candidate (target) of m tokens, pool text (prediction) of n."""
    if m == 0 or n == 0:
        return 0.0
    return scoring.fmeasure(lcs / n, lcs / m)


def least_dropping_lcs(m: int, n: int, threshold: float) -> int:
    return next((lcs for lcs in range(1, min(m, n) + 1) if rouge_f(lcs, m, n) > threshold), min(m, n) + 1)


def test_min_lcs_is_the_least_lcs_rouge_score_drops():
    ties = Counter()
    for threshold in THRESHOLDS:
        for m in range(60):
            for n in range(60):
                need = _min_lcs(m, n, threshold)
                assert need == least_dropping_lcs(m, n, threshold), (m, n, threshold)
                if threshold == 0.7 and 0 < need <= min(m, n):
                    assert _fmeasure(need, m, n) == rouge_f(need, m, n)
                    if 2 * (need - 1) * 20 == 14 * (m + n):  # LCS need-1 scores exactly 0.7 in real numbers
                        ties["0.7 kept"] += 1
                    if 2 * need * 20 == 14 * (m + n):  # LCS need scores exactly 0.7 and rouge_score rounds up
                        ties["0.7 rounded up, dropped"] += 1
    assert ties["0.7 kept"] and ties["0.7 rounded up, dropped"], ties
    for m, n in [(1000, 1500), (4999, 5003), (20000, 17000)]:  # long texts: the search starts near the answer
        need = _min_lcs(m, n, 0.7)
        assert rouge_f(need, m, n) > 0.7 >= rouge_f(need - 1, m, n)


def test_prefix_length_covers_every_partner_length():
    for threshold in THRESHOLDS:
        for n in range(150):
            needs = [_min_lcs(m, n, threshold) for m in range(1, 3 * n + 3)]
            feasible = [need for m, need in enumerate(needs, start=1) if need <= min(m, n)]
            expected = n - min(feasible) + 1 if feasible else 0
            assert _prefix_length(n, threshold) == expected, (n, threshold)


def test_bitmap_bound_never_undercuts_the_multiset_overlap():
    rng = random.Random(5)
    corpus = TokenCorpus()
    texts = [" ".join(rng.choice("abcdefghij") + str(rng.randint(0, 40)) for _ in range(rng.randint(0, 150)))
             for _ in range(300)]
    ids = corpus.add(texts)
    tokens = [corpus.tokens[corpus.offsets[r]:corpus.offsets[r + 1]] for r in ids]
    elements = [corpus.elements[corpus.offsets[r]:corpus.offsets[r + 1]] for r in ids]
    for _ in range(3000):
        a, b = rng.randrange(len(ids)), rng.randrange(len(ids))
        overlap = sum((Counter(tokens[a].tolist()) & Counter(tokens[b].tolist())).values())
        assert overlap == len(set(elements[a].tolist()) & set(elements[b].tolist()))  # elements = multiset
        signature_a, signature_b = np.uint64(_signature(elements[a])), np.uint64(_signature(elements[b]))
        bound = _bitmap_overlap_bound(len(tokens[a]), signature_a, len(tokens[b]), signature_b)
        assert overlap <= bound


def _boundary_pairs(rng: random.Random, threshold: float, max_m: int = 30):
    """(pool text, candidate text) pairs whose lengths sit at and just beyond the ends of the length filter
    and whose LCS is the least that drops, or one less; some with repeated tokens or a scrambled order
    (large multiset overlap, small LCS)."""
    pairs = []
    for m in range(1, max_m + 1):
        needs = {n: _min_lcs(m, n, threshold) for n in range(1, 3 * m + 3)}
        feasible = [n for n, need in needs.items() if need <= min(m, n)]
        if not feasible:
            continue
        for n in {feasible[0] - 1, feasible[0], feasible[-1], feasible[-1] + 1} - {0}:
            need = needs.get(n, min(m, n) + 1)
            for lcs in {need - 1, need} & set(range(min(m, n) + 1)):
                serial = len(pairs)
                # Candidate: m tokens, the first `lcs` shared with the pool text in order, then fresh ones.
                shared = [f"s{serial}x{k % 3 if rng.random() < 0.3 else k}" for k in range(lcs)]
                candidate = shared + [f"c{serial}x{k}" for k in range(m - lcs)]
                pool = shared + [f"p{serial}x{k}" for k in range(n - lcs)]
                rng.shuffle(pool) if rng.random() < 0.25 else None  # same multiset, smaller LCS
                pairs.append((" ".join(pool), " ".join(candidate)))
    return pairs


@pytest.mark.parametrize("threshold", [0.7, 0.35, 0.9])
def test_length_and_lcs_boundaries_match_rouge_score(threshold):
    rng = random.Random(int(threshold * 100))
    outcomes = Counter()
    for pool_text, candidate_text in _boundary_pairs(rng, threshold, max_m=24 if threshold == 0.7 else 12):
        expected = reference_filter([candidate_text], [pool_text], threshold)
        assert dedup_instructions([candidate_text], against=[pool_text], threshold=threshold) == expected, \
            (pool_text, candidate_text)
        # The other way round (the pool text as the candidate): F is symmetric, the index roles are not.
        assert dedup_instructions([pool_text], against=[candidate_text], threshold=threshold) == expected
        outcomes[expected[0]] += 1
    assert outcomes[True] > 10 and outcomes[False] > 10, outcomes


def _multiset_texts(rng: random.Random, count: int) -> list[str]:
    """Short texts over a tiny vocabulary (many repeated tokens), empty and one-token texts, and edits."""
    texts: list[str] = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.05:
            texts.append(rng.choice(["", "?!", "a", "b", "a a", "a b"]))
        elif kind < 0.45 and texts:
            words = rng.choice(texts).split() or ["a"]
            for _ in range(rng.randint(1, 2)):
                i = rng.randrange(len(words))
                edit = rng.random()
                if edit < 0.4:
                    words[i] = rng.choice("abcdef")
                elif edit < 0.7:
                    words.insert(i, rng.choice("abcdef"))
                elif len(words) > 1:
                    del words[i]
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choice("aabbccdef") for _ in range(rng.randint(1, 14))))
    return texts


def test_multisets_and_short_texts_match_rouge_score():
    rng = random.Random(11)
    texts = _multiset_texts(rng, 260)
    expected = reference_filter(texts, ["a b c", "f f f f"])
    assert 0.2 < expected.count(False) / len(expected) < 0.9
    assert dedup_instructions(texts, against=["a b c", "f f f f"]) == expected


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.7, 1.0])
def test_multisets_match_brute_force_at_scale(threshold):
    texts = _multiset_texts(random.Random(12), 1500)
    assert dedup_instructions(texts, threshold=threshold) == brute_force_filter(texts, threshold=threshold)


def test_index_merges_at_any_point_give_the_same_flags():
    rng = random.Random(13)
    texts = mixed_workload(1500, seed=13, long_count=4)
    expected = brute_force_filter(texts)
    corpus = TokenCorpus()
    ids = corpus.add(texts)
    index = PrefixIndex(0.7)
    flags, lo = [], 0
    while lo < len(ids):
        block = ids[lo:lo + rng.randint(1, 400)]
        flags += index.probe(corpus, block).tolist()
        if rng.random() < 0.5:
            index.merge()  # the sorted part and the recent part both hold entries, or either alone
        lo += len(block)
    assert flags == expected


def test_rarity_order_is_per_batch_and_never_reorders_known_elements():
    corpus = TokenCorpus()
    corpus.add(["the cat sat", "the dog sat", "the the end"])
    ids = corpus.element_ids
    the0, the1 = ids[corpus.token_ids["the"] << 32], ids[corpus.token_ids["the"] << 32 | 1]
    cat, sat = ids[corpus.token_ids["cat"] << 32], ids[corpus.token_ids["sat"] << 32]
    assert the0 < sat < cat and sat < the1  # most frequent first: "the" (3 texts), "sat" (2), then singletons
    known = dict(ids)
    corpus.add(["cat cat cat zebra", "cat zebra", "zebra"])
    assert {k: v for k, v in corpus.element_ids.items() if k in known} == known
    zebra = corpus.element_ids[corpus.token_ids["zebra"] << 32]
    assert zebra >= len(known)  # new elements come after (rarer than) every known one
    record = corpus.elements[corpus.offsets[3]:corpus.offsets[4]]
    assert list(record) == sorted(record, reverse=True)  # each record lists its elements rarest first
    # Streaming (a batch at a time, so a late, frequent word counts as rare) decides as one joint batch.
    texts = mixed_workload(800, seed=14, long_count=4)
    rng = random.Random(14)
    dedup_filter = NearDuplicateFilter(texts[:5])
    flags, lo = [], 5
    while lo < len(texts):
        step = rng.randint(1, 150)
        flags += dedup_filter.filter(texts[lo:lo + step])
        lo += step
    assert flags == dedup_instructions(texts[5:], against=texts[:5]) == brute_force_filter(texts[5:], texts[:5])
    assert np.sum(flags) == len(dedup_filter.pool) - 5
