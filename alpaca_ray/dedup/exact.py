"""Alpaca's near-duplicate rule, exact and fast: a set-similarity join whose filters cannot lie.

A candidate is dropped when its ROUGE-L F against any instruction already kept is ``> threshold``. For a
candidate of m tokens and a kept instruction of n tokens with longest common subsequence L, F = 2L/(m+n),
computed as ``rouge_score`` does in floats. F grows with L, so for each length pair there is a least LCS
that drops the candidate, ``_min_lcs(m, n)``, found by evaluating that very float expression (not a
rounded formula): a pair at exactly the threshold decides as in Alpaca. L never exceeds the size o of the
multiset intersection of the two token lists, so every filter below is a bound on o, as in the
set-similarity-join literature (AllPairs, PPJoin/PPJoin+):

* *length filter*: L <= min(m, n), so only lengths n with ``_min_lcs(m, n) <= min(m, n)`` can match;
* *prefix filter*: with all multiset elements in one fixed order, two records sharing at least L elements
  share one among the first n - L + 1 of each. Each kept record indexes its first n - t(n) + 1 elements,
  t(n) being the least ``_min_lcs`` over every partner length; a query walks, for each partner length, only
  its own first m - L(m, n) + 1 elements and only index entries at position <= n - L(m, n);
* *positional filter*: the first shared element, at positions (i, j), leaves at most min(m - i, n - j)
  shared elements, which is what the two position bounds above say; the merge that counts the remaining
  shared elements stops as soon as what is left cannot reach L (the suffix bound);
* *bitmap filter*: each index entry carries a 64-bit bitmap of its record's elements (one hashed bit each):
  a bit set for one record and not the other is an element of the first missing from the second, which
  bounds o before any record is touched (it is what keeps the candidates few on small vocabularies);
* only then the LCS itself (bit-parallel for queries of up to 64 tokens, DP beyond).

The fixed order puts rare elements first (global token frequency order, as PPJoin does): elements are
numbered, per batch of texts encoded together, from the most frequent to the rarest, and a record lists
its elements by decreasing number. Elements first met in a later batch get higher numbers (they count as
rarer than all before), so the order never changes for records already indexed and the index only grows.

The index keeps its posting lists sorted by record length (then position), so a query reads only the
lengths that can match: a sorted part, and a recent part (linked lists, a cache miss per entry read)
that is merged into it, in linear time, once it holds 1/32 as much (``MERGE_FRACTION``). Tokens are counted as a multiset by numbering
occurrences: the k-th "the" of an instruction is the element ("the", k).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numba import njit

from alpaca_ray.dedup.rouge import rouge_tokens

#: Candidates per progress-bar update (and chance to re-sort the index).
DEFAULT_BLOCK_SIZE = 2048
#: The recent (linked, unsorted) part of the index is merged into the sorted part once it holds this
#: fraction of it: reading a linked list costs a cache miss per entry, a sorted list streams.
MERGE_FRACTION = 1 / 32


class TokenCorpus:
    """Instructions encoded once for the kernels: CSR arrays of token ids (for LCS) and element ids.

    Record r has tokens ``tokens[offsets[r]:offsets[r+1]]`` in text order and the same number of
    multiset elements ``elements[...]`` (element = (token, occurrence number)), sorted by decreasing id,
    which is rarest first: the order in which prefixes are taken.
    """

    def __init__(self) -> None:
        self.token_ids: dict[str, int] = {}
        #: (token id << 32 | occurrence number) -> element id
        self.element_ids: dict[int, int] = {}
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
        """Encode texts and append them; returns their record ids.

        Encode everything known up front in one call (the pool and all candidates): element numbers
        follow the frequencies within a call, and the rarer the first elements, the shorter the walks.
        """
        token_ids = self.token_ids
        tokenized = [rouge_tokens(text) for text in texts]
        lengths = np.fromiter(map(len, tokenized), dtype=np.int64, count=len(tokenized))
        # setdefault's default is evaluated first: a new token gets the next free id.
        tokens = np.fromiter((token_ids.setdefault(token, len(token_ids)) for record in tokenized
                              for token in record), dtype=np.int64, count=int(lengths.sum()))
        local_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=local_offsets[1:])
        keys = (tokens << 32) | _occurrence_numbers(local_offsets, tokens, len(token_ids))
        unique_keys, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        ids = np.fromiter((self.element_ids.get(key, -1) for key in unique_keys.tolist()), dtype=np.int64,
                          count=len(unique_keys))
        new = np.flatnonzero(ids < 0)
        # New elements numbered from the most frequent (in this call's records) to the rarest.
        new = new[np.lexsort((unique_keys[new], -counts[new]))]
        ids[new] = len(self.element_ids) + np.arange(len(new))
        self.element_ids.update(zip(unique_keys[new].tolist(), ids[new].tolist()))
        elements = ids[inverse.ravel()]
        record_of = np.repeat(np.arange(len(lengths)), lengths)
        elements = elements[np.lexsort((-elements, record_of))]  # within each record, decreasing id
        return self._append(lengths, tokens, elements)

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
def _occurrence_numbers(offsets, tokens, num_tokens):
    """For each token, how many times the same token came before it in its record (0 for the first)."""
    seen = np.zeros(num_tokens, dtype=np.int64)
    out = np.empty(len(tokens), dtype=np.int64)
    for r in range(len(offsets) - 1):
        for p in range(offsets[r], offsets[r + 1]):
            out[p] = seen[tokens[p]]
            seen[tokens[p]] += 1
        for p in range(offsets[r], offsets[r + 1]):
            seen[tokens[p]] = 0
    return out


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
def _min_lcs(m, n, threshold):
    """The least LCS length whose F (rouge_score's floats) is above threshold for lengths m and n;
    ``min(m, n) + 1`` when no LCS can be (the pair can never match).

    F rises with L by 2/(m+n) per step, far more than the few ulps of rounding, so the float F is
    increasing in L and the search from a point just below the real-number answer is exact.
    """
    cap = min(m, n) + 1
    if cap == 1:
        return cap  # an empty text scores 0 against anything
    lcs = min(cap, max(1, int(threshold * 0.5 * (m + n)) - 2))
    while lcs > 1 and _fmeasure(lcs - 1, m, n) > threshold:
        lcs -= 1
    while lcs < cap and not _fmeasure(lcs, m, n) > threshold:
        lcs += 1
    return lcs


@njit(cache=True)
def _prefix_length(n, threshold):
    """How many of a record's first (rarest) elements include one shared with any near-duplicate of it:
    n - t + 1, with t the least ``_min_lcs(m, n)`` over the partner lengths m that can match at all."""
    if n == 0 or _min_lcs(n, n, threshold) > n:
        return 0  # not even an identical text would match (threshold 1, or an empty text)
    # _min_lcs(m, n) never falls as m grows, so the smallest m that can match gives the least t; and
    # whether m can match (_min_lcs(m, n) <= m) flips once, from no to yes, as m grows: bisect.
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if _min_lcs(mid, n, threshold) <= mid:
            hi = mid
        else:
            lo = mid + 1
    return n - _min_lcs(lo, n, threshold) + 1


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
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(cache=True)
def _bit_parallel_lcs(m, masks, b):
    """LCS of a query of m <= 64 tokens (``masks[t]``: bit k set where the query's k-th token is t) and b
    (Hyyro's bit-vector algorithm: one word of state per step, exact)."""
    v = ~np.uint64(0)
    for y in b:
        u = v & masks[y]
        v = (v + u) | (v - u)
    if m < 64:
        return m - _popcount(v & ((np.uint64(1) << np.uint64(m)) - np.uint64(1)))
    return 64 - _popcount(v)


@njit(cache=True)
def _signature(record_elements):
    """64-bit bitmap of a record's elements (each hashed to one bit), for the bitmap filter."""
    signature = np.uint64(0)
    for e in record_elements:
        signature |= np.uint64(1) << ((np.uint64(e) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(58))
    return signature


@njit(cache=True)
def _bitmap_overlap_bound(m, q_signature, n, y_signature):
    """At most how many elements two records can share, from their bitmaps: each bit set in one bitmap and
    not the other stands for at least one element of that record missing from the other (bitmap filter)."""
    return min(m - _popcount(q_signature & ~y_signature), n - _popcount(y_signature & ~q_signature))


@njit(cache=True)
def _shares_enough(a, i, b, j, need):
    """Whether a[i:] and b[j:] (both sorted in decreasing order) have ``need`` common values; stops as soon
    as what is left of either cannot make up the difference (the suffix bound)."""
    count = 0
    len_a, len_b = len(a), len(b)
    while count < need:
        if count + min(len_a - i, len_b - j) < need:
            return False
        if a[i] == b[j]:
            count += 1
            i += 1
            j += 1
        elif a[i] > b[j]:
            i += 1
        else:
            j += 1
    return True


@njit(cache=True)
def _is_near(q_tokens, q_elements, i, y_tokens, y_elements, j, need, masks, row, threshold, counters):
    """Pair verification, cheapest test first: the first shared element sits at (i, j); share ``need``
    elements in all (overlap bound), then the LCS itself, decided by rouge_score's own float expression."""
    counters[1] += 1
    if not _shares_enough(q_elements, i + 1, y_elements, j + 1, need - 1):
        return False
    counters[2] += 1
    m, n = len(q_tokens), len(y_tokens)
    if m <= 64:
        lcs = _bit_parallel_lcs(m, masks, y_tokens)
    else:
        lcs = _lcs_length(q_tokens, y_tokens, row)
    return _fmeasure(lcs, m, n) > threshold


@njit(cache=True)
def _index_kernel(offsets, elements, head, link, t_record, t_length, t_position, t_element, t_signature, size,
                  ids, threshold):
    """Add the prefixes of records ``ids`` to the recent part of the index (linked lists through ``link``)."""
    for r in ids:
        n = offsets[r + 1] - offsets[r]
        signature = _signature(elements[offsets[r]:offsets[r + 1]])
        for k in range(_prefix_length(n, threshold)):
            e = elements[offsets[r] + k]
            t_record[size] = r
            t_length[size] = n
            t_position[size] = k
            t_element[size] = e
            t_signature[size] = signature
            link[size] = head[e]
            head[e] = size
            size += 1
    return size


@njit(cache=True)
def _probe_kernel(offsets, tokens, elements, max_length, num_tokens,
                  s_start, s_record, s_length, s_position, s_signature,
                  head, link, t_record, t_length, t_position, t_element, t_signature, size,
                  query_ids, threshold, add_kept, counters):
    """For each query in order: True if no indexed record (nor, with ``add_kept``, an earlier kept query) is
    a near-duplicate of it. With ``add_kept`` this is Alpaca's sequential rule and kept queries are indexed.
    Returns the flags and the new size of the recent part. ``counters`` adds up, for the benchmark: index
    entries read, candidate pairs checked, pairs whose LCS was computed.
    """
    row = np.zeros(max_length + 1, dtype=np.int64)
    masks = np.zeros(max(num_tokens, 1), dtype=np.uint64)
    last_seen = np.full(len(offsets) - 1, -1, dtype=np.int64)
    min_lcs = np.zeros(max_length + 2, dtype=np.int64)
    num_sorted_elements = len(s_start) - 1
    kept = np.ones(len(query_ids), dtype=np.bool_)
    for qi in range(len(query_ids)):
        q = query_ids[qi]
        q_lo, q_hi = offsets[q], offsets[q + 1]
        m = q_hi - q_lo
        q_tokens = tokens[q_lo:q_hi]
        q_elements = elements[q_lo:q_hi]
        prefix = _prefix_length(m, threshold)
        if prefix == 0:
            continue  # nothing can be near it (empty text, threshold 1); kept, and nothing to index
        # Partner lengths that can match: shortest_n..longest_n, with the least LCS each needs.
        shortest_n, longest_n = max_length + 1, 0
        for n in range(1, max_length + 1):
            need = _min_lcs(m, n, threshold)
            min_lcs[n] = need
            if need <= min(m, n):
                shortest_n = min(shortest_n, n)
                longest_n = n
            elif n >= m:
                break  # need only grows with n from here
        if m <= 64:
            for k in range(m):
                masks[q_tokens[k]] |= np.uint64(1) << np.uint64(k)
        q_signature = _signature(q_elements)
        near = False
        for i in range(prefix):
            e = q_elements[i]
            if e < num_sorted_elements:
                lo, hi = s_start[e], s_start[e + 1]
                p = lo + np.searchsorted(s_length[lo:hi], shortest_n)
                while p < hi:
                    counters[0] += 1
                    n = s_length[p]
                    if n > longest_n:
                        break
                    need = min_lcs[n]
                    if i > m - need:
                        break  # need never falls as n grows: no longer partner can start this late
                    j = s_position[p]
                    if j > n - need:
                        # Positions rise within a length: skip the rest of this length's entries.
                        p = lo + np.searchsorted(s_length[lo:hi], n, side="right")
                        continue
                    if _bitmap_overlap_bound(m, q_signature, n, s_signature[p]) >= need:
                        y = s_record[p]
                        if last_seen[y] != qi:
                            # The first time y turns up, e is the first element q and y share (an earlier
                            # one would have passed the same bounds), so the rest are after (i, j).
                            last_seen[y] = qi
                            y_lo, y_hi = offsets[y], offsets[y + 1]
                            if _is_near(q_tokens, q_elements, i, tokens[y_lo:y_hi], elements[y_lo:y_hi], j,
                                        need, masks, row, threshold, counters):
                                near = True
                                break
                    p += 1
                if near:
                    break
            p = head[e]
            while p >= 0:
                counters[0] += 1
                n = t_length[p]
                if shortest_n <= n <= longest_n:
                    need = min_lcs[n]
                    j = t_position[p]
                    if i <= m - need and j <= n - need and \
                            _bitmap_overlap_bound(m, q_signature, n, t_signature[p]) >= need:
                        y = t_record[p]
                        if last_seen[y] != qi:
                            last_seen[y] = qi
                            y_lo, y_hi = offsets[y], offsets[y + 1]
                            if _is_near(q_tokens, q_elements, i, tokens[y_lo:y_hi], elements[y_lo:y_hi], j,
                                        need, masks, row, threshold, counters):
                                near = True
                                break
                p = link[p]
            if near:
                break
        if m <= 64:
            for k in range(m):
                masks[q_tokens[k]] = np.uint64(0)
        if near:
            kept[qi] = False
        elif add_kept:
            for k in range(prefix):
                e = q_elements[k]
                t_record[size] = q
                t_length[size] = m
                t_position[size] = k
                t_element[size] = e
                t_signature[size] = q_signature
                link[size] = head[e]
                head[e] = size
                size += 1
    return kept, size


@njit(cache=True)
def _merge_kernel(s_start, s_record, s_length, s_position, s_signature,
                  t_element, t_record, t_length, t_position, t_signature, num_elements):
    """The sorted part with the recent entries merged in, each list still ordered by (length, position)."""
    tail = len(t_element)
    # The recent entries in list order: a counting sort by element, then (lists are short) insertion sort.
    t_start = np.zeros(num_elements + 1, dtype=np.int64)
    for k in range(tail):
        t_start[t_element[k] + 1] += 1
    for e in range(num_elements):
        t_start[e + 1] += t_start[e]
    fill = t_start[:-1].copy()
    order = np.empty(tail, dtype=np.int64)
    for k in range(tail):
        e = t_element[k]
        slot = fill[e]
        fill[e] += 1
        while slot > t_start[e] and (t_length[order[slot - 1]], t_position[order[slot - 1]]) > (t_length[k],
                                                                                             t_position[k]):
            order[slot] = order[slot - 1]
            slot -= 1
        order[slot] = k
    total = len(s_record) + tail
    start = np.zeros(num_elements + 1, dtype=np.int64)
    record = np.empty(total, dtype=s_record.dtype)
    length = np.empty(total, dtype=s_length.dtype)
    position = np.empty(total, dtype=s_position.dtype)
    signature = np.empty(total, dtype=s_signature.dtype)
    out = 0
    num_sorted = len(s_start) - 1
    for e in range(num_elements):
        a, a_end = (s_start[e], s_start[e + 1]) if e < num_sorted else (0, 0)
        b, b_end = t_start[e], t_start[e + 1]
        while a < a_end or b < b_end:
            take_sorted = b == b_end or (a < a_end and (s_length[a], s_position[a]) <= (t_length[order[b]],
                                                                                         t_position[order[b]]))
            if take_sorted:
                record[out], length[out], position[out], signature[out] = \
                    s_record[a], s_length[a], s_position[a], s_signature[a]
                a += 1
            else:
                k = order[b]
                record[out], length[out], position[out], signature[out] = \
                    t_record[k], t_length[k], t_position[k], t_signature[k]
                b += 1
            out += 1
        start[e + 1] = out
    return start, record, length, position, signature


class PrefixIndex:
    """The growing inverted index of kept records' prefixes: element -> (record, length, position).

    A sorted part (CSR by element, each list ordered by record length, then position) and a recent part
    (linked lists, newest first) that is merged into the sorted part once it holds a quarter as much.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.sorted_start = np.zeros(1, dtype=np.int64)
        self.sorted_record = np.zeros(0, dtype=np.int64)
        self.sorted_length = np.zeros(0, dtype=np.int32)
        self.sorted_position = np.zeros(0, dtype=np.int32)
        self.sorted_signature = np.zeros(0, dtype=np.uint64)
        self.head = np.full(1024, -1, dtype=np.int64)
        self.link = np.zeros(4096, dtype=np.int64)
        self.record = np.zeros(4096, dtype=np.int64)
        self.length = np.zeros(4096, dtype=np.int32)
        self.position = np.zeros(4096, dtype=np.int32)
        self.element = np.zeros(4096, dtype=np.int32)
        self.signature = np.zeros(4096, dtype=np.uint64)
        self.size = 0  # entries in the recent part
        #: index entries read, candidate pairs checked, pairs whose LCS was computed (all probes so far)
        self.counters = np.zeros(3, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sorted_record) + self.size

    def compact(self) -> None:
        """Merge the recent part into the sorted part once it has grown enough to be worth it (amortised)."""
        if self.size > MERGE_FRACTION * len(self.sorted_record) + 4096:
            self.merge()

    def merge(self) -> None:
        """Merge the recent part into the sorted part now (linear in the index size)."""
        n = self.size
        (self.sorted_start, self.sorted_record, self.sorted_length, self.sorted_position,
         self.sorted_signature) = _merge_kernel(
            self.sorted_start, self.sorted_record, self.sorted_length, self.sorted_position, self.sorted_signature,
            self.element[:n], self.record[:n], self.length[:n], self.position[:n], self.signature[:n],
            max(len(self.sorted_start) - 1, len(self.head)))
        self.head[:] = -1
        self.size = 0

    def _reserve(self, corpus: TokenCorpus, ids: np.ndarray) -> None:
        if corpus.num_elements > len(self.head):
            head = np.full(max(corpus.num_elements, 2 * len(self.head)), -1, dtype=np.int64)
            head[: len(self.head)] = self.head
            self.head = head
        needed = self.size + int(corpus.lengths(ids).sum())  # a prefix is never longer than its record
        if needed > len(self.link):
            self.link, self.record, self.length, self.position, self.element, self.signature = (
                _grown(a, needed) for a in (self.link, self.record, self.length, self.position, self.element,
                                            self.signature))

    def add(self, corpus: TokenCorpus, ids: np.ndarray) -> None:
        """Index records without checking them (the pool given up front, a shard's new members)."""
        ids = np.array(ids, dtype=np.int64)  # a writable copy: numba compiles one variant per array flags
        self._reserve(corpus, ids)
        self.size = _index_kernel(corpus.offsets, corpus.elements, self.head, self.link, self.record,
                                  self.length, self.position, self.element, self.signature, self.size, ids,
                                  self.threshold)
        self.compact()

    def probe(self, corpus: TokenCorpus, query_ids: np.ndarray, add_kept: bool = True) -> np.ndarray:
        """Kept flags for ``query_ids`` in order (see :func:`_probe_kernel`)."""
        query_ids = np.array(query_ids, dtype=np.int64)  # writable, as above
        self._reserve(corpus, query_ids if add_kept else query_ids[:0])
        kept, self.size = _probe_kernel(
            corpus.offsets, corpus.tokens, corpus.elements, corpus.max_length, corpus.num_tokens,
            self.sorted_start, self.sorted_record, self.sorted_length, self.sorted_position, self.sorted_signature,
            self.head, self.link, self.record, self.length, self.position, self.element, self.signature, self.size,
            query_ids, self.threshold, add_kept, self.counters)
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

    def __init__(self, pool: Sequence[str] = (), threshold: float = 0.7, *, _corpus: TokenCorpus | None = None,
                 _pool_ids: np.ndarray | None = None):
        self.threshold = check_threshold(threshold)
        self.pool: list[str] = list(pool)
        self.corpus = _corpus if _corpus is not None else TokenCorpus()
        self._pool_ids = _pool_ids if _pool_ids is not None else self.corpus.add(self.pool)
        self.index = PrefixIndex(self.threshold)
        self.index.add(self.corpus, self._pool_ids)

    @classmethod
    def for_batch(cls, pool: Sequence[str], candidates: Sequence[str],
                  threshold: float = 0.7) -> tuple[NearDuplicateFilter, np.ndarray]:
        """A filter over ``pool`` whose corpus already holds ``candidates`` too, and their record ids for
        :meth:`filter_encoded`: encoding both at once orders elements by their frequency in all of them."""
        pool = list(pool)
        corpus = TokenCorpus()
        ids = corpus.add([*pool, *candidates])
        return cls(pool, threshold, _corpus=corpus, _pool_ids=ids[: len(pool)]), ids[len(pool):]

    def __len__(self) -> int:
        return len(self.pool)

    def filter(self, candidates: Sequence[str], progress: bool = False,
               block_size: int = DEFAULT_BLOCK_SIZE) -> list[bool]:
        """Kept flags (True = kept), one per candidate; kept candidates are appended to :attr:`pool`."""
        candidates = list(candidates)
        return self.filter_encoded(candidates, self.corpus.add(candidates), progress, block_size)

    def filter_encoded(self, candidates: Sequence[str], query_ids: np.ndarray, progress: bool = False,
                       block_size: int = DEFAULT_BLOCK_SIZE) -> list[bool]:
        """:meth:`filter` for candidates already in :attr:`corpus` as records ``query_ids``."""
        kept = np.ones(len(query_ids), dtype=bool)
        bar = _progress(len(query_ids), progress)
        for lo in range(0, len(query_ids), block_size):
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
    candidates = list(candidates)
    dedup_filter, candidate_ids = NearDuplicateFilter.for_batch(against, candidates, threshold)
    return dedup_filter.filter_encoded(candidates, candidate_ids, progress=progress)


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
