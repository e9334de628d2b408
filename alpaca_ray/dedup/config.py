"""The dedup stage's config: Alpaca's near-duplicate rule as defaults, every choice a documented field."""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_ray.config import option, validate


@dataclass
class DedupConfig:
    """Drop instructions whose ROUGE-L F against an instruction kept before them is above a threshold."""

    input: str = option("", "Alpaca-format file (JSON / JSONL / Parquet) whose instructions to deduplicate (required)")
    output: str = option("", "file to write the kept records to, in input order; format from the name (required)")
    against: str | None = option(
        None, "instructions already kept (the pool), e.g. seed tasks: an Alpaca-format or self-instruct JSONL "
              "file; candidates near them are dropped too")
    threshold: float = option(0.7, "drop a candidate whose ROUGE-L F-measure is above this (Alpaca: 0.7)")
    report_similar: bool = option(
        False, "add Alpaca's most_similar_instructions (top 10) and avg_similarity_score to each kept record "
               "(costly: scores every kept pair that shares a token)")
    dropped_output: str | None = option(None, "also write the dropped records here (optional)")
    num_workers: int = option(0, "Ray workers sharing the pool (0: run in this process, no Ray)")
    ray_address: str | None = option(
        None, "Ray cluster to use with --num-workers (default: RAY_ADDRESS, set inside a Ray job; else a new "
              "local cluster)")
    block_size: int = option(8192, "candidates per round: checked against the pool in parallel, then in order")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        validate(self, [
            (bool(self.input), "input is required (--input FILE)"),
            (bool(self.output), "output is required (--output FILE)"),
            (0.0 <= self.threshold <= 1.0, f"threshold must be between 0 and 1, got {self.threshold}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
        ])
