"""Alpaca's near-duplicate rule, exact and fast: prune with bounds that cannot lie, LCS only for survivors.

A candidate is dropped when its ROUGE-L F against any instruction already kept is ``> threshold``. For a
candidate of m tokens and a pool instruction of n tokens with longest common subsequence L:

* F = 2L/(m+n) and L <= min(m, n), so F <= 2 min(m,n)/(m+n): the *length bound*;
* L <= o, the size of the multiset intersection of their tokens: the *overlap bound*;
* F > threshold needs L > alpha*m with alpha = threshold / (2 - threshold) (from L <= n), and likewise
  L > alpha*n. So the pair must share at least t(m) = floor(alpha*m) + 1 tokens, and then, with any fixed
  order of tokens, the first token they share lies within the first m - t(m) + 1 tokens of the candidate
  (its *prefix*) and within the prefix of the pool instruction (prefix filtering, as in AllPairs/PPJoin).
  Only prefixes go into the inverted index, and where the first shared token sits in each record bounds
  how many more they can share (the *positional bound*).

Tokens are counted as a multiset by numbering occurrences: the k-th "the" of an instruction is the element
("the", k), so multiset intersections are plain set intersections of element ids. The fixed order puts
elements seen later first (higher id first): words met early (and so, typically, common ones) come last, new
and rare ones first, which keeps posting lists short and lets the index grow without ever being rebuilt.
Candidate pairs are found through the index, bounded as above, and only then is the LCS computed, in
compiled code (numba), with the very float expression ``rouge_score`` uses, so a pair at exactly the threshold
decides as in Alpaca. The slack of 1e-6 in t(m) only ever widens the search.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numba import njit

from alpaca_ray.dedup.rouge import rouge_tokens

#: Candidates per progress-bar update (and chance to re-lay the index contiguously).
DEFAULT_BLOCK_SIZE = 2048


class TokenCorpus:
    """Instructions encoded once for the kernels: CSR arrays of token ids (for LCS) and element ids.

    Record r has tokens ``tokens[offsets[r]:offsets[r+1]]`` in text order and the same number of
    multiset elements ``elements[...]`` (element = (token, occurrence number)), sorted by decreasing id:
    the order in which prefixes are taken.
    """

    def __init__(self) -> None:
        self.token_ids: dict[str, int] = {}
        self.element_ids: dict[tuple[int, int], int] = {}
        self._offsets = np.zeros(1024, dtype=np.int64)
        self._tokens = np.zeros(8192, dtype=np.int32)
        self._elements = np.zeros(8192, dtype=np.int32)
        self.size = 0
        self.max_length = 0
        # Set only for a corpus rebuilt from arrays (in a Ray worker), which has no vocabulary dicts.
        self._num_elements: int | None = None
        self._num_tokens: int | None = None

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets[: self.size + 1]

    @property
    def tokens(self) -> np.ndarray:
        return self._tokens[: self._offsets[self.size]]

    @property
    def elements(self) -> np.ndarray:
        return self._elements[: self._offsets[self.size]]

    @property
    def num_elements(self) -> int:
        return self._num_elements if self._num_elements is not None else len(self.element_ids)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens if self._num_tokens is not None else len(self.token_ids)

    def lengths(self, ids: np.ndarray | None = None) -> np.ndarray:
        offsets = self.offsets
        return np.diff(offsets) if ids is None else offsets[ids + 1] - offsets[ids]

    def add(self, texts: Iterable[str]) -> np.ndarray:
        """Encode texts and append them; returns their record ids."""
        token_ids, element_ids = self.token_ids, self.element_ids
        flat_tokens: list[int] = []
        flat_elements: list[int] = []
        lengths: list[int] = []
        for text in texts:
            tokens = rouge_tokens(text)
            seen: dict[int, int] = {}
            record_elements = []
            for token in tokens:
                tid = token_ids.get(token)
                if tid is None:
                    tid = token_ids[token] = len(token_ids)
                flat_tokens.append(tid)
                k = seen.get(tid, 0)
                seen[tid] = k + 1
                eid = element_ids.get((tid, k))
                if eid is None:
                    eid = element_ids[(tid, k)] = len(element_ids)
                record_elements.append(eid)
            record_elements.sort(reverse=True)
            flat_elements += record_elements
            lengths.append(len(tokens))
        return self._append(np.asarray(lengths, dtype=np.int64), flat_tokens, flat_elements)

    def _append(self, lengths: np.ndarray, tokens, elements) -> np.ndarray:
        n, start = len(lengths), int(self._offsets[self.size])
        total = start + int(lengths.sum())
        if self.size + n + 1 > len(self._offsets):
            self._offsets = _grown(self._offsets, self.size + n + 1)
        if total > len(self._tokens):
            self._tokens = _grown(self._tokens, total)
            self._elements = _grown(self._elements, total)
        self._offsets[self.size + 1 : self.size + n + 1] = start + np.cumsum(lengths)
        self._tokens[start:total] = tokens
        self._elements[start:total] = elements
        ids = np.arange(self.size, self.size + n, dtype=np.int64)
        self.size += n
        self.max_length = max(self.max_length, int(lengths.max()) if n else 0)
        return ids

    @classmethod
    def from_arrays(cls, offsets: np.ndarray, tokens: np.ndarray, elements: np.ndarray) -> TokenCorpus:
        corpus = cls()
        corpus._offsets, corpus._tokens, corpus._elements = offsets.copy(), tokens.copy(), elements.copy()
        corpus.size = len(offsets) - 1
        corpus.max_length = int(np.diff(offsets).max()) if corpus.size else 0
        corpus._num_elements = int(elements.max()) + 1 if len(elements) else 0
        corpus._num_tokens = int(tokens.max()) + 1 if len(tokens) else 0
        return corpus


def _grown(array: np.ndarray, needed: int) -> np.ndarray:
    bigger = np.zeros(max(needed, 2 * len(array)), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger


# --------------------------------------------------------------------------------------------------------
# Compiled kernels. Plain loops; numba compiles them once (cached on disk).


@njit(cache=True)
def _fmeasure(lcs, candidate_len, pool_len):
    # rouge_score: precision = lcs/len(prediction=pool), recall = lcs/len(target=candidate),
    # 2 * precision * recall / (precision + recall); the same IEEE operations in the same order.
    if lcs == 0:
        return 0.0
    precision = float(lcs) / float(pool_len)
    recall = float(lcs) / float(candidate_len)
    return 2.0 * precision * recall / (precision + recall)


@njit(cache=True)
def _lcs_length(a, b, row):
    """Length of the longest common subsequence of int arrays a and b (one DP row, ``row`` >= len(b)+1)."""
    n = len(b)
    for j in range(n + 1):
        row[j] = 0
    for i in range(len(a)):
        ai = a[i]
        diagonal = 0
        for j in range(1, n + 1):
            above = row[j]
            if ai == b[j - 1]:
                row[j] = diagonal + 1
            elif row[j - 1] > above:
                row[j] = row[j - 1]
            diagonal = above
    return row[n]


@njit(cache=True)
def _min_overlap(m, threshold):
    """Fewest shared tokens a near-duplicate of an m-token candidate can have (slack keeps it a lower bound)."""
    alpha = threshold / (2.0 - threshold)
    return max(1, int(np.floor(alpha * m - 1e-6)) + 1)


@njit(cache=True)
def _prefix_length(m, threshold):
    """How many of a record's rarest elements must include one shared with any of its near-duplicates."""
    return m - _min_overlap(m, threshold) + 1 if m > 0 else 0


@njit(cache=True)
def _suffix_overlap(a, i, b, j):
    """Common values of a[i:] and b[j:], both sorted in decreasing order."""
    count = 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            count += 1
            i += 1
            j += 1
        elif a[i] > b[j]:
            i += 1
        else:
            j += 1
    return count


@njit(cache=True)
def _index_kernel(offsets, elements, head, link, post_record, post_position, size, ids, threshold):
    """Add the prefixes of records ``ids`` to the index (posting lists are linked lists through ``link``)."""
    for r in ids:
        for k in range(_prefix_length(offsets[r + 1] - offsets[r], threshold)):
            e = elements[offsets[r] + k]
            post_record[size] = r
            post_position[size] = k
            link[size] = head[e]
            head[e] = size
            size += 1
    return size


@njit(cache=True)
def _probe_kernel(offsets, tokens, elements, max_length, head, link, post_record, post_position, size,
                  query_ids, threshold, add_kept):
    """For each query in order: True if no indexed record (nor, with ``add_kept``, an earlier kept query) is
    a near-duplicate of it. With ``add_kept`` this is Alpaca's sequential rule and kept queries are indexed.
    Returns the flags and the new index size.
    """
    row = np.zeros(max_length + 1, dtype=np.int64)
    last_seen = np.full(len(offsets) - 1, -1, dtype=np.int64)
    kept = np.ones(len(query_ids), dtype=np.bool_)
    for qi in range(len(query_ids)):
        q = query_ids[qi]
        q_lo, q_hi = offsets[q], offsets[q + 1]
        m = q_hi - q_lo
        q_elements = elements[q_lo:q_hi]
        prefix = _prefix_length(m, threshold)
        for i in range(prefix):
            p = head[q_elements[i]]
            while p >= 0:
                j = post_record[p]
                if last_seen[j] != qi:
                    # The first time j turns up, q_elements[i] is the first element q and j share in the
                    # order (an earlier one would sit in both prefixes and have found j already): any
                    # further shared elements come after it in both records.
                    last_seen[j] = qi
                    n = offsets[j + 1] - offsets[j]
                    pj = post_position[p]
                    if (_fmeasure(min(m, n), m, n) > threshold
                            and _fmeasure(1 + min(m - i - 1, n - pj - 1), m, n) > threshold):
                        j_elements = elements[offsets[j]:offsets[j + 1]]
                        overlap = 1 + _suffix_overlap(q_elements, i + 1, j_elements, pj + 1)
                        if _fmeasure(overlap, m, n) > threshold:
                            lcs = _lcs_length(tokens[q_lo:q_hi], tokens[offsets[j]:offsets[j + 1]], row)
                            if _fmeasure(lcs, m, n) > threshold:
                                kept[qi] = False
                                break
                p = link[p]
            if not kept[qi]:
                break
        if kept[qi] and add_kept:
            for k in range(prefix):
                e = q_elements[k]
                post_record[size] = q
                post_position[size] = k
                link[size] = head[e]
                head[e] = size
                size += 1
    return kept, size


@njit(cache=True)
def _compact_kernel(head, link, post_record, post_position, size):
    """Lay each posting list out contiguously (same order), so walking it reads memory in sequence."""
    new_link = np.empty_like(link)
    new_record = np.empty_like(post_record)
    new_position = np.empty_like(post_position)
    out = 0
    for e in range(len(head)):
        p = head[e]
        if p < 0:
            continue
        head[e] = out
        while p >= 0:
            new_record[out] = post_record[p]
            new_position[out] = post_position[p]
            new_link[out] = out + 1
            out += 1
            p = link[p]
        new_link[out - 1] = -1
    return new_link, new_record, new_position


class PrefixIndex:
    """The growing inverted index of kept records' prefixes (element -> records, with positions)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.head = np.full(1024, -1, dtype=np.int64)
        self.link = np.zeros(4096, dtype=np.int64)
        self.record = np.zeros(4096, dtype=np.int64)
        self.position = np.zeros(4096, dtype=np.int64)
        self.size = 0
        self.compacted_size = 0

    def compact(self) -> None:
        """Re-lay the posting lists contiguously once they have grown enough to be worth it (amortised)."""
        if self.size > 1.25 * self.compacted_size + 4096:
            self.link, self.record, self.position = _compact_kernel(self.head, self.link, self.record,
                                                                    self.position, self.size)
            self.compacted_size = self.size

    def _reserve(self, corpus: TokenCorpus, ids: np.ndarray) -> None:
        if corpus.num_elements > len(self.head):
            head = np.full(max(corpus.num_elements, 2 * len(self.head)), -1, dtype=np.int64)
            head[: len(self.head)] = self.head
            self.head = head
        needed = self.size + int(corpus.lengths(ids).sum())  # a prefix is never longer than its record
        if needed > len(self.link):
            self.link, self.record, self.position = (_grown(a, needed) for a in (self.link, self.record,
                                                                                   self.position))

    def add(self, corpus: TokenCorpus, ids: np.ndarray) -> None:
        """Index records without checking them (the pool given up front, a shard's new members)."""
        ids = np.array(ids, dtype=np.int64)  # a writable copy: numba compiles one variant per array flags
        self._reserve(corpus, ids)
        self.size = _index_kernel(corpus.offsets, corpus.elements, self.head, self.link, self.record,
                                  self.position, self.size, ids, self.threshold)
        self.compact()

    def probe(self, corpus: TokenCorpus, query_ids: np.ndarray, add_kept: bool = True) -> np.ndarray:
        """Kept flags for ``query_ids`` in order (see :func:`_probe_kernel`)."""
        query_ids = np.array(query_ids, dtype=np.int64)  # writable, as above
        self._reserve(corpus, query_ids if add_kept else query_ids[:0])
        kept, self.size = _probe_kernel(corpus.offsets, corpus.tokens, corpus.elements, corpus.max_length,
                                        self.head, self.link, self.record, self.position, self.size,
                                        query_ids, self.threshold, add_kept)
        return kept


@njit(cache=True)
def _brute_force_kernel(offsets, tokens, pool_ids, query_ids, threshold):
    """The sequential rule with no pruning at all (every pair's LCS): a second reference for tests."""
    kept_ids = np.empty(len(pool_ids) + len(query_ids), dtype=np.int64)
    kept_ids[: len(pool_ids)] = pool_ids
    num_kept = len(pool_ids)
    max_len = 1
    for r in range(len(offsets) - 1):
        max_len = max(max_len, offsets[r + 1] - offsets[r])
    row = np.zeros(max_len + 1, dtype=np.int64)
    kept = np.ones(len(query_ids), dtype=np.bool_)
    for qi in range(len(query_ids)):
        q = query_ids[qi]
        m = offsets[q + 1] - offsets[q]
        for k in range(num_kept):
            j = kept_ids[k]
            n = offsets[j + 1] - offsets[j]
            if m == 0 or n == 0:
                continue
            lcs = _lcs_length(tokens[offsets[q] : offsets[q + 1]], tokens[offsets[j] : offsets[j + 1]], row)
            if _fmeasure(lcs, m, n) > threshold:
                kept[qi] = False
                break
        if kept[qi]:
            kept_ids[num_kept] = q
            num_kept += 1
    return kept


@njit(cache=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(cache=True)
def _scores_kernel(offsets, tokens, num_tokens, pool_ids, pool_lengths, query_ids):
    """ROUGE-L F of each query against the first ``pool_lengths[k]`` pool members, as sparse rows
    (positions in pool order, scores); pairs sharing no token score 0 and are left out.

    LCS is bit-parallel (Hyyro) for candidates of <= 64 tokens: one pass over the pool text with a
    word-sized state, exact, several times faster than the DP table.
    """
    # Full inverted index (every token, not just a prefix): any shared token gives a non-zero score.
    count = np.zeros(num_tokens + 1, dtype=np.int64)
    for r in pool_ids:
        for p in range(offsets[r], offsets[r + 1]):
            count[tokens[p] + 1] += 1
    first = np.cumsum(count)
    fill = np.zeros(num_tokens, dtype=np.int64)
    postings = np.empty(first[num_tokens], dtype=np.int64)
    for position in range(len(pool_ids)):
        r = pool_ids[position]
        for p in range(offsets[r], offsets[r + 1]):
            t = tokens[p]
            # A token repeated in one record is indexed once per occurrence; duplicates are skipped below.
            postings[first[t] + fill[t]] = position
            fill[t] += 1
    last_seen = np.full(len(pool_ids), -1, dtype=np.int64)
    masks = np.zeros(num_tokens, dtype=np.uint64)
    max_len = 1
    for r in range(len(offsets) - 1):
        max_len = max(max_len, offsets[r + 1] - offsets[r])
    row = np.zeros(max_len + 1, dtype=np.int64)
    out_rows = np.zeros(len(query_ids) + 1, dtype=np.int64)
    out_positions = []
    out_scores = []
    for qi in range(len(query_ids)):
        q = query_ids[qi]
        q_tokens = tokens[offsets[q]:offsets[q + 1]]
        m = len(q_tokens)
        bit_parallel = m <= 64
        if bit_parallel:
            for k in range(m):
                masks[q_tokens[k]] |= np.uint64(1) << np.uint64(k)
        limit = pool_lengths[qi]
        for k in range(m):
            t = q_tokens[k]
            for p in range(first[t], first[t] + fill[t]):
                position = postings[p]
                if position >= limit:
                    break  # postings are in pool order; later members were not yet in the pool
                if last_seen[position] == qi:
                    continue
                last_seen[position] = qi
                j = pool_ids[position]
                j_tokens = tokens[offsets[j]:offsets[j + 1]]
                if bit_parallel:
                    v = ~np.uint64(0)
                    for y in j_tokens:
                        u = v & masks[y]
                        v = (v + u) | (v - u)
                    lcs = m - _popcount(v & ((np.uint64(1) << np.uint64(m)) - np.uint64(1))) if m < 64 \
                        else 64 - _popcount(v)
                else:
                    lcs = _lcs_length(q_tokens, j_tokens, row)
                out_positions.append(position)
                out_scores.append(_fmeasure(lcs, m, len(j_tokens)))
        if bit_parallel:
            for k in range(m):
                masks[q_tokens[k]] = np.uint64(0)
        out_rows[qi + 1] = len(out_positions)
    return out_rows, np.array(out_positions, dtype=np.int64), np.array(out_scores, dtype=np.float64)


def similarity_reports(corpus: TokenCorpus, pool_ids: np.ndarray, pool_lengths: np.ndarray, query_ids: np.ndarray,
                       pool_texts: Sequence[str], top: int = 10) -> list[tuple[dict[str, float], float]]:
    """Alpaca's (most_similar_instructions, avg_similarity_score) for each query against its pool prefix."""
    rows, positions, scores = _scores_kernel(corpus.offsets, corpus.tokens,
                                             max(corpus.num_tokens, 1), np.array(pool_ids, np.int64),
                                             np.array(pool_lengths, np.int64), np.array(query_ids, np.int64))
    reports = []
    for k, length in enumerate(pool_lengths):
        dense = np.zeros(int(length), dtype=np.float64)
        dense[positions[rows[k]:rows[k + 1]]] = scores[rows[k]:rows[k + 1]]
        reports.append(similarity_summary(dense, pool_texts, top))
    return reports


# --------------------------------------------------------------------------------------------------------
# Python API.


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    return threshold


class NearDuplicateFilter:
    """Alpaca's near-duplicate filter over a growing pool: ``filter(candidates)`` keeps, in order, each
    candidate whose ROUGE-L F against every instruction kept so far is ``<= threshold``; kept ones join.

    >>> f = NearDuplicateFilter(["Give three tips for staying healthy."])
    >>> f.filter(["Give three tips for staying very healthy.", "Name a prime number."])
    [False, True]
    """

    def __init__(self, pool: Sequence[str] = (), threshold: float = 0.7):
        self.threshold = check_threshold(threshold)
        self.corpus = TokenCorpus()
        self.pool: list[str] = list(pool)
        self._pool_ids = self.corpus.add(self.pool)
        self.index = PrefixIndex(self.threshold)
        self.index.add(self.corpus, self._pool_ids)

    def __len__(self) -> int:
        return len(self.pool)

    def filter(self, candidates: Sequence[str], progress: bool = False,
               block_size: int = DEFAULT_BLOCK_SIZE) -> list[bool]:
        """Kept flags (True = kept), one per candidate; kept candidates are appended to :attr:`pool`."""
        candidates = list(candidates)
        query_ids = self.corpus.add(candidates)
        kept = np.ones(len(candidates), dtype=bool)
        bar = _progress(len(candidates), progress)
        for lo in range(0, len(candidates), block_size):
            block = query_ids[lo : lo + block_size]
            block_kept = self.index.probe(self.corpus, block)
            self.index.compact()
            kept[lo : lo + len(block)] = block_kept
            self._pool_ids = np.concatenate([self._pool_ids, block[block_kept]])
            if bar is not None:
                bar.update(len(block))
        if bar is not None:
            bar.close()
        self.pool += [text for text, keep in zip(candidates, kept) if keep]
        return kept.tolist()

    def similarity_report(self, candidate: str, top: int = 10) -> tuple[dict[str, float], float]:
        """Alpaca's ``most_similar_instructions`` and ``avg_similarity_score`` of a text against the pool."""
        query_ids = self.corpus.add([candidate])
        return similarity_reports(self.corpus, self._pool_ids, np.array([len(self._pool_ids)]), query_ids,
                                  self.pool, top)[0]


def similarity_summary(scores: np.ndarray, pool: Sequence[str], top: int = 10) -> tuple[dict[str, float], float]:
    """As Alpaca: ``{pool[i]: scores[i] for i in np.argsort(scores)[-10:][::-1]}`` and ``np.mean(scores)``."""
    if len(scores) == 0:
        return {}, 0.0
    most_similar = {pool[i]: float(scores[i]) for i in np.argsort(scores)[-top:][::-1]}
    return most_similar, float(np.mean(scores))


def dedup_instructions(candidates: Sequence[str], against: Sequence[str] = (), threshold: float = 0.7,
                       progress: bool = False) -> list[bool]:
    """Kept flags for ``candidates`` under Alpaca's rule, with ``against`` (e.g. seed tasks) as the pool."""
    return NearDuplicateFilter(against, threshold).filter(candidates, progress=progress)


def brute_force_filter(candidates: Sequence[str], pool: Sequence[str] = (), threshold: float = 0.7) -> list[bool]:
    """The sequential rule computing every pair's LCS (compiled, no pruning): a fast second reference."""
    corpus = TokenCorpus()
    pool_ids = corpus.add(pool)
    query_ids = corpus.add(candidates)
    return _brute_force_kernel(corpus.offsets, corpus.tokens, pool_ids, query_ids, check_threshold(threshold)).tolist()


def _progress(total: int, enabled: bool, desc: str = "dedup"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="instr", smoothing=0.1)
