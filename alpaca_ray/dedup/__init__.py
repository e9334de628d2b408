"""Exact near-duplicate removal with Stanford Alpaca's ROUGE-L rule, pruned and compiled to scale.

``NearDuplicateFilter(pool, threshold=0.7).filter(candidates)`` and ``dedup_instructions(candidates,
against=(), threshold=0.7)`` return one kept flag per candidate, identical to Alpaca's sequential loop
(:func:`reference_filter`). ``alpaca_ray.dedup.pipeline`` spreads the same work over Ray workers.
"""

from alpaca_ray.dedup.exact import NearDuplicateFilter, brute_force_filter, dedup_instructions
from alpaca_ray.dedup.rouge import reference_filter, rouge_l_score, rouge_tokens

__all__ = [
    "NearDuplicateFilter",
    "brute_force_filter",
    "dedup_instructions",
    "reference_filter",
    "rouge_l_score",
    "rouge_tokens",
]
