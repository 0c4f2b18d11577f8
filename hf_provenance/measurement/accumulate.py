"""Streaming sums for one tensor pair: one pass of row blocks, float32 block products, float64 accumulation.

Everything the statistics need is a sum over rows, so a pass over sampled blocks gives the sample's statistics and
per-block sums give the jackknife. Nothing here keeps a whole tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

SIMHASH_BITS = 256
SKETCH_K = 64  # Gaussian sketch width for the one-arbitrary-axis variance (relative sd of Var ≈ sqrt(2/k))

# Scalars accumulated per block, in this order (the jackknife recomputes statistics from them).
SCALARS = ("rows", "Sa", "Sb", "Saa", "Sbb", "Sab", "Rab", "Raa", "Rbb")


@dataclass
class BlockSums:
    """Sums over one block of rows: the SCALARS plus the block's column sums."""

    scalars: np.ndarray      # float64, len(SCALARS)
    col_a: np.ndarray        # float64 (n,)
    col_b: np.ndarray


def _mix64(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A cheap 64-bit integer mix (splitmix-style) on int64 tensors; wraps on overflow."""
    x = x + (seed * 0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF)
    x = (x ^ (x >> 31)) * 0x5851F42D4C957F2D
    x = (x ^ (x >> 29)) * 0x14057B7EF767814F
    return x ^ (x >> 32)


class SimHasher:
    """256-bit SimHash of a tensor's values, streaming and O(numel).

    Element (i, j) goes to bucket (h_c[j] + h_r[i]) mod 256 with sign s_c[j]·s_r[i] (seeded hashes of the row and
    column index); each bucket sums signed values and the bit is the bucket's sign. Two tensors with Pearson ρ
    disagree on about 256·arccos(ρ)/π bits, so a bf16 re-export of a tensor still matches.
    """

    def __init__(self, n_cols: int, seed: int = 0):
        cols = torch.arange(n_cols, dtype=torch.int64)
        hc = _mix64(cols, seed + 1)
        self.col_bucket = (hc & (SIMHASH_BITS - 1)).to(torch.int64)
        self.col_sign = torch.where((hc >> 8) & 1 == 1, 1.0, -1.0).to(torch.float32)
        self.seed = seed
        self.acc = torch.zeros(SIMHASH_BITS, dtype=torch.float64)

    def update(self, rows: torch.Tensor, first_row: int) -> None:
        k = rows.shape[0]
        idx = torch.arange(first_row, first_row + k, dtype=torch.int64)
        hr = _mix64(idx, self.seed + 2)
        shift = (hr & (SIMHASH_BITS - 1)).unsqueeze(1)
        rsign = torch.where((hr >> 8) & 1 == 1, 1.0, -1.0).to(torch.float32).unsqueeze(1)
        buckets = torch.zeros(k, SIMHASH_BITS, dtype=torch.float32)
        buckets.index_add_(1, self.col_bucket, rows.float().cpu() * self.col_sign)
        gather = (torch.arange(SIMHASH_BITS).unsqueeze(0) - shift) % SIMHASH_BITS
        rolled = torch.gather(buckets, 1, gather) * rsign
        self.acc += rolled.sum(0, dtype=torch.float64)

    def digest(self) -> str:
        bits = (self.acc > 0).numpy().astype(np.uint8)
        return np.packbits(bits).tobytes().hex()


def simhash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex SimHash digests."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def row_hashes(rows: torch.Tensor, seed: int = 0) -> np.ndarray:
    """Exact 64-bit hashes of rows after casting to float32 (so a bf16 row equals its float32 widening)."""
    bits = rows.float().cpu().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    n = bits.shape[1]
    w = _mix64(torch.arange(n, dtype=torch.int64), seed + 7) | 1
    h = (bits * w).sum(1)
    return _mix64(h, seed + 11).numpy().astype(np.int64)


@dataclass
class PairAccumulator:
    """Accumulates the streamed sums for one pair of tensors of compared shape (rows, n_cols)."""

    n_cols: int
    keep_blocks: bool               # keep per-block sums (sampled runs: jackknife)
    sketch: bool                    # one arbitrary axis: accumulate Arᵀ(Br G) for the Hoeffding variance
    device: torch.device = torch.device("cpu")
    seed: int = 0
    cast_dtype: torch.dtype | None = None  # re-round base to this dtype and count equal elements (cast detection)
    totals: np.ndarray = field(init=False)
    col_a: torch.Tensor = field(init=False)
    col_b: torch.Tensor = field(init=False)
    blocks: list = field(default_factory=list)
    sdd: float = 0.0
    max_abs_diff: float = 0.0
    equal: int = 0
    cast_equal: int = 0
    nonfinite: int = 0
    sketch_acc: torch.Tensor | None = None
    _g: torch.Tensor | None = None

    def __post_init__(self):
        self.totals = np.zeros(len(SCALARS))
        self.col_a = torch.zeros(self.n_cols, dtype=torch.float64, device=self.device)
        self.col_b = torch.zeros(self.n_cols, dtype=torch.float64, device=self.device)
        if self.sketch:
            gen = torch.Generator().manual_seed(self.seed + 1234)
            self._g = (torch.randn(self.n_cols, SKETCH_K, generator=gen) / SKETCH_K ** 0.5).to(self.device)
            self.sketch_acc = torch.zeros(self.n_cols, SKETCH_K, dtype=torch.float64, device=self.device)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a, b: float32 (k, n_cols) blocks, already mapped into the base's index space."""
        a = a.to(self.device, torch.float32)
        b = b.to(self.device, torch.float32)
        fin = torch.isfinite(a) & torch.isfinite(b)
        bad = int(fin.numel() - fin.sum())
        if bad:
            self.nonfinite += bad
            a = torch.where(fin, a, 0.0)
            b = torch.where(fin, b, 0.0)
        k = a.shape[0]
        af, bf = a.reshape(-1), b.reshape(-1)
        ra, rb = a.sum(1, dtype=torch.float64), b.sum(1, dtype=torch.float64)
        ca, cb = a.sum(0, dtype=torch.float64), b.sum(0, dtype=torch.float64)
        s = np.array([
            k, float(ra.sum()), float(rb.sum()),
            float(torch.dot(af, af)), float(torch.dot(bf, bf)), float(torch.dot(af, bf)),
            float(torch.dot(ra, rb)), float(torch.dot(ra, ra)), float(torch.dot(rb, rb)),
        ])
        self.totals += s
        self.col_a += ca
        self.col_b += cb
        if self.keep_blocks:
            self.blocks.append(BlockSums(s, ca.cpu().numpy(), cb.cpu().numpy()))
        d = af - bf
        self.sdd += float(torch.dot(d, d))
        if d.numel():
            self.max_abs_diff = max(self.max_abs_diff, float(d.abs().max()))
        self.equal += int((d == 0).sum())
        if self.cast_dtype is not None:
            self.cast_equal += int((af.to(self.cast_dtype).float() == bf).sum())
        if self.sketch:
            ar = a - (ra / self.n_cols).float().unsqueeze(1)
            br = b - (rb / self.n_cols).float().unsqueeze(1)
            self.sketch_acc += (ar.T @ (br @ self._g)).double()


class ByteHasher:
    """SHA-256 of a tensor's stored bytes, fed block by block in file order."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, raw: torch.Tensor) -> None:
        self._h.update(raw.contiguous().view(torch.uint8).numpy().tobytes() if raw.dtype != torch.uint8
                       else raw.contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()
