"""The fast near-duplicate filter decides exactly as Alpaca's sequential rouge_score loop, item for item."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from rouge_score import rouge_scorer

from alpaca_ray.dedup import NearDuplicateFilter, brute_force_filter, dedup_instructions, reference_filter
from alpaca_ray.dedup.exact import TokenCorpus, _fmeasure, _lcs_length, _scores_kernel
from alpaca_ray.dedup.rouge import rouge_l_score, rouge_tokens
from tests.support.dedup_data import EDGE_CASES, boundary_pairs, make_instructions, mixed_workload

SEEDS = make_instructions(60, seed=99, duplicate_rate=0.0)


def test_api_matches_alpaca_on_a_small_example():
    pool = ["Give three tips for staying healthy."]
    candidates = ["Give three tips for staying very healthy.", "Name a prime number.", "Name a prime number please",
                  "介绍一下中国平安保险集团.", "", "Name a prime number please"]
    expected = reference_filter(candidates, pool)
    assert expected == [False, True, False, True, True, False]
    dedup_filter = NearDuplicateFilter(pool, threshold=0.7)
    assert dedup_filter.filter(candidates) == expected
    assert dedup_filter.pool == pool + [c for c, keep in zip(candidates, expected) if keep]
    assert dedup_instructions(candidates, against=pool) == expected


def test_boundary_at_exactly_threshold_decides_like_rouge_score():
    pairs = boundary_pairs()
    outcomes = set()
    for pool_text, candidate_text, score in pairs:
        assert rouge_l_score(rouge_tokens(candidate_text), rouge_tokens(pool_text)) == score
        expected = reference_filter([candidate_text], [pool_text])
        assert dedup_instructions([candidate_text], against=[pool_text]) == expected
        assert expected == [not score > 0.7]
        outcomes.add(expected[0])
    assert outcomes == {True, False}, "the boundary cases must include both float outcomes"


def test_edge_case_texts_match_reference():
    texts = EDGE_CASES + EDGE_CASES[::-1]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # exactly as Alpaca builds it
    assert [rouge_tokens(t) for t in texts] == [scorer._tokenizer.tokenize(t) for t in texts]
    assert rouge_tokens("介绍一下中国平安保险集团.") == []
    assert rouge_tokens("\u212a") == ["k"]
    expected = reference_filter(texts, SEEDS[:5])
    assert dedup_instructions(texts, against=SEEDS[:5]) == expected
    assert expected.count(False) > 5


def test_compiled_score_equals_rouge_score_bit_for_bit():
    rng = random.Random(3)
    texts = make_instructions(300, seed=5, duplicate_rate=0.5) + EDGE_CASES
    corpus = TokenCorpus()
    ids = corpus.add(texts)
    row = np.zeros(512, dtype=np.int64)
    for _ in range(3000):
        a, b = rng.choice(ids), rng.choice(ids)
        ta, tb = rouge_tokens(texts[a]), rouge_tokens(texts[b])
        lcs = _lcs_length(corpus.tokens[corpus.offsets[a]:corpus.offsets[a + 1]],
                          corpus.tokens[corpus.offsets[b]:corpus.offsets[b + 1]], row)
        ours = _fmeasure(lcs, len(ta), len(tb)) if ta and tb else 0.0
        assert ours == rouge_l_score(ta, tb)
    # The report's scores (bit-parallel LCS up to 64 tokens, DP beyond) against every earlier text.
    long_texts = [" ".join(rng.choice(["a", "b", "c", "d", "e"]) for _ in range(rng.randint(1, 130)))
                  for _ in range(60)]
    ids = np.concatenate([ids, corpus.add(long_texts)])
    texts = texts + long_texts
    queries = np.array(rng.sample(range(len(texts)), 80))
    rows, positions, scores = _scores_kernel(corpus.offsets, corpus.tokens, len(corpus.token_ids), ids, queries,
                                             ids[queries])
    for k, q in enumerate(queries):
        dense = np.zeros(q)
        dense[positions[rows[k]:rows[k + 1]]] = scores[rows[k]:rows[k + 1]]
        assert dense.tolist() == [rouge_l_score(rouge_tokens(texts[q]), rouge_tokens(t)) for t in texts[:q]]


def test_matches_rouge_score_reference_on_planted_workload():
    # rouge_score's pure-Python LCS is slow: a modest size (and few very long texts) keeps this ~10 s of CPU.
    texts = mixed_workload(450, seed=1, long_count=2)
    expected = reference_filter(texts, SEEDS)
    assert 0.05 < expected.count(False) / len(expected) < 0.7  # a real mix of kept and dropped
    assert dedup_instructions(texts, against=SEEDS) == expected


def test_matches_brute_force_on_thousands():
    texts = mixed_workload(5000, seed=2)
    expected = brute_force_filter(texts, SEEDS)
    assert dedup_instructions(texts, against=SEEDS) == expected
    # Incremental use (as generate calls it, a response at a time) gives the same flags.
    incremental = NearDuplicateFilter(SEEDS)
    flags = []
    for lo in range(0, len(texts), 37):
        flags += incremental.filter(texts[lo:lo + 37])
    assert flags == expected
    # Small blocks exercise the block boundaries of the in-process path.
    assert NearDuplicateFilter(SEEDS).filter(texts, block_size=333) == expected


@pytest.mark.parametrize("threshold", [0.0, 0.35, 0.5, 0.9, 1.0])
def test_other_thresholds_match_brute_force(threshold):
    texts = mixed_workload(600, seed=4)
    assert dedup_instructions(texts, against=SEEDS, threshold=threshold) == \
        brute_force_filter(texts, SEEDS, threshold=threshold)


def test_similarity_report_is_alpacas():
    pool = SEEDS[:30]
    dedup_filter = NearDuplicateFilter(pool)
    candidate = SEEDS[3] + " Please."
    most_similar, average = dedup_filter.similarity_report(candidate)
    scores = [rouge_l_score(rouge_tokens(candidate), rouge_tokens(p)) for p in pool]
    assert most_similar == {pool[i]: scores[i] for i in np.argsort(scores)[-10:][::-1]}
    assert average == float(np.mean(scores))
    assert len(dedup_filter.pool) == 30  # a report does not add to the pool


def test_bad_threshold_is_rejected():
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateFilter([], threshold=1.5)


def test_chinese_dataset_matches_reference(shared_data):
    rows = json.loads((shared_data / "alpaca_zh_2000.json").read_text(encoding="utf-8"))
    texts = [row["instruction"] for row in rows]
    expected = reference_filter(texts, SEEDS[:10])
    assert dedup_instructions(texts, against=SEEDS[:10]) == expected
