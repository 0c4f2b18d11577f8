"""Stream the pairs of an AlignmentPlan through the accumulators, one row block at a time.

Never holds a whole tensor of a large model: each block of base rows is read with the matching candidate rows
(through the plan's row map), mapped into the base's column order, and folded into float64 sums. The next block is
read on a background thread while the current one is computed (preadv and torch both release the GIL).
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_provenance.alignment.plan import ARBITRARY, AlignmentPlan, PairSpec
from hf_provenance.measurement.accumulate import ByteHasher, PairAccumulator, SideSums, SimHasher, row_hashes
from hf_provenance.measurement.memory import release_free_memory
from hf_provenance.measurement.sampling import FULL_READ_CHUNK, RowSample, block_rows, draw
from hf_provenance.measurement.transposed import TransposedRows
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
                 device: torch.device, seed: int, buffers: "BlockBuffers | None" = None) -> TensorMeasurement:
    """Measure one pair. ``base``/``cand`` are ModelSources."""
    ia, ib = base.inventory[pair.base_name], cand.inventory[pair.cand_name]
    n_cols = pair.n_cols
    sample = draw(pair.n_rows, n_cols * ia.itemsize, fraction, rng)
    scaled_a = _has_scale(base, pair.base_name)
    scaled_b = _has_scale(cand, pair.cand_name)
    trans = pair.transposed
    in_order = pair.base_rows is None and pair.cand_rows is None and pair.base_cols is None and not any(trans)
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

    # a side stored [.., in, out] serves rows of its transposed view from a bounded column window
    tviews = tuple(TransposedRows(src.reader, info) if t and not pair.is_vector else None
                   for src, info, t in ((base, ia, trans[0]), (cand, ib, trans[1])))
    sides = ((base, pair.base_name, pair.base_rows, scaled_a, ia, hash_a, sim_a, tviews[0]),
             (cand, pair.cand_name, pair.cand_rows, scaled_b, ib, hash_b, sim_b, tviews[1]))

    # SHA-256 only answers "same stored bytes?": once a block differs (or the dtypes do) it stops hashing
    bytes_differ = [ia.dtype != ib.dtype]

    # a side's own sums are taken on its loader thread unless the main thread still remaps its blocks
    own_sums = (pair.base_cols is None,
                pair.col_map is None and pair.col_sign is None and pair.col_scale is None and pair.row_sign is None)

    def load(side, group):
        xs = [read_block(side, block) for block in group]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        which, sim, first = ("a" if side is sides[0] else "b"), side[6], group[0][0]
        if not own_sums[which == "b"]:
            if sim is not None:
                sim.update(x, first)
            return x
        # a SimHash over one group's rows rides on the column sums' pass when it can (groups are consecutive rows)
        fuse = sim is not None and sim.groups == 1 and len(group) == 1
        sums = acc.side(x, which, len(group), project=sim.signs(first, x.shape[0]) if fuse else None)
        if sim is not None:
            if sums.projection is not None:
                sim.add(sums.projection)
            else:
                sim.update(x, first)
        return sums

    def read_block(side, block):
        """Read one block of one side (each side on its own thread); hashes that need file order are fed here."""
        src, name, idx, scaled, info, sha, _, tview = side
        s, e = block
        if tview is not None:
            return tview.rows(idx, s, e)
        if pair.is_vector and idx is not None:  # a piece of a fused bias: its elements
            return src.reader.read_rows(name, 0, 1).reshape(1, -1)[:, torch.from_numpy(np.asarray(idx))]
        if scaled:
            x = read_indexed(src.reader, name, idx, s, e, raw=False)
        else:
            raw = read_indexed(src.reader, name, idx, s, e, raw=True, copy=False)
            if sha is not None and not bytes_differ[0]:
                sha.update(raw)
            # the raw rows are a view of the reader's buffer, which the next read overwrites: always copy
            ring = rings[0 if side is sides[0] else 1]
            x = ring.take(raw.shape).copy_(raw) if ring is not None else raw.to(torch.float32, copy=True)
        return x.reshape(-1, info.row_len)

    for side in sides:  # blocks ahead: remote sources fetch them coalesced, local ones hint the kernel
        src, idx, tview = side[0], side[2], side[7]
        prefetch = getattr(src, "prefetch", None)
        if (prefetch is None or not sample.blocks or tview is not None or (pair.is_vector and idx is not None)
                or (sample.full and not getattr(src, "prefetch_full_reads", True))):
            continue
        prefetch([(side[1], int(a), int(b)) for a, b in sample.blocks] if idx is None else
                 [(side[1], int(r), int(r) + 1) for a, b in sample.blocks for r in np.asarray(idx)[a:b]])

    # big blocks (full reads) are loaded on two threads, overlapping reads and per-side sums with the cross terms;
    # small sampled blocks cost less inline than the hand-offs (their reads were hinted ahead above)
    threaded = bool(sample.blocks) and sample.rows_read * max(ia.row_bytes, 1) >= len(sample.blocks) * FULL_READ_CHUNK
    # inline, equal sampled blocks are measured several at a time (one call, the jackknife still sees each block)
    groups = [[blk] for blk in sample.blocks] if threaded else _batches(sample.blocks, ia.row_bytes)
    rings: tuple = (None, None)
    if threaded and device.type == "cpu":  # reused block buffers: no allocation churn on the loader threads
        most = max(e - s for s, e in sample.blocks)
        buffers = buffers if buffers is not None else BlockBuffers()
        rings = (buffers.ring(0, most * ia.row_len), buffers.ring(1, most * ib.row_len))
        acc.buffers = buffers
    with (ThreadPoolExecutor(max_workers=2) if threaded else _Inline()) as pool, _intra_op_threads(1 if threaded else None):
        def submit(group):
            return pool.submit(load, sides[0], group), pool.submit(load, sides[1], group)

        pending = submit(groups[0]) if groups else None
        for i, group in enumerate(groups):
            a, b = pending[0].result(), pending[1].result()
            if i + 1 < len(groups):
                pending = submit(groups[i + 1])
            if pair.base_cols is not None:
                a = a[:, torch.from_numpy(np.asarray(pair.base_cols, dtype=np.int64))]
            if pair.col_map is not None:
                b = b[:, torch.from_numpy(np.asarray(pair.col_map))]
            if pair.col_sign is not None:
                b = b * torch.from_numpy(np.asarray(pair.col_sign, dtype=np.float32))
            if pair.col_scale is not None:
                b = b * torch.from_numpy(np.asarray(pair.col_scale, dtype=np.float32))
            if pair.row_sign is not None:
                signs = np.concatenate([np.asarray(pair.row_sign[s:e], dtype=np.float32) for s, e in group])
                b = b * torch.from_numpy(signs).unsqueeze(1)
            raw_a, raw_b = (x.raw if isinstance(x, SideSums) else x for x in (a, b))
            if want_rowhash:
                rh_a.append(row_hashes(raw_a, seed))
                rh_b.append(row_hashes(raw_b, seed))
            if pair.is_vector:
                vec_a.append(raw_a.reshape(-1).cpu().numpy().astype(np.float64))
                vec_b.append(raw_b.reshape(-1).cpu().numpy().astype(np.float64))
            equal_before = acc.equal
            acc.update(a, b, blocks=len(group))
            if acc.equal - equal_before != raw_a.numel():
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
    acc.buffers = None  # the shared buffers are lent for the loop only
    return m


@contextmanager
def _intra_op_threads(n: int | None):
    """torch's intra-op threads set to ``n`` for a block loop (restored after): with two loader threads and the
    main thread already busy, one torch thread each avoids oversubscribing the cores."""
    if n is None or torch.get_num_threads() == n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


BATCH_BYTES = 8 * 1024 * 1024  # stored bytes per side measured in one call on the inline path


def _batches(blocks, row_bytes: int) -> list[list[tuple[int, int]]]:
    """Consecutive blocks of equal length, up to BATCH_BYTES per group (a group's rows view as (B, k, n))."""
    out: list[list[tuple[int, int]]] = []
    for blk in blocks:
        k = blk[1] - blk[0]
        last = out[-1] if out else None
        if (last and last[0][1] - last[0][0] == k
                and (len(last) + 1) * k * max(row_bytes, 1) <= BATCH_BYTES):
            last.append(blk)
        else:
            out.append([blk])
    return out


class BlockBuffers:
    """Float32 block buffers reused across the tensors of a plan: a ring per side for the loader threads and one
    for the main thread's differences. They grow to the largest block and are never freed in between, so the
    stream allocates nothing per block or per tensor (allocation churn fragmented glibc's heaps: +19 MiB of
    resident memory per 3B-model tensor)."""

    def __init__(self):
        self._rings: dict[int, _Ring] = {}
        self._diff = torch.empty(0)

    def ring(self, side: int, numel: int) -> "_Ring":
        r = self._rings.get(side)
        if r is None or r.capacity < numel:
            r = self._rings[side] = _Ring(numel)
        return r

    def diff(self, like: torch.Tensor) -> torch.Tensor | None:
        if like.device.type != "cpu":
            return None
        if self._diff.numel() < like.numel():
            self._diff = torch.empty(like.numel())
        return self._diff[: like.numel()].view(like.shape)


class _Ring:
    """Two reusable float32 block buffers for one side of the threaded loop. The loader fills one while the main
    thread reads the other; block i + 2 is submitted only after block i has been consumed, so two suffice. Reusing
    them spares a multi-MiB allocation per block (and the heap fragmentation it left behind)."""

    def __init__(self, numel: int):
        self._bufs = (torch.empty(numel), torch.empty(numel))
        self._next = 0
        self.capacity = numel

    def take(self, shape) -> torch.Tensor:
        buf = self._bufs[self._next]
        self._next ^= 1
        n = 1
        for d in shape:
            n *= d
        return buf[:n].view(*shape)


class _Inline:
    """An executor that runs each call at once, in the caller's thread (Future-compatible results)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def submit(fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised by .result() like a thread pool would
            fut.set_exception(exc)
        return fut


def _has_scale(src, name: str) -> bool:
    fn = getattr(src.reader, "scale_companion", None)
    return bool(fn and fn(name))


def measure_plan(plan: AlignmentPlan, base, cand, *, fraction: float | None, seed: int,
                 device: str | torch.device = "cpu", progress=None) -> list[TensorMeasurement]:
    """Measure every pair of the plan in base file order (so reads are mostly sequential)."""
    dev = torch.device(device)
    buffers = BlockBuffers()
    inv = base.inventory
    order = sorted(plan.pairs, key=lambda p: (inv[p.base_name].file, inv[p.base_name].start))
    out = []
    for p in order:
        out.append(measure_pair(p, base, cand, fraction=fraction, rng=np.random.default_rng([seed, zlib.crc32(p.base_name.encode())]),
                                device=dev, seed=seed, buffers=buffers))
        release_free_memory()  # blocks freed on the loader threads' heaps go back now, not never
        if progress is not None:
            progress(p, sum(b - a for a, b in out[-1].sample.blocks) * inv[p.base_name].row_bytes)
    return out


__all__ = ["TensorMeasurement", "measure_pair", "measure_plan", "read_indexed", "block_rows", "DTYPES"]
