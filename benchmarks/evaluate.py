"""Evaluate-stage benchmarks: statistics speed and answer-collection concurrency, each against a reference.

    python benchmarks/evaluate.py            # prints a table; takes well under a minute on 2 CPU cores

1. Length-controlled win rate with a 95% bootstrap interval (2000 resamples): our batched Newton fit of
   all resamples at once vs the straightforward reference (scipy L-BFGS, one fit per resample), with the
   largest difference between their interval bounds.
2. Answer collection: requests per second through ``RequestRunner`` (journal included) against a local
   OpenAI-protocol server answering in 50 ms, with 8 requests in flight vs one at a time.
"""

from __future__ import annotations

import asyncio
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_ray.evaluate import collect, stats  # noqa: E402
from alpaca_ray.evaluate.eval_sets import EvalItem  # noqa: E402
from alpaca_ray.llm_client import EndpointConfig  # noqa: E402
from alpaca_ray.openai_server import OpenAIServer, Reply  # noqa: E402


def reference_lc_ci(outcomes, lengths_a, lengths_b, samples, seed=0, l2=1e-3):
    """One scipy fit per resample: the plain way to bootstrap the length-controlled win rate."""
    from scipy.optimize import minimize

    y_all = stats.scores_of(outcomes)
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(samples):
        pick = rng.integers(0, len(outcomes), size=len(outcomes))
        y = y_all[pick]
        d = np.asarray(lengths_a, float)[pick] - np.asarray(lengths_b, float)[pick]
        x = np.tanh(d / d.std()) if d.std() > 0 else np.zeros_like(d)

        def loss(params, x=x, y=y):
            z = params[0] + params[1] * x
            return (np.logaddexp(0, z) - y * z).mean() + l2 * params[1] ** 2 + 1e-6 * params[0] ** 2

        theta = minimize(loss, np.zeros(2), method="L-BFGS-B", bounds=[(-10, 10), (None, None)]).x[0]
        rates.append(1 / (1 + math.exp(-theta)))
    return tuple(np.quantile(rates, [0.025, 0.975]))


def bench_length_controlled(n: int, samples: int = 2000) -> dict:
    rng = np.random.default_rng(n)
    lengths_a, lengths_b = rng.integers(20, 400, n), rng.integers(20, 400, n)
    p_win = 1 / (1 + np.exp(-(0.2 + 1.0 * np.tanh((lengths_a - lengths_b) / 150))))
    draw = rng.random(n)
    outcomes = ["A" if u < p * 0.9 else ("tie" if u < p * 0.9 + 0.1 else "B") for u, p in zip(draw, p_win)]
    start = time.perf_counter()
    ours = stats.length_controlled_ci(outcomes, lengths_a, lengths_b, samples=samples)
    ours_s = time.perf_counter() - start
    ref_samples = 100  # the reference is slow: time 100 fits and scale to ``samples``
    start = time.perf_counter()
    ref_same = reference_lc_ci(outcomes, lengths_a, lengths_b, ref_samples, seed=1)
    ref_s = (time.perf_counter() - start) * samples / ref_samples
    # the same resamples (same seed) through both: the intervals should match
    ours_same = stats.length_controlled_ci(outcomes, lengths_a, lengths_b, samples=ref_samples, seed=1)
    diff = max(abs(a - b) for a, b in zip(ref_same, ours_same))
    return {"n": n, "ours_s": ours_s, "ref_s": ref_s, "ci": ours, "max_bound_diff": diff}


def bench_collection(requests_n: int = 200, delay_s: float = 0.05) -> dict:
    items = [EvalItem(f"t{i}", f"Instruction {i}") for i in range(requests_n)]
    out = {}
    with OpenAIServer(lambda kind, body: Reply("An answer of a few words.", delay_s=delay_s), models=["m"]) as server:
        for concurrency in (1, 8):
            endpoint = EndpointConfig("m", server.base_url, max_concurrency=concurrency, max_retries=0)
            with tempfile.TemporaryDirectory() as tmp:
                runner = collect.RequestRunner({"a": endpoint}, {"a": {"max_tokens": 16}}, tmp)
                requests = collect.answer_requests(items, "a", endpoint, {"max_tokens": 16})
                start = time.perf_counter()
                results = asyncio.run(runner.run(requests))
                elapsed = time.perf_counter() - start
                assert all(not r["error"] for r in results)
                assert len(collect.read_journals(tmp, "answers/a")) == requests_n
            out[concurrency] = requests_n / elapsed
    return out


def main() -> None:
    print("## Length-controlled win rate, 95% bootstrap CI (2000 resamples)")
    print("| items | ours (batched Newton) s | reference (scipy per resample) s | speed-up | max CI bound diff |")
    print("|---:|---:|---:|---:|---:|")
    for n in (252, 805):
        r = bench_length_controlled(n)
        print(f"| {n} | {r['ours_s']:.3f} | {r['ref_s']:.2f} | {r['ref_s'] / r['ours_s']:.0f}x | "
              f"{r['max_bound_diff']:.4f} |")
    print()
    print("## Answer collection through RequestRunner (server answers in 50 ms; journal fsync per answer)")
    rates = bench_collection()
    print("| in flight | requests/s | vs one at a time |")
    print("|---:|---:|---:|")
    for concurrency, rate in rates.items():
        print(f"| {concurrency} | {rate:.1f} | {rate / rates[1]:.1f}x |")


if __name__ == "__main__":
    main()
