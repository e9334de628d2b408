"""Instruction lists for the dedup tests: the benchmark's realistic generator plus hand-made edge cases."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from alpaca_ray.dedup.rouge import fmeasure_from_lcs

_GENERATOR = Path(__file__).resolve().parents[2] / "benchmarks" / "make_instructions.py"


def make_instructions(count: int, seed: int = 0, duplicate_rate: float = 0.15) -> list[str]:
    """``benchmarks/make_instructions.py``'s realistic workload (loaded by path: benchmarks is no package)."""
    spec = importlib.util.spec_from_file_location("make_instructions", _GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_instructions(count, seed, duplicate_rate)


def boundary_pairs() -> list[tuple[str, str, float]]:
    """(pool text, candidate text, F) with LCS/(m+n) = 0.35 exactly: F is 0.7 in exact arithmetic, and
    rouge_score's floats round some of them to 0.7000000000000001 (dropped) and some to 0.7 (kept)."""
    pairs = []
    serial = 0
    for total in (20, 40, 60):
        lcs = int(total * 0.35)
        for m in range(lcs, total - lcs + 1):
            n = total - m
            pool_words = [f"p{serial}w{i}" for i in range(n)]
            # The candidate keeps `lcs` of the pool's words in order and adds fresh ones: LCS is exactly lcs.
            candidate_words = pool_words[:lcs] + [f"c{serial}w{i}" for i in range(m - lcs)]
            pairs.append((" ".join(pool_words), " ".join(candidate_words), fmeasure_from_lcs(lcs, m, n)))
            serial += 1
    return pairs


EDGE_CASES = [
    "", "   ", "?!...", "---", "介绍一下中国平安保险集团.", "介绍一下平安健康保险股份有限公司", "Ⅻ ⅻ",
    "\u212a\u212a\u212a Kelvin kelvin",  # the Kelvin sign lowercases to an ASCII 'k'
    "İstanbul is in Turkey", "istanbul is in turkey",  # 'İ'.lower() is 'i' + a combining dot
    "Café naïve résumé", "cafe naive resume", "A", "a", "Go.", "go!", "x y", "y x", "1 2 3 4 5",
    "Write a poem.", "write a poem", "Write a haiku about the sea.", "Write a haiku about the sea!",
    "tab\tseparated\nnew line words", "UPPER lower MiXeD", "e-mail re-write co-operate", "e mail re write co operate",
    "under_score and snake_case", "ÆØÅ æøå", "emoji 😀 test", "emoji test",
]


def long_instruction(rng: random.Random, words: int) -> str:
    vocabulary = "the a of to and in data model text write list explain give three example short long".split()
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def mixed_workload(count: int, seed: int = 0, long_count: int = 20) -> list[str]:
    """Realistic instructions interleaved with edge cases, boundary pairs and very long / very short texts."""
    rng = random.Random(seed)
    texts = make_instructions(count, seed, duplicate_rate=0.25)
    extras = list(EDGE_CASES)
    for pool_text, candidate_text, _ in boundary_pairs():
        extras += [pool_text, candidate_text]
    for _ in range(long_count):
        extras.append(long_instruction(rng, rng.randint(150, 400)))
    # Spread the extras at random places, keeping their order (each boundary pair's pool text first).
    slots = set(rng.sample(range(len(texts) + len(extras)), len(extras)))
    extras_iter, texts_iter = iter(extras), iter(texts)
    return [next(extras_iter) if i in slots else next(texts_iter) for i in range(len(texts) + len(extras))]
