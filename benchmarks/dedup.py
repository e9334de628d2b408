"""Benchmark: `alpaca-ray dedup` from 50K to 1M instructions, each run checked item for item.

    python benchmarks/dedup.py                                  # 50K, 100K, 200K, 1M and every check
    python benchmarks/dedup.py --sizes 50000 100000 --subset 0  # a shorter curve, no rouge_score subset
    python benchmarks/dedup.py --sizes 50000 --ray-workers 2    # also the Ray fan-out at each size

Each size runs the real CLI (`alpaca-ray dedup --input X.jsonl --output kept.jsonl --against seeds`) in a
child process: wall seconds, the child's CPU seconds (steadier than wall on a shared machine) and its peak
memory. Every result is checked:

* against the previous implementation (commit ``PREVIOUS``, itself checked against Alpaca's loop), in
  full, for sizes up to ``--previous-up-to``;
* against Alpaca's loop itself (``rouge_score``'s ``_score_lcs`` against every kept instruction) on the
  first ``--subset`` instructions;
* at every size, ``--spot-checks`` positions drawn at random are decided again from scratch: the candidate
  is scored against every earlier kept instruction (each one sharing a token with it; the rest score 0),
  with no pruning, and the run's decision must agree (given the run's own earlier decisions, which is
  what the sequential rule decides from).

Instructions come from ``make_instructions.py`` (seed 0), cached under ``--cache-dir`` once made.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from make_instructions import make_instructions  # noqa: E402

from alpaca_ray.dedup import reference_filter  # noqa: E402
from alpaca_ray.dedup.exact import TokenCorpus, _scores_kernel  # noqa: E402

SHARED_SEEDS = REPO.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
#: The last commit of the posting-list filter this one replaced (first-seen element order, no length index).
PREVIOUS = "6559481f7443d2272705e2f0b3b90079dd0c254b"


def seed_instructions() -> tuple[list[str], str]:
    """The pool Alpaca starts from: self-instruct's 175 seed tasks when present, else 175 generated ones."""
    if SHARED_SEEDS.is_file():
        lines = SHARED_SEEDS.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["instruction"] for line in lines if line.strip()], "self-instruct seed tasks"
    return make_instructions(175, seed=12345, duplicate_rate=0.0), "175 generated seeds"


def workload(count: int, seed: int, cache_dir: Path) -> tuple[list[str], Path]:
    """The instructions and a JSONL file of them as Alpaca records (made once, then read from the cache)."""
    path = cache_dir / f"instructions-{count}-seed{seed}.jsonl"
    if not path.is_file():
        texts = make_instructions(count, seed=seed)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for text in texts:
                handle.write(json.dumps({"instruction": text, "input": "", "output": ""}) + "\n")
        tmp.replace(path)
        return texts, path
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["instruction"] for line in handle], path


def run_cli(input_path: Path, seeds_path: Path, output: Path, extra: list[str]) -> tuple[float, float, float, str]:
    """`alpaca-ray dedup` in a child process: (wall s, CPU s of the child, peak RSS GiB, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "alpaca_ray.cli", "dedup", "--input", str(input_path),
                             "--output", str(output), "--against", str(seeds_path), "--no-progress", *extra],
                            cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise SystemExit(f"alpaca-ray dedup failed:\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss / 2**20, result.stdout.strip()


def kept_flags(texts: list[str], output: Path) -> list[bool]:
    """Which inputs the run kept, from its output file (kept records are written in input order)."""
    with output.open(encoding="utf-8") as handle:
        kept = [json.loads(line)["instruction"] for line in handle]
    flags, k = [], 0
    for text in texts:
        keep = k < len(kept) and kept[k] == text
        flags.append(keep)
        k += keep
    assert k == len(kept), "the output holds records that are not in the input, in input order"
    return flags


def previous_implementation():
    """``alpaca_ray.dedup.exact`` as of commit PREVIOUS, loaded from git (None outside a git checkout)."""
    source = subprocess.run(["git", "show", f"{PREVIOUS}:alpaca_ray/dedup/exact.py"], cwd=REPO,
                            capture_output=True, text=True)
    if source.returncode:
        return None
    path = Path(tempfile.mkdtemp()) / "previous_exact.py"
    path.write_text(source.stdout, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("previous_exact", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spot_check(texts: list[str], seeds: list[str], flags: list[bool], samples: int, seed: int) -> int:
    """Decide ``samples`` random positions again with no pruning; returns how many were checked."""
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(len(texts), size=min(samples, len(texts)), replace=False))
    corpus = TokenCorpus()
    ids = corpus.add([*seeds, *texts])
    pool_ids = np.concatenate([ids[: len(seeds)], ids[len(seeds):][np.asarray(flags)]])
    kept_before = len(seeds) + np.concatenate([[0], np.cumsum(flags)])[positions]
    rows, _, scores = _scores_kernel(corpus.offsets, corpus.tokens, max(corpus.num_tokens, 1), pool_ids,
                                     kept_before.astype(np.int64), ids[len(seeds):][positions])
    for k, position in enumerate(positions):
        best = scores[rows[k]:rows[k + 1]].max(initial=0.0)
        assert flags[position] == (not best > 0.7), f"position {position}: kept={flags[position]}, max F {best}"
    return len(positions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000, 1_000_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=1_000, help="instructions checked against rouge_score")
    parser.add_argument("--previous-up-to", type=int, default=100_000,
                        help="check against the previous implementation in full up to this size")
    parser.add_argument("--spot-checks", type=int, default=300, help="positions re-decided per size")
    parser.add_argument("--ray-workers", type=int, default=0, help="also run --num-workers N at each size")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "alpaca-ray-bench")
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    seeds, seeds_name = seed_instructions()
    seeds_path = args.cache_dir / "seeds.jsonl"
    seeds_path.write_text("".join(json.dumps({"instruction": s, "input": "", "output": ""}) + "\n" for s in seeds),
                          encoding="utf-8")
    previous = previous_implementation() if args.previous_up_to else None
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; pool: {len(seeds)} "
          f"{seeds_name}; workload: benchmarks/make_instructions.py seed {args.seed}")
    header = f"| {'run':<44} | {'wall s':>7} | {'CPU s':>7} | {'peak GiB':>8} | {'kept':>9} | {'load':>5} | checks"
    print(header + "\n|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|--------")

    run_cli(*workload(2_000, args.seed, args.cache_dir)[1:], seeds_path, args.cache_dir / "warm.jsonl", [])  # numba
    for size in args.sizes:
        texts, input_path = workload(size, args.seed, args.cache_dir)
        output = args.cache_dir / f"kept-{size}.jsonl"
        runs = [("", [])] + ([(f", --num-workers {args.ray_workers}", ["--num-workers", str(args.ray_workers)])]
                             if args.ray_workers else [])
        first_flags = None
        for label, extra in runs:
            load = os.getloadavg()[0]
            wall, cpu, peak, _ = run_cli(input_path, seeds_path, output, extra)
            flags = kept_flags(texts, output)
            checks = []
            if first_flags is None:
                first_flags = flags
                if previous is not None and size <= args.previous_up_to:
                    cpu_started = time.process_time()
                    assert previous.dedup_instructions(texts, seeds) == flags, "differs from the previous one"
                    checks.append(f"= previous implementation ({time.process_time() - cpu_started:.1f} CPU s "
                                  "in-process)")
                if args.subset:
                    subset = texts[: args.subset]
                    assert reference_filter(subset, seeds) == flags[: len(subset)], "differs from rouge_score"
                    checks.append(f"first {len(subset):,} = rouge_score loop")
                if args.spot_checks:
                    checked = spot_check(texts, seeds, flags, args.spot_checks, size)
                    checks.append(f"{checked} spot checks")
            else:
                assert flags == first_flags, "the Ray run must decide as the in-process run"
                checks.append("= in-process run")
            cpu_text = f"{cpu:7.1f}" if not extra else f"{cpu:7.1f}*"
            print(f"| {f'{size:,} instructions{label}':<44} | {wall:7.1f} | {cpu_text} | {peak:8.2f} | "
                  f"{sum(flags):>9,} | {load:5.1f} | {'; '.join(checks)}", flush=True)
    if args.ray_workers:
        print("* CPU s of the CLI process only: Ray workers run in processes of the Ray cluster")


if __name__ == "__main__":
    main()
