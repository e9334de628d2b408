"""Benchmark: exact near-duplicate removal on a realistic 52K-instruction workload, and against Alpaca's loop.

    python benchmarks/dedup.py                   # 52K full run (in-process and on Ray) + 2,000 vs reference
    python benchmarks/dedup.py --ray-workers 0   # skip the Ray run (--subset 0: skip the reference)

Prints one table. The reference is Alpaca's own loop (rouge_score's ``_score_lcs`` against every kept
instruction, in Python); it runs in the same process on the same subset, and the kept flags must match.
Compile time (numba, cached on disk after the first run) is reported separately, not in the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from make_instructions import make_instructions  # noqa: E402

from alpaca_ray.dedup import dedup_instructions, reference_filter  # noqa: E402

SHARED_SEEDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "self_instruct_seed_tasks.jsonl"


def seed_instructions() -> tuple[list[str], str]:
    """The pool Alpaca starts from: self-instruct's 175 seed tasks when present, else 175 generated ones."""
    if SHARED_SEEDS.is_file():
        lines = SHARED_SEEDS.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["instruction"] for line in lines if line.strip()], "self-instruct seed tasks"
    return make_instructions(175, seed=12345, duplicate_rate=0.0), "175 generated seeds"


def timed(fn, repeat: int = 1):
    """(result, median wall seconds, median CPU seconds of this process)."""
    times, cpu_times, result = [], [], None
    for _ in range(repeat):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return result, statistics.median(times), statistics.median(cpu_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=52_000, help="instructions in the full run")
    parser.add_argument("--subset", type=int, default=2_000, help="instructions compared with the reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-workers", type=int, default=2, help="Ray actors for the Ray run (0: skip it)")
    args = parser.parse_args()

    seeds, seeds_name = seed_instructions()
    texts = make_instructions(args.count, seed=args.seed)
    rows = []

    _, compile_s, _ = timed(lambda: dedup_instructions(texts[:200], seeds))  # numba JIT / cache load
    full, full_s, full_cpu = timed(lambda: dedup_instructions(texts, seeds))
    rows.append((f"full run, {args.count:,} instructions, in-process", full_s, full_cpu, f"kept {sum(full):,}"))

    if args.ray_workers:
        import ray

        from alpaca_ray.dedup.pipeline import dedup_on_ray

        (_, ray_start_s, _) = timed(lambda: ray.init(address=os.environ.get("RAY_ADDRESS") or "local",
                                                  include_dashboard=False, log_to_driver=False,
                                                  configure_logging=False))
        on_ray, ray_s, _ = timed(lambda: dedup_on_ray(texts, seeds, num_workers=args.ray_workers))
        assert on_ray == full, "the Ray run must decide exactly as the in-process run"
        rows.append((f"full run on Ray, {args.ray_workers} workers (+{ray_start_s:.1f}s cluster start)", ray_s,
                     None, "identical"))
        ray.shutdown()

    if args.subset:  # --subset 0 skips the (slow) comparison with the reference
        subset = texts[: args.subset]
        reference, reference_s, reference_cpu = timed(lambda: reference_filter(subset, seeds))
        ours, ours_s, ours_cpu = timed(lambda: dedup_instructions(subset, seeds), repeat=5)
        assert ours == reference, "the fast filter must decide exactly as the reference"
        rows.append((f"{args.subset:,} subset: Alpaca's loop (rouge_score)", reference_s, reference_cpu,
                     f"kept {sum(reference):,}"))
        rows.append((f"{args.subset:,} subset: alpaca_ray.dedup (median of 5)", ours_s, ours_cpu,
                     f"identical; {reference_s / ours_s:,.0f}x faster (CPU time: {reference_cpu / ours_cpu:,.0f}x)"))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; pool: {len(seeds)} "
          f"{seeds_name}; workload: benchmarks/make_instructions.py seed {args.seed}; "
          f"numba compile/cache load {compile_s:.1f}s (not counted)")
    print(f"| {'run':<60} | {'wall s':>8} | {'CPU s':>8} | result")
    print(f"|{'-' * 62}|{'-' * 10}|{'-' * 10}|{'-' * 30}")
    for name, seconds, cpu_seconds, result in rows:
        cpu = f"{cpu_seconds:8.2f}" if cpu_seconds is not None else f"{'n/a':>8}"
        print(f"| {name:<60} | {seconds:8.2f} | {cpu} | {result}")


if __name__ == "__main__":
    main()
