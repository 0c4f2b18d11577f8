"""Streaming sums for one tensor pair: one pass of row blocks, float32 block products, float64 accumulation.

Everything the statistics need is a sum over rows, so a pass over sampled blocks gives the sample's statistics and
per-block sums give the jackknife. Nothing here keeps a whole tensor.
"""

from __future__ import annotations

import hashlib
import math
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
    """256-bit SimHash of a tensor's values, streaming, one pass over the values.

    Element (i, j) goes to bucket (j mod 256 + h_r[i]) mod 256 with sign s_g[j // 256]·s_r[i] (seeded hashes of the
    row index and of the column group); each bucket sums its signed values and the bit is the bucket's sign.
    Buckets sum disjoint sets of elements, so for two tensors with Pearson ρ each bit differs with probability
    arccos(ρ)/π: the Hamming distance tracks 256·arccos(ρ)/π and a bf16 re-export still matches.
    """

    def __init__(self, n_cols: int, seed: int = 0):
        self.n_cols = n_cols
        self.groups = -(-n_cols // SIMHASH_BITS)
        hg = _mix64(torch.arange(self.groups, dtype=torch.int64), seed + 1)
        self.group_sign = torch.where((hg >> 8) & 1 == 1, 1.0, -1.0).to(torch.float32)
        self.seed = seed
        self.acc = torch.zeros(SIMHASH_BITS, dtype=torch.float64)

    def update(self, rows: torch.Tensor, first_row: int) -> None:
        k = rows.shape[0]
        x = rows.float().cpu()
        pad = self.groups * SIMHASH_BITS - self.n_cols
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        buckets = torch.matmul(self.group_sign, x.view(k, self.groups, SIMHASH_BITS))  # (k, 256), one pass
        idx = torch.arange(first_row, first_row + k, dtype=torch.int64)
        hr = _mix64(idx, self.seed + 2)
        shift = (hr & (SIMHASH_BITS - 1)).unsqueeze(1)
        rsign = torch.where((hr >> 8) & 1 == 1, 1.0, -1.0).to(torch.float32).unsqueeze(1)
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
    # Scalar shifts subtracted before the float32 products when a tensor is dominated by its offset (norm
    # weights ≈ 1 ± 1e-4): centred statistics are invariant to them and raw ones are restored exactly (unshift).
    shift_a: float | None = None
    shift_b: float | None = None
    # Power-of-two scales applied to each tensor when its values are tiny or huge (denormals would vanish in
    # float32 products); exact, and undone in ``raw_totals``. Differences are taken before scaling.
    scale_a: float = 1.0
    scale_b: float = 1.0

    def __post_init__(self):
        self.totals = np.zeros(len(SCALARS))
        self.col_a = torch.zeros(self.n_cols, dtype=torch.float64, device=self.device)
        self.col_b = torch.zeros(self.n_cols, dtype=torch.float64, device=self.device)
        if self.sketch:
            gen = torch.Generator().manual_seed(self.seed + 1234)
            self._g = (torch.randn(self.n_cols, SKETCH_K, generator=gen) / SKETCH_K ** 0.5).to(self.device)
            self.sketch_acc = torch.zeros(self.n_cols, SKETCH_K, dtype=torch.float64, device=self.device)

    def update(self, a: torch.Tensor, b: torch.Tensor, *, _masked: bool = False) -> None:
        """a, b: float32 (k, n_cols) blocks, already mapped into the base's index space.

        All block scalars are reduced on the device and fetched with one synchronisation; blocks of ~1 MiB stay in
        cache across the dozen reductions.
        """
        a = a.to(self.device, torch.float32).contiguous()
        b = b.to(self.device, torch.float32).contiguous()
        k = a.shape[0]
        d = (a - b).reshape(-1)
        if self.cast_dtype is not None:
            self.cast_equal += int((a.reshape(-1).to(self.cast_dtype).float() == b.reshape(-1)).sum())
        if self.shift_a is None:
            self.scale_a, self.scale_b = _pow2_scale(a), _pow2_scale(b)
        if self.scale_a != 1.0:
            a = _times_pow2(a, self.scale_a)
        if self.scale_b != 1.0:
            b = _times_pow2(b, self.scale_b)
        if self.shift_a is None:
            self.shift_a, self.shift_b = _offset(a), _offset(b)
        if self.shift_a:
            a = a - self.shift_a
        if self.shift_b:
            b = b - self.shift_b
        af, bf = a.reshape(-1), b.reshape(-1)
        ra, rb = a.sum(1), b.sum(1)
        ca, cb = a.sum(0).double(), b.sum(0).double()  # float32 within a block, float64 across blocks
        lo, hi = torch.aminmax(d) if d.numel() else (torch.zeros(()), torch.zeros(()))
        vals = torch.stack([
            torch.dot(af, af), torch.dot(bf, bf), torch.dot(af, bf), ra.sum(), rb.sum(),
            torch.dot(ra, rb), torch.dot(ra, ra), torch.dot(rb, rb),
            torch.dot(d, d), (d.numel() - torch.count_nonzero(d)).float(), -lo, hi]).tolist()
        saa, sbb, sab, sa, sb, rab, raa, rbb, sdd, equal, neg_lo, hi_v = vals
        if not _masked and not all(map(math.isfinite, (saa, sbb, sab, sdd))):
            # rare: NaN/Inf values; count them and redo the block with them set to 0 (in stored units)
            ra_, rb_ = a + (self.shift_a or 0.0), b + (self.shift_b or 0.0)
            fin = torch.isfinite(ra_) & torch.isfinite(rb_)
            self.nonfinite += int(fin.numel() - fin.sum())
            self.update(torch.where(fin, _times_pow2(ra_, 1.0 / self.scale_a), 0.0),
                        torch.where(fin, _times_pow2(rb_, 1.0 / self.scale_b), 0.0), _masked=True)
            return
        s = np.array([k, sa, sb, saa, sbb, sab, rab, raa, rbb])
        self.totals += s
        self.col_a += ca
        self.col_b += cb
        self.sdd += sdd
        self.equal += int(equal)
        self.max_abs_diff = max(self.max_abs_diff, neg_lo, hi_v)
        if self.keep_blocks:
            self.blocks.append(BlockSums(s, ca.cpu().numpy(), cb.cpu().numpy()))
        if self.sketch:
            ar = a - (ra / self.n_cols).unsqueeze(1)
            br = b - (rb / self.n_cols).unsqueeze(1)
            self.sketch_acc += (ar.T @ (br @ self._g)).double()


    def raw_totals(self) -> np.ndarray:
        """The scalar sums of the values as stored (shift and scale undone)."""
        t = unshift(self.totals, self.n_cols, self.shift_a, self.shift_b)
        if self.scale_a == 1.0 and self.scale_b == 1.0:
            return t
        t = t.copy()
        sa, sb = self.scale_a, self.scale_b
        for name, div in (("Sa", sa), ("Sb", sb), ("Saa", sa * sa), ("Sbb", sb * sb), ("Sab", sa * sb),
                          ("Rab", sa * sb), ("Raa", sa * sa), ("Rbb", sb * sb)):
            t[SCALARS.index(name)] /= div
        return t

    @property
    def raw_sdd(self) -> float:
        return self.sdd

    @property
    def raw_max_abs_diff(self) -> float:
        return self.max_abs_diff


def _times_pow2(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x · factor for a power-of-two factor, exactly, even when the factor itself overflows float32."""
    if factor == 1.0:
        return x
    return torch.ldexp(x, torch.tensor(math.frexp(factor)[1] - 1, dtype=torch.int32))


def _pow2_scale(x: torch.Tensor) -> float:
    """2^k bringing the first block's largest magnitude near 1 when it is below 1e-15 or above 1e15, else 1."""
    peak = float(x.abs().max()) if x.numel() else 0.0
    if not math.isfinite(peak) or peak == 0.0 or 1e-15 <= peak <= 1e15:
        return 1.0
    return 2.0 ** (-math.frexp(peak)[1])


def _offset(x: torch.Tensor) -> float:
    """The block's mean when it dominates the spread (|mean| > std), else 0 (no shift, no extra pass)."""
    x = x.reshape(-1)[:4096]  # a probe of the first values is enough to see an offset
    if x.numel() < 2:
        return 0.0
    std, mean = torch.std_mean(x)
    mean, std = float(mean), float(std)
    return mean if math.isfinite(mean) and abs(mean) > std else 0.0


def unshift(t: np.ndarray, n_cols: int, mu_a: float | None, mu_b: float | None) -> np.ndarray:
    """Raw (unshifted) Sa, Sb, Saa, Sbb, Sab from sums of shifted values; other entries unchanged."""
    mu_a, mu_b = mu_a or 0.0, mu_b or 0.0
    if not (mu_a or mu_b):
        return t
    i = {name: j for j, name in enumerate(SCALARS)}
    out = t.copy()
    n = t[i["rows"]] * n_cols
    sa, sb = t[i["Sa"]], t[i["Sb"]]
    out[i["Sa"]] = sa + n * mu_a
    out[i["Sb"]] = sb + n * mu_b
    out[i["Saa"]] = t[i["Saa"]] + 2 * mu_a * sa + n * mu_a * mu_a
    out[i["Sbb"]] = t[i["Sbb"]] + 2 * mu_b * sb + n * mu_b * mu_b
    out[i["Sab"]] = t[i["Sab"]] + mu_b * sa + mu_a * sb + n * mu_a * mu_b
    return out


class ByteHasher:
    """SHA-256 of a tensor's stored bytes, fed block by block in file order."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, raw: torch.Tensor) -> None:
        flat = raw.contiguous().reshape(-1)
        self._h.update(memoryview(flat.view(torch.uint8).numpy() if flat.dtype != torch.uint8 else flat.numpy()))

    def hexdigest(self) -> str:
        return self._h.hexdigest()
