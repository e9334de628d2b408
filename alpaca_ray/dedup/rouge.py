"""ROUGE-L exactly as Stanford Alpaca computes it, and Alpaca's sequential near-duplicate loop.

Alpaca's ``generate_instruction.py`` does::

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    new_tokens = scorer._tokenizer.tokenize(instruction)
    scores = [rouge_scorer._score_lcs(new_tokens, pool_tokens).fmeasure for pool_tokens in all_tokens]
    if max(scores) > 0.7: drop it, else keep it and append it to the pool

so the candidate is the *target* and the pool instruction the *prediction*: precision = lcs / len(pool),
recall = lcs / len(candidate), F = 2 * precision * recall / (precision + recall). The fast path computes
the very same floating-point expression in the same order, so boundary cases (F exactly 0.7) agree.
This module is the slow, obviously-right reference the fast path is tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

# Only the tokenizer module at import: rouge_scorer pulls in nltk (seconds), which the fast path never needs.
from rouge_score import tokenize


@functools.cache
def _scorer():
    """The scorer Alpaca builds; its tokenizer (lowercase, non [a-z0-9] runs -> spaces, no stemming) is ours."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_tokens(text: str) -> list[str]:
    """The tokens ``rouge_score``'s default tokenizer gives (``[]`` for Chinese or punctuation-only text)."""
    # Call the library itself rather than re-implementing it: str.lower() of some non-Latin characters
    # yields ASCII letters (e.g. the Kelvin sign), and only the library's own regexes match it exactly.
    return tokenize.tokenize(text, None)


def rouge_l_score(candidate_tokens: Sequence[str], pool_tokens: Sequence[str]) -> float:
    """ROUGE-L F of a candidate against one pool instruction, as Alpaca calls ``_score_lcs``."""
    from rouge_score import rouge_scorer

    return rouge_scorer._score_lcs(candidate_tokens, pool_tokens).fmeasure


def fmeasure_from_lcs(lcs: int, candidate_len: int, pool_len: int) -> float:
    """The float ``_score_lcs`` returns for a given LCS length (same operations, same order)."""
    if candidate_len == 0 or pool_len == 0 or lcs == 0:
        return 0.0
    precision = lcs / pool_len
    recall = lcs / candidate_len
    return 2 * precision * recall / (precision + recall)


def reference_filter(candidates: Iterable[str], pool: Iterable[str] = (), threshold: float = 0.7) -> list[bool]:
    """Alpaca's loop, verbatim in spirit: compare each candidate with every kept instruction in Python.

    True = kept. An empty pool keeps the first candidate (Alpaca's ``max([])`` would raise there).
    """
    from rouge_score import rouge_scorer

    scorer = _scorer()
    pool_tokens = [scorer._tokenizer.tokenize(text) for text in pool]
    kept: list[bool] = []
    for text in candidates:
        tokens = scorer._tokenizer.tokenize(text)
        scores = [rouge_scorer._score_lcs(tokens, other).fmeasure for other in pool_tokens]
        if scores and max(scores) > threshold:
            kept.append(False)
            continue
        kept.append(True)
        pool_tokens.append(tokens)
    return kept
