"""Pairs of hashes within a Hamming distance, without comparing all pairs: multi-index hashing.

Split each 256-bit image hash into ``m`` chunks of 16 bits. Two hashes within distance ``D`` have at least
one chunk within distance ``D // m`` (pigeonhole), so it suffices to join, chunk by chunk, every hash with
the hashes whose chunk differs from its own in at most ``D // m`` bits (sorted keys + ``searchsorted``),
then check each candidate's full distance. The search is exact: no pair within ``D`` is missed. With
random hashes a chunk matches by chance with probability ``sum_k<=r C(16, k) / 2**16`` (r = 1: 2.6e-4),
so the candidates grow as ``n**2 * m * that``, a few hundred times fewer than all pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

CHUNK_BITS = 16
# Candidate pairs expanded at once (bounds memory: 16 bytes each, plus their hashes).
_BLOCK = 2_000_000


def distances(hashes: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Hamming distances between rows ``first`` and ``second`` of ``(N, W)`` uint64 ``hashes``."""
    return np.bitwise_count(hashes[first] ^ hashes[second]).sum(axis=1, dtype=np.int64)


def _flip_masks(radius: int) -> np.ndarray:
    """Every 16-bit mask with at most ``radius`` bits set."""
    masks = [0]
    for k in range(1, radius + 1):
        masks.extend(sum(1 << b for b in bits) for bits in combinations(range(CHUNK_BITS), k))
    return np.array(masks, dtype=np.int64)


def _row_blocks(counts: np.ndarray) -> Iterator[slice]:
    """Consecutive row ranges whose candidate counts add up to about ``_BLOCK`` (at least one row)."""
    ends = np.cumsum(counts)
    start = 0
    while start < len(counts):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _BLOCK, side="right")))
        yield slice(start, stop)
        start = stop


def find_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of rows of ``(N, W)`` uint64 ``hashes`` within ``max_distance`` bits.

    Returns ``(i, j, distance)`` arrays sorted by ``(i, j)``."""
    n, words = hashes.shape
    chunks = words * 64 // CHUNK_BITS
    masks = _flip_masks(max_distance // chunks)
    rows = np.arange(n)
    found: list[np.ndarray] = []
    for chunk in range(chunks):
        word, shift = divmod(chunk * CHUNK_BITS, 64)
        keys = ((hashes[:, word] >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        for mask in masks:
            probe = keys ^ mask
            low = np.searchsorted(sorted_keys, probe, side="left")
            counts = np.searchsorted(sorted_keys, probe, side="right") - low
            for block in _row_blocks(counts):
                block_counts = counts[block]
                total = int(block_counts.sum())
                if total == 0:
                    continue
                first = np.repeat(rows[block], block_counts)
                offsets = np.arange(total) - np.repeat(np.cumsum(block_counts) - block_counts, block_counts)
                second = order[np.repeat(low[block], block_counts) + offsets]
                keep = first < second  # each unordered pair once (a flip mask finds it from both ends)
                first, second = first[keep], second[keep]
                close = distances(hashes, first, second) <= max_distance
                found.append(first[close] * n + second[close])
    pairs = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    first, second = pairs // n, pairs % n
    return first, second, distances(hashes, first, second)


def clusters(n: int, first: np.ndarray, second: np.ndarray) -> list[np.ndarray]:
    """Connected components (two or more rows) of the graph whose edges are the pairs."""
    graph = coo_matrix((np.ones(len(first), dtype=np.int8), (first, second)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    members = np.argsort(component, kind="stable")
    groups = np.split(members, np.cumsum(sizes)[:-1])
    return [group for group in groups if len(group) > 1]
