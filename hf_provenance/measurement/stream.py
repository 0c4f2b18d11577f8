"""Stream the pairs of an AlignmentPlan through the accumulators, one row block at a time.

Never holds a whole tensor of a large model: each block of base rows is read with the matching candidate rows
(through the plan's row map), mapped into the base's column order, and folded into float64 sums. The next block is
read on a background thread while the current one is computed (preadv and torch both release the GIL).
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_provenance.alignment.plan import ARBITRARY, AlignmentPlan, PairSpec
from hf_provenance.measurement.accumulate import ByteHasher, PairAccumulator, SimHasher, row_hashes
from hf_provenance.measurement.sampling import RowSample, block_rows, draw
from hf_provenance.sources.base import DTYPES

# torch dtypes a higher-precision base can be re-rounded to, to detect an exact cast
_CAST_TARGETS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_PRECISION = {"F64": 64, "F32": 32, "BF16": 16, "F16": 16, "F8_E4M3": 8, "F8_E5M2": 8}


@dataclass
class TensorMeasurement:
    """Raw sums of one compared pair; ``statistics.tensor`` turns them into effects."""

    pair: PairSpec
    sample: RowSample
    acc: PairAccumulator
    dtype_a: str
    dtype_b: str
    vec_a: np.ndarray | None = None   # 1-D pairs keep both vectors (small) for the permutation test
    vec_b: np.ndarray | None = None
    sha_a: str | None = None
    sha_b: str | None = None
    simhash_a: str | None = None
    simhash_b: str | None = None
    rowhash_jaccard: float | None = None
    bytes_differ: bool = False
    notes: list[str] = field(default_factory=list)


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs of ascending indices: (position in idx, start row, stop row)."""
    out, i, n = [], 0, len(idx)
    while i < n:
        j = i
        while j + 1 < n and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append((i, int(idx[i]), int(idx[j]) + 1))
        i = j + 1
    return out


def read_indexed(reader, name: str, idx: np.ndarray | None, start: int, stop: int, *, raw: bool,
                 copy: bool = True) -> torch.Tensor:
    """Rows idx[start:stop] (or rows start..stop when idx is None), coalescing contiguous runs into single reads.

    ``copy=False`` (raw contiguous reads only) may return a view of the reader's buffer, valid until its next read.
    """
    fetch = reader.read_raw if raw else reader.read_rows
    if idx is None:
        if raw and not copy:
            return reader.read_raw(name, start, stop, copy=False)
        return fetch(name, start, stop)
    sel = np.asarray(idx[start:stop])
    uniq, inverse = np.unique(sel, return_inverse=True)
    parts = [fetch(name, a, b) for _, a, b in _runs(uniq)]
    rows = torch.cat(parts) if len(parts) > 1 else parts[0]
    if len(uniq) == len(sel) and np.array_equal(uniq, sel):
        return rows
    return rows[torch.from_numpy(inverse.reshape(-1))]


def _cast_target(dtype_a: str, dtype_b: str) -> torch.dtype | None:
    if dtype_b in _CAST_TARGETS and _PRECISION.get(dtype_a, 0) > _PRECISION.get(dtype_b, 0):
        return _CAST_TARGETS[dtype_b]
    return None


def measure_pair(pair: PairSpec, base, cand, *, fraction: float | None, rng: np.random.Generator,
                 device: torch.device, seed: int) -> TensorMeasurement:
    """Measure one pair. ``base``/``cand`` are ModelSources."""
    ia, ib = base.inventory[pair.base_name], cand.inventory[pair.cand_name]
    n_cols = pair.n_cols
    sample = draw(pair.n_rows, n_cols * ia.itemsize, fraction, rng)
    scaled_a = _has_scale(base, pair.base_name)
    scaled_b = _has_scale(cand, pair.cand_name)
    in_order = pair.base_rows is None and pair.cand_rows is None
    full_in_order = sample.full and in_order
    acc = PairAccumulator(
        n_cols=n_cols, keep_blocks=not sample.full,
        sketch=(not pair.is_vector and pair.n_arbitrary == 1 and pair.axes[-1] == ARBITRARY),
        device=device, seed=seed, cast_dtype=_cast_target(ia.dtype, ib.dtype) if not scaled_b else None)
    m = TensorMeasurement(pair, sample, acc, ia.dtype, ib.dtype)
    hash_a = ByteHasher() if full_in_order and not scaled_a else None
    hash_b = ByteHasher() if full_in_order and not scaled_b else None
    sim_a = SimHasher(n_cols, seed) if full_in_order and ia.is_float else None
    sim_b = SimHasher(n_cols, seed) if full_in_order and ib.is_float else None
    # exact row hashes only where vocabulary rows were re-paired (extension, pruning, another tokenizer)
    want_rowhash = sample.full and pair.axes[0] == "vocab" and not pair.is_vector and pair.base_rows is not None
    rh_a, rh_b, vec_a, vec_b = [], [], [], []

    sides = ((base, pair.base_name, pair.base_rows, scaled_a, ia, hash_a, sim_a),
             (cand, pair.cand_name, pair.cand_rows, scaled_b, ib, hash_b, sim_b))

    # SHA-256 only answers "same stored bytes?": once a block differs (or the dtypes do) it stops hashing
    bytes_differ = [ia.dtype != ib.dtype]

    def load(side, block):
        """Read one block of one side (each side on its own thread); hashes that need file order are fed here."""
        src, name, idx, scaled, info, sha, sim = side
        s, e = block
        if scaled:
            x = read_indexed(src.reader, name, idx, s, e, raw=False)
        else:
            raw = read_indexed(src.reader, name, idx, s, e, raw=True, copy=False)
            if sha is not None and not bytes_differ[0]:
                sha.update(raw)
            # the raw rows are a view of the reader's buffer, which the next read overwrites: always copy
            x = raw.to(torch.float32, copy=True)
        x = x.reshape(-1, info.row_len)
        if sim is not None:
            sim.update(x, s)
        return x

    for side in sides:  # remote sources fetch the sampled blocks ahead, coalesced, several in flight
        prefetch = getattr(side[0], "prefetch", None)
        if prefetch is not None and sample.blocks:
            idx = side[2]
            prefetch([(side[1], int(a), int(b)) for a, b in sample.blocks] if idx is None else
                     [(side[1], int(r), int(r) + 1) for a, b in sample.blocks for r in np.asarray(idx)[a:b]])

    with ThreadPoolExecutor(max_workers=2) as pool:
        def submit(block):
            return pool.submit(load, sides[0], block), pool.submit(load, sides[1], block)

        pending = submit(sample.blocks[0]) if sample.blocks else None
        for i, block in enumerate(sample.blocks):
            a, b = pending[0].result(), pending[1].result()
            if i + 1 < len(sample.blocks):
                pending = submit(sample.blocks[i + 1])
            if pair.col_map is not None:
                b = b[:, torch.from_numpy(np.asarray(pair.col_map))]
            if pair.col_sign is not None:
                b = b * torch.from_numpy(np.asarray(pair.col_sign, dtype=np.float32))
            if pair.row_sign is not None:
                b = b * torch.from_numpy(np.asarray(pair.row_sign[block[0]:block[1]], dtype=np.float32)).unsqueeze(1)
            if want_rowhash:
                rh_a.append(row_hashes(a, seed))
                rh_b.append(row_hashes(b, seed))
            if pair.is_vector:
                vec_a.append(a.reshape(-1).numpy().astype(np.float64))
                vec_b.append(b.reshape(-1).numpy().astype(np.float64))
            equal_before = acc.equal
            acc.update(a, b)
            if acc.equal - equal_before != a.numel():
                bytes_differ[0] = True
    if hash_a is not None and hash_b is not None:
        if bytes_differ[0]:
            m.sha_a = m.sha_b = None
            m.bytes_differ = True
        else:
            m.sha_a, m.sha_b = hash_a.hexdigest(), hash_b.hexdigest()
    if sim_a is not None and sim_b is not None:
        m.simhash_a, m.simhash_b = sim_a.digest(), sim_b.digest()
    if want_rowhash and rh_a:
        ha, hb = set(np.concatenate(rh_a).tolist()), set(np.concatenate(rh_b).tolist())
        m.rowhash_jaccard = len(ha & hb) / max(1, len(ha | hb))
    if pair.is_vector:
        m.vec_a, m.vec_b = np.concatenate(vec_a), np.concatenate(vec_b)
    return m


def _has_scale(src, name: str) -> bool:
    fn = getattr(src.reader, "scale_companion", None)
    return bool(fn and fn(name))


def measure_plan(plan: AlignmentPlan, base, cand, *, fraction: float | None, seed: int,
                 device: str | torch.device = "cpu", progress=None) -> list[TensorMeasurement]:
    """Measure every pair of the plan in base file order (so reads are mostly sequential)."""
    dev = torch.device(device)
    inv = base.inventory
    order = sorted(plan.pairs, key=lambda p: (inv[p.base_name].file, inv[p.base_name].start))
    out = []
    for p in order:
        out.append(measure_pair(p, base, cand, fraction=fraction, rng=np.random.default_rng([seed, zlib.crc32(p.base_name.encode())]),
                                device=dev, seed=seed))
        if progress is not None:
            progress(p, sum(b - a for a, b in out[-1].sample.blocks) * inv[p.base_name].row_bytes)
    return out


__all__ = ["TensorMeasurement", "measure_pair", "measure_plan", "read_indexed", "block_rows", "DTYPES"]
