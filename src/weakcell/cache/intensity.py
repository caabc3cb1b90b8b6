"""Per-source intensity normalisation: a per-channel gain that maps one source's cell intensities onto the
competition's, measured on the cached crops and applied as they are read (``CellCache.joined``).

Why a gain, measured on crops, applied at read time:

- a gain, not a per-source mean/std standardisation: crops are masked, so most of each crop is the black
  background outside the cell; it is 0 in every source and must stay 0, and an affine map would move it.
  What differs between sources is multiplicative (exposure, a 16-bit range read as 8 bits, another
  camera), which a gain undoes;
- measured on the crops' cell pixels (a pixel is the cell's when any channel is non-zero), the pixels the
  model sees, not on whole images (whose background share depends on how crowded the field is);
- applied when crops are read, through a (4, 256) uint8 table per source: the cache keeps the source's
  own pixels (a changed gain re-cuts nothing), every consumer of crops (stage 1, embeddings, end-to-end
  MIL, refinement's inner models) sees the same normalised crops with no change to the model or the
  batches, and the competition's test images, the reference, are read as cached.
"""

from __future__ import annotations

import numpy as np

from weakcell.cache.store import CellCache

SAMPLE_CROPS = 4096  # crops per source the means are measured on (evenly spread over its training cells)
BATCH = 256  # crops read at once
GAIN_LIMITS = (1 / 16, 16.0)  # a measured gain outside this says the source is broken, not dim


def sample_rows(rows: np.ndarray, n: int = SAMPLE_CROPS) -> np.ndarray:
    """At most ``n`` of ``rows``, evenly spread (deterministic: the same cache gives the same gain)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) <= n:
        return rows
    return rows[np.linspace(0, len(rows) - 1, n).round().astype(np.int64)]


def cell_means(cache: CellCache, rows: np.ndarray) -> np.ndarray:
    """(4,) mean of each channel over the cell pixels of crops ``rows`` (pixels where any channel is
    non-zero: the masked background is 0 in all four); NaN for a channel with no cell pixel."""
    sums = np.zeros(4)
    count = 0
    for start in range(0, len(rows), BATCH):
        crops = cache.crops(rows[start : start + BATCH])  # (B, 4, S, S) uint8
        inside: np.ndarray = np.any(crops, axis=1)  # (B, S, S)
        count += int(inside.sum())
        sums += np.sum(crops, axis=(0, 2, 3), dtype=np.int64, where=inside[:, None])
    return sums / count if count else np.full(4, np.nan)


def measured_gain(reference: np.ndarray, source: np.ndarray) -> np.ndarray:
    """(4,) gain = reference mean / source mean per channel, within ``GAIN_LIMITS``; 1 where either mean
    is missing or 0 (nothing to measure on)."""
    usable = np.isfinite(reference) & np.isfinite(source) & (source > 0) & (reference > 0)
    gain = np.ones(4)
    gain[usable] = reference[usable] / source[usable]
    return np.clip(gain, *GAIN_LIMITS)


def gain_table(gain: np.ndarray | tuple[float, ...]) -> np.ndarray | None:
    """(4, 256) uint8 lookup table of each channel's gain (rounded, saturating at 255); None when every
    gain is 1 (read as cached)."""
    gain = np.asarray(gain, dtype=np.float64)
    if np.allclose(gain, 1.0):
        return None
    values = np.arange(256, dtype=np.float64)[None, :] * gain[:, None]
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
