"""Ray fan-out of the exact near-duplicate filter, and the stage function behind ``alpaca-ray dedup``.

The pool (instructions already kept) is split over shard actors. Candidates go in blocks: every shard
reports which candidates of the block have a near-duplicate in its part of the pool (in parallel); those
are dropped, since that part of the pool was kept before the block. The survivors are then resolved in
order against each other in the driver (Alpaca's sequential rule within the block), and the kept ones
join the shards. The result is the sequential rule's, item for item; the kernels are the ones of
:mod:`alpaca_ray.dedup.exact`, which work (and are tested) without Ray.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.dedup.config import DedupConfig
from alpaca_ray.dedup.exact import (
    NearDuplicateFilter,
    PrefixIndex,
    TokenCorpus,
    _progress,
    check_threshold,
    similarity_reports,
)

#: Kept records whose similarity reports are computed per task / progress-bar step.
REPORT_CHUNK = 256


class PoolShard:
    """One worker's part of the pool; answers "which of these candidates is near one of mine?"."""

    def __init__(self, offsets: np.ndarray, tokens: np.ndarray, elements: np.ndarray, threshold: float):
        # Writable copies: numba compiles (and caches) one version of the kernels, for writable arrays.
        self.corpus = TokenCorpus.from_arrays(offsets, tokens, elements)
        self.index = PrefixIndex(threshold)

    def check(self, block_ids: np.ndarray, new_members: np.ndarray) -> np.ndarray:
        """Add ``new_members`` to the shard, then True per block candidate with no near-duplicate in it."""
        self.index.add(self.corpus, new_members)
        return self.index.probe(self.corpus, block_ids, add_kept=False)


def _ensure_ray(address: str | None = None):
    return ensure_ray(address, log_to_driver=False, configure_logging=False, include_dashboard=False)


def dedup_on_ray(candidates: Sequence[str], against: Sequence[str] = (), threshold: float = 0.7,
                 num_workers: int = 2, block_size: int = 8192, progress: bool = False,
                 corpus: TokenCorpus | None = None, ray_address: str | None = None) -> list[bool]:
    """Kept flags, as :func:`alpaca_ray.dedup.dedup_instructions`, with the pool spread over Ray actors."""
    threshold = check_threshold(threshold)
    ray = _ensure_ray(ray_address)
    corpus = corpus if corpus is not None else TokenCorpus()
    # One call for both, so elements are ordered by their frequency over pool and candidates together.
    ids = corpus.add([*against, *candidates])
    against_ids, candidate_ids = ids[: len(against)], ids[len(against):]
    arrays = [ray.put(np.ascontiguousarray(a)) for a in (corpus.offsets, corpus.tokens, corpus.elements)]
    shard_actor = ray.remote(num_cpus=1)(PoolShard)
    shards = [shard_actor.remote(*arrays, threshold) for _ in range(num_workers)]
    # Round-robin keeps the shards the same size, so no worker waits on a bigger one.
    pending = [against_ids[w::num_workers] for w in range(num_workers)]
    next_shard = len(against_ids) % num_workers
    kept = np.ones(len(candidate_ids), dtype=bool)
    bar = _progress(len(candidate_ids), progress)
    try:
        for lo in range(0, len(candidate_ids), block_size):
            block = candidate_ids[lo:lo + block_size]
            answers = ray.get([shard.check.remote(block, pending[w]) for w, shard in enumerate(shards)])
            clear_of_pool = np.logical_and.reduce(answers)
            survivors = block[clear_of_pool]
            # Within the block, Alpaca's order decides: resolve the survivors sequentially against each other.
            survivors_kept = PrefixIndex(threshold).probe(corpus, survivors)
            block_kept = np.zeros(len(block), dtype=bool)
            block_kept[np.flatnonzero(clear_of_pool)[survivors_kept]] = True
            kept[lo:lo + len(block)] = block_kept
            new_members = block[block_kept]
            order = (next_shard + np.arange(len(new_members))) % num_workers
            pending = [new_members[order == w] for w in range(num_workers)]
            next_shard = (next_shard + len(new_members)) % num_workers
            if bar is not None:
                bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
        for shard in shards:
            ray.kill(shard)
    return kept.tolist()


def _report_task(offsets, tokens, elements, pool_ids, pool_lengths, query_ids, pool_texts):
    corpus = TokenCorpus.from_arrays(offsets, tokens, elements)  # copies: writable, as the kernels expect
    return similarity_reports(corpus, pool_ids, pool_lengths, query_ids, pool_texts)


def kept_similarity_reports(corpus: TokenCorpus, pool_ids: np.ndarray, num_against: int, pool_texts: Sequence[str],
                            num_workers: int = 0, progress: bool = False,
                            ray_address: str | None = None) -> list[tuple[dict[str, float], float]]:
    """For each kept candidate (``pool_ids[num_against:]``, in order), its report against the pool before it."""
    query_ids = np.asarray(pool_ids[num_against:], dtype=np.int64)
    pool_lengths = num_against + np.arange(len(query_ids))
    chunks = [slice(lo, lo + REPORT_CHUNK) for lo in range(0, len(query_ids), REPORT_CHUNK)]
    bar = _progress(len(query_ids), progress, "similarity")
    reports: list[tuple[dict[str, float], float]] = []
    if num_workers == 0:
        for chunk in chunks:
            reports += similarity_reports(corpus, pool_ids, pool_lengths[chunk], query_ids[chunk], pool_texts)
            if bar is not None:
                bar.update(len(query_ids[chunk]))
    else:
        ray = _ensure_ray(ray_address)
        task = ray.remote(num_cpus=1)(_report_task)
        shared = [ray.put(a) for a in (corpus.offsets, corpus.tokens, corpus.elements)]
        pool_ref, texts_ref = ray.put(np.asarray(pool_ids)), ray.put(list(pool_texts))
        refs = [task.remote(*shared, pool_ref, pool_lengths[chunk], query_ids[chunk], texts_ref)
                for chunk in chunks]
        for ref, chunk in zip(refs, chunks):  # in order, so the bar moves as results arrive
            reports += ray.get(ref)
            if bar is not None:
                bar.update(len(query_ids[chunk]))
    if bar is not None:
        bar.close()
    return reports


@dataclass
class DedupResult:
    """What a dedup run did."""

    total: int
    kept: int
    dropped: int
    seconds: float


def run_dedup(config: DedupConfig) -> DedupResult:
    """The stage: read ``config.input`` (and ``against``), drop near-duplicates, write ``config.output``."""
    from alpaca_ray.records import AlpacaRecord, read_records, write_records

    started = time.perf_counter()
    records = read_records(config.input, require_output=False)
    pool_records = read_records(config.against, require_output=False) if config.against else []
    candidates = [r.instruction for r in records]
    pool = [r.instruction for r in pool_records]
    if config.num_workers == 0:
        dedup_filter, candidate_ids = NearDuplicateFilter.for_batch(pool, candidates, config.threshold)
        kept = dedup_filter.filter_encoded(candidates, candidate_ids, progress=config.progress,
                                           block_size=config.block_size)
        corpus, pool_ids = dedup_filter.corpus, dedup_filter._pool_ids
    else:
        corpus = TokenCorpus()
        kept = dedup_on_ray(candidates, pool, config.threshold, config.num_workers, config.block_size,
                            config.progress, corpus=corpus, ray_address=config.ray_address)
        pool_ids = np.concatenate([np.arange(len(pool)), len(pool) + np.flatnonzero(kept)]).astype(np.int64)
    kept_records = [r for r, keep in zip(records, kept) if keep]
    if config.report_similar:
        pool_texts = pool + [r.instruction for r in kept_records]
        reports = kept_similarity_reports(corpus, pool_ids, len(pool), pool_texts, config.num_workers,
                                          config.progress, config.ray_address)
        kept_records = [
            AlpacaRecord(r.instruction, r.input, r.output,
                         {**r.extra, "most_similar_instructions": most_similar, "avg_similarity_score": average})
            for r, (most_similar, average) in zip(kept_records, reports)
        ]
    write_records(kept_records, config.output)
    if config.dropped_output:
        write_records([r for r, keep in zip(records, kept) if not keep], config.dropped_output)
    return DedupResult(len(records), len(kept_records), len(records) - len(kept_records),
                       time.perf_counter() - started)
