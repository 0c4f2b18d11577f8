"""Which rows to read: contiguous row blocks, stratified over the row index (DESIGN §Statistics 5).

The unit is a block of at least 64 rows and at least 256 KiB. A tensor with fewer than 30 blocks is read fully.
Otherwise ``fraction`` of its blocks is drawn: the block range is cut into equal strata and two distinct blocks are
drawn uniformly inside each stratum, so that the variance can be estimated within strata (stratified jackknife).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_BLOCK_ROWS = 64
MIN_BLOCK_BYTES = 256 * 1024
MIN_BLOCKS_TO_SAMPLE = 30
PER_STRATUM = 2
FULL_READ_CHUNK = 1024 * 1024  # full reads: big enough to amortise calls, small enough to stay in cache


def block_rows(row_bytes: int) -> int:
    """Rows per block for rows of ``row_bytes`` bytes."""
    return max(MIN_BLOCK_ROWS, math.ceil(MIN_BLOCK_BYTES / max(1, row_bytes)))


@dataclass(frozen=True)
class RowSample:
    """Blocks (start, stop) in the compared row list, the stratum of each, and stratum sizes in blocks."""

    blocks: tuple[tuple[int, int], ...]
    strata: tuple[int, ...]
    stratum_sizes: tuple[int, ...]
    n_rows: int
    full: bool

    @property
    def rows_read(self) -> int:
        return sum(b - a for a, b in self.blocks)

    @property
    def fraction(self) -> float:
        return self.rows_read / self.n_rows if self.n_rows else 1.0


def draw(n_rows: int, row_bytes: int, fraction: float | None, rng: np.random.Generator) -> RowSample:
    """Choose the row blocks to read. ``fraction`` None or >= 1 reads everything."""
    if n_rows <= 0:
        return RowSample((), (), (), 0, True)
    br = block_rows(row_bytes)
    n_blocks = math.ceil(n_rows / br)
    edges = [(i * br, min(n_rows, (i + 1) * br)) for i in range(n_blocks)]
    if fraction is None or fraction >= 1.0 or n_blocks < MIN_BLOCKS_TO_SAMPLE:
        cr = max(br, FULL_READ_CHUNK // max(1, row_bytes))
        chunks = tuple((a, min(n_rows, a + cr)) for a in range(0, n_rows, cr))
        return RowSample(chunks, (0,) * len(chunks), (len(chunks),), n_rows, True)
    chosen, strata, sizes = stratified(n_blocks, fraction, rng)
    return RowSample(tuple(edges[b] for b in chosen), strata, sizes, n_rows, False)


def stratified(n_units: int, fraction: float, rng: np.random.Generator
               ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """About ``fraction`` of units 0..n_units-1 (at least two strata of PER_STRATUM): the unit range cut into equal
    strata, PER_STRATUM distinct units drawn uniformly in each. (chosen units ascending, stratum of each, sizes)."""
    k = max(2 * PER_STRATUM, round(fraction * n_units))
    n_strata = max(2, k // PER_STRATUM)
    bounds = np.linspace(0, n_units, n_strata + 1).round().astype(int)
    chosen, strata, sizes = [], [], []
    for h in range(n_strata):
        lo, hi = int(bounds[h]), int(bounds[h + 1])
        sizes.append(hi - lo)
        take = min(PER_STRATUM, hi - lo)
        for b in sorted(rng.choice(np.arange(lo, hi), size=take, replace=False).tolist()):
            chosen.append(b)
            strata.append(h)
    return tuple(chosen), tuple(strata), tuple(sizes)
