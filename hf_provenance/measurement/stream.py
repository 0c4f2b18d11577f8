"""Stream the pairs of an AlignmentPlan through the accumulators, one row block at a time.

Never holds a whole tensor of a large model: each block of base rows is read with the matching candidate rows
(through the plan's row map), mapped into the base's column order, and folded into float64 sums. Two worker threads
read and compute whole block groups (preadv and torch both release the GIL) while the main thread folds their small
results in order, so the sums do not depend on the scheduling; blocks are announced to the sources a window ahead
(``readahead``).
"""

from __future__ import annotations

import math
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from itertools import chain
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_provenance.alignment.plan import ARBITRARY, AlignmentPlan, PairSpec
from hf_provenance.measurement.accumulate import ByteHasher, PairAccumulator, SimHasher, row_hashes
from hf_provenance.measurement.experts import ExpertDraw, expert_sample
from hf_provenance.measurement.memory import release_free_memory
from hf_provenance.measurement.readahead import ReadAhead, pair_bytes, units
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
    expert_draw: ExpertDraw | None = None  # a whole expert drawn under --sample (``measurement.experts``)


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
                 copy: bool = True, finite: bool = False) -> torch.Tensor:
    """Rows idx[start:stop] (or rows start..stop when idx is None), coalescing contiguous runs into single reads.

    ``copy=False`` (raw contiguous reads only) may return a view of the reader's buffer, valid until its next read.
    ``finite`` (decoded rows only): NaN and ±Inf read as 0, as the measurement leaves them out of its sums; the
    alignment searches read this way (one NaN had made a linear assignment refuse its whole cost matrix).
    """
    rows = _read_indexed(reader, name, idx, start, stop, raw=raw, copy=copy)
    return torch.nan_to_num_(rows, nan=0.0, posinf=0.0, neginf=0.0) if finite and not raw else rows


def _read_indexed(reader, name: str, idx: np.ndarray | None, start: int, stop: int, *, raw: bool,
                  copy: bool) -> torch.Tensor:
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
                 device: torch.device, seed: int, buffers: "BlockBuffers | None" = None,
                 pool: ThreadPoolExecutor | None = None, sample: RowSample | None = None,
                 hint: bool = True, on_fold=None) -> TensorMeasurement:
    """Measure one pair. ``base``/``cand`` are ModelSources; ``pool`` (the plan's workers) measures big blocks
    in parallel, inline without it. ``sample``: the rows to read when already drawn (else drawn here).
    ``hint``: announce the blocks to the sources first (False when the caller does, a window ahead).
    ``on_fold(rows)``: called on this thread as each group of rows has been added (the caller's read-ahead)."""
    ia, ib = base.inventory[pair.base_name], cand.inventory[pair.cand_name]
    n_cols = pair.n_cols
    sample = sample if sample is not None else draw(pair.n_rows, n_cols * ia.itemsize, fraction, rng)
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
    # SHA-256 only answers "same stored bytes?": each block's bytes are compared first and hashed (once, for both
    # sides) only while every block so far was equal; a tensor that differs is never hashed
    hashing = full_in_order and not scaled_a and not scaled_b
    sha = ByteHasher() if hashing else None
    sim_a = SimHasher(n_cols, seed) if full_in_order and ia.is_float else None
    sim_b = SimHasher(n_cols, seed) if full_in_order and ib.is_float else None
    # exact row hashes only where vocabulary rows were re-paired (extension, pruning, another tokenizer)
    want_rowhash = sample.full and pair.axes[0] == "vocab" and not pair.is_vector and pair.base_rows is not None
    rh_a, rh_b, vec_a, vec_b = [], [], [], []

    # a side stored [.., in, out] serves rows of its transposed view from a bounded column window
    tviews = tuple(TransposedRows(src.reader, info) if t and not pair.is_vector else None
                   for src, info, t in ((base, ia, trans[0]), (cand, ib, trans[1])))
    sides = ((base, pair.base_name, pair.base_rows, scaled_a, ia, tviews[0]),
             (cand, pair.cand_name, pair.cand_rows, scaled_b, ib, tviews[1]))

    bytes_differ = [ia.dtype != ib.dtype or not hashing]
    turn = _InOrder()  # the hash needs file order when several workers read
    # a raw view lives in its reader's per-thread buffer; one reader for both sides would overwrite the first
    shared_reader = base.reader is cand.reader

    # big blocks (full reads) are measured by worker threads, a whole group each (both sides, their own sums and
    # the cross terms) so that both cores compute while reads are in flight; small sampled blocks are measured
    # inline (by the worker that has the whole pair) several at a time
    threaded = big_blocks(sample, ia.row_bytes)
    # inline, equal sampled blocks are measured several at a time (one call, the jackknife still sees each block)
    groups = [[blk] for blk in sample.blocks] if threaded else _batches(sample.blocks, ia.row_bytes)
    bufs = buffers if buffers is not None and device.type == "cpu" else None

    def read_block(i, block):
        """Rows of one block of side i, 2-D: a float32 tensor, or a view of this thread's read buffer in the stored
        dtype (valid until its next read from that reader)."""
        src, name, idx, scaled, info, tview = sides[i]
        s, e = block
        if tview is not None:
            with tlocks[i]:  # one column window per side: its blocks are served in turn
                return tview.rows(idx, s, e)
        if pair.is_vector and idx is not None:  # a piece of a fused bias: its elements
            return src.reader.read_rows(name, 0, 1).reshape(1, -1)[:, torch.from_numpy(np.asarray(idx))]
        if scaled:
            return read_indexed(src.reader, name, idx, s, e, raw=False).reshape(-1, info.row_len)
        copy = i == 0 and shared_reader
        return read_indexed(src.reader, name, idx, s, e, raw=True, copy=copy).reshape(-1, info.row_len)

    def check_bytes(g, xa, xb) -> None:
        """Compare one block's stored bytes; hash them (in file order) while every block so far was equal."""
        with turn.turn(g):
            if bytes_differ[0]:
                return
            if xa.shape == xb.shape and torch.equal(xa.reshape(-1).view(torch.uint8), xb.reshape(-1).view(torch.uint8)):
                sha.update(xa)
            else:
                bytes_differ[0] = True

    def read_group(g, group):
        """Group g of both sides as float32 rows, in this thread's reusable buffers when the stream lends them."""
        k = sum(e - s for s, e in group)
        outs, o = [None, None], 0
        try:
            for blk in group:
                xs = read_block(0, blk), read_block(1, blk)
                if not bytes_differ[0]:
                    check_bytes(g, *xs)
                for i, x in enumerate(xs):
                    if bufs is None:
                        outs[i] = x.to(torch.float32, copy=True) if outs[i] is None else \
                            torch.cat([outs[i], x.to(torch.float32)])
                        continue
                    if outs[i] is None:
                        outs[i] = bufs.take(i, (k, x.shape[1]))
                    outs[i][o:o + x.shape[0]].copy_(x)
                o += xs[0].shape[0]
        finally:
            if hashing:  # a group that stopped early still lets the next ones through
                turn.skip(g)
        return outs

    def work(g, group):
        """Read, remap and measure group g (a worker thread, or inline): returns small results only."""
        try:
            return _work(g, group)
        finally:
            if not g:  # even when the first group failed: the others then finish or fail, they never hang
                calibrated.set()

    def _work(g, group):
        first = group[0][0]
        a, b = read_group(g, group)
        shares = [None, None]
        if sim_a is not None:
            fuse_a = sim_a.groups == 1 and len(group) == 1
            shares[0] = sim_a.signs(first, a.shape[0]) if fuse_a else sim_a.contribution(a, first)
        remap_b = any(v is not None for v in (pair.col_map, pair.col_sign, pair.col_scale, pair.row_sign))
        if sim_b is not None and (remap_b or sim_b.groups > 1 or len(group) > 1):
            shares[1] = sim_b.contribution(b, first)  # of the values as stored, before any remapping
        elif sim_b is not None:
            shares[1] = sim_b.signs(first, b.shape[0])
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
        extra = {}
        if want_rowhash:
            extra["rh"] = (row_hashes(a, seed), row_hashes(b, seed))
        if pair.is_vector:
            extra["vec"] = tuple(x.reshape(-1).cpu().numpy().astype(np.float64) for x in (a, b))
        # a SimHash over one block rides on the column sums' pass (row signs in, wᵀx out) when it can
        sums = []
        if g:  # the first group fixes each side's scale and shift; the others were read meanwhile
            calibrated.wait()
        for i, (x, share) in enumerate(((a, shares[0]), (b, shares[1]))):
            fused = share is not None and share.dim() == 1
            sums.append(acc.side(x, "ab"[i], len(group), project=share if fused else None))
            if fused:
                raw = sums[i].raw
                shares[i] = sums[i].projection if sums[i].projection is not None else \
                    (shares[i].to(raw.device) @ raw).double()
        if not g:  # scale and shift fixed: the others may go on while this group finishes
            calibrated.set()
        res = acc.measure(sums[0], sums[1], blocks=len(group))
        return res, shares, extra, a.shape[0]

    def fold(out):
        res, shares, extra, rows = out
        acc.add(res)
        if on_fold is not None:
            on_fold(rows)
        for sim, share in ((sim_a, shares[0]), (sim_b, shares[1])):
            if sim is not None:
                sim.add(share)
        if "rh" in extra:
            rh_a.append(extra["rh"][0])
            rh_b.append(extra["rh"][1])
        if "vec" in extra:
            vec_a.append(extra["vec"][0])
            vec_b.append(extra["vec"][1])

    if hint:
        for unit in units(pair, sample, base, cand):
            unit.fire()

    tlocks = (threading.Lock(), threading.Lock())
    if bufs is not None:
        acc.buffers = bufs
    parallel = threaded and pool is not None
    pool = pool if parallel else _Inline()
    # groups in flight: two per worker; one when a transposed side's column window must serve its blocks in order
    depth = 1 if not parallel or any(t is not None for t in tviews) else 2 * WORKERS
    calibrated = threading.Event()
    pending: deque = deque()  # (measure_plan runs the workers with one torch thread each)
    nxt = 0
    try:
        while nxt < len(groups) or pending:
            while nxt < len(groups) and len(pending) < depth:
                pending.append(pool.submit(work, nxt, groups[nxt]))
                nxt += 1
            fold(pending.popleft().result())
    finally:  # after a failure, groups not started yet are dropped, not read
        for f in pending:
            f.cancel()
    if hashing:
        if bytes_differ[0]:
            m.sha_a = m.sha_b = None
            m.bytes_differ = True
        else:  # every stored byte equal: one digest for both
            m.sha_a = m.sha_b = sha.hexdigest()
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
    """torch's intra-op threads and the BLAS libraries' threads (numpy's and scipy's OpenBLAS, through
    threadpoolctl) set to ``n`` for a plan, restored after: with two workers busy, one thread each avoids
    oversubscribing the cores. OpenBLAS's own threads spin between calls: left at two, they took ~10% of a sampled
    compare's CPU from the workers (the permutation tests and interval statistics call numpy on the workers)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        with _blas_limits(n):
            yield
    finally:
        if before != n:
            torch.set_num_threads(before)


@contextmanager
def parallel_layers(workers: int | None = None):
    """``run(fn, items)``: ``[fn(x) for x in items]`` on ``workers`` threads, results in order, with torch and the BLAS
    pools at one thread each meanwhile (the searches' per-layer fits: independent of each other, each a long run of
    small tensor operations). The first failure is raised after the others stop being started. ``workers=1``: on
    this thread, torch's own threads left as they are (one layer at a time, as before there was a choice)."""
    if workers == 1:
        yield lambda fn, items: [fn(x) for x in items]
        return
    with ThreadPoolExecutor(max_workers=workers or WORKERS, thread_name_prefix="layers") as pool, \
            _intra_op_threads(1):
        def run(fn, items):
            futures = [pool.submit(fn, x) for x in items]
            try:
                return [f.result() for f in futures]
            finally:
                for f in futures:
                    f.cancel()
        yield run


def _blas_limits(n: int):
    """threadpoolctl's limit on the BLAS pools loaded in the process (a no-op context where it cannot apply one)."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=n, user_api="blas")
    except Exception:  # noqa: BLE001 - a speed hint: a BLAS threadpoolctl cannot handle must not stop the run
        return nullcontext()


TRIM_CHECK_BYTES = 64 * 1024 * 1024  # stored bytes measured between looks at the resident set
SPLIT_BLOCKS = 8  # full reads of at least this many big blocks are shared out block by block
PAIRS_AHEAD = 8  # whole small pairs queued for the workers beyond the one the main thread waits for
WORKERS = 2  # measuring threads: block groups of split full reads, or whole small pairs with their statistics
BATCH_BYTES = 1024 * 1024  # stored bytes per side measured in one call on the inline path (stays in cache)


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
    """Float32 block buffers reused across the tensors of a plan, per thread: one per side and one for the
    differences. They grow to the largest block and are never freed in between, so the stream allocates nothing per
    block or per tensor (allocation churn fragmented glibc's heaps: +19 MiB of resident memory per 3B-model tensor).
    A thread's buffers hold only the group it is measuring, and go when the thread ends."""

    def __init__(self):
        self._local = threading.local()

    def _get(self, slot: int, numel: int) -> torch.Tensor:
        bufs = self._local.__dict__.setdefault("bufs", {})
        buf = bufs.get(slot)
        if buf is None or buf.numel() < numel:
            buf = bufs[slot] = torch.empty(numel)
        return buf

    def take(self, side: int, shape) -> torch.Tensor:
        """This thread's float32 buffer for ``side`` (0 base, 1 candidate), viewed as ``shape``."""
        n = math.prod(shape)
        return self._get(side, n)[:n].view(*shape)

    def diff(self, like: torch.Tensor) -> torch.Tensor | None:
        if like.device.type != "cpu":
            return None
        return self._get(2, like.numel())[: like.numel()].view(like.shape)


class _InOrder:
    """A turnstile: group g passes ``turn(g)`` once groups 0..g-1 have called ``skip`` (hashes need file order
    when several workers read)."""

    def __init__(self):
        self._next = 0
        self._cv = threading.Condition()

    @contextmanager
    def turn(self, g: int):
        with self._cv:
            self._cv.wait_for(lambda: self._next >= g)
        yield

    def skip(self, g: int) -> None:
        """Group g is done with the bytes: let g + 1 through (after g's own turn came)."""
        with self._cv:
            self._cv.wait_for(lambda: self._next >= g)
            self._next = max(self._next, g + 1)
            self._cv.notify_all()


class _Inline:
    """An executor that runs each call at once, in the caller's thread (Future-compatible results)."""

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


def big_blocks(sample: RowSample, row_bytes: int) -> bool:
    """Whether a pair's blocks are big (full-read chunks: FULL_READ_CHUNK rounded down to whole rows) rather than
    small sampled ones, which are measured several at a time."""
    return bool(sample.blocks) and 2 * sample.rows_read * max(row_bytes, 1) >= len(sample.blocks) * FULL_READ_CHUNK


def measure_plan(plan: AlignmentPlan, base, cand, *, fraction: float | None, seed: int,
                 device: str | torch.device = "cpu", progress=None, then=None, skipped: list | None = None) -> list:
    """Measure every pair of the plan in base file order (so reads are mostly sequential).

    Two workers share the CPU: a pair of big blocks (a full read) is split between them block by block; pairs of
    small blocks (sampled rows, small tensors) are measured whole, one per worker, a few pairs ahead. Blocks are
    announced to the sources a window ahead of the measurement (``readahead``). Results come back in plan
    order whatever finishes first. ``then``: a function applied to each measurement on the thread that made it
    (the statistics, off the main thread); the list holds its results instead of the measurements.
    Under sampling, small routed-expert tensors are sampled whole, a stratified sample of experts per layer
    (``measurement.experts``); ``skipped`` (a list) receives the pairs left unread.
    """
    dev = torch.device(device)
    buffers = BlockBuffers()
    inv = base.inventory
    order = sorted(plan.pairs, key=lambda p: (inv[p.base_name].file, inv[p.base_name].start))
    rngs = [np.random.default_rng([seed, zlib.crc32(p.base_name.encode())]) for p in order]
    samples = [draw(p.n_rows, p.n_cols * inv[p.base_name].itemsize, fraction, r) for p, r in zip(order, rngs)]
    picks = expert_sample(order, samples, fraction, seed)
    if skipped is not None:
        skipped.extend(p for p, pick in zip(order, picks) if pick is False)
    kept = [i for i, pick in enumerate(picks) if pick is not False]
    order, rngs, samples, picks = ([xs[i] for i in kept] for xs in (order, rngs, samples, picks))
    # split block by block: full reads of many big blocks; anything smaller is one worker's job (two at a time),
    # which spares the wait for the queue to drain before a split pair
    big = [s.full and len(s.blocks) >= SPLIT_BLOCKS and big_blocks(s, inv[p.base_name].row_bytes)
           for p, s in zip(order, samples)]
    out: list = []
    pending: deque = deque()
    def run(p, kw, pick=None):
        m = measure_pair(p, base, cand, **kw)
        m.expert_draw = pick
        return m, (then(m) if then is not None else m)

    since_check = [0]

    def finish(done, split: bool) -> None:
        m, result = done
        out.append(result)
        if not split:  # a split pair reported its groups as they were added
            ahead.consumed(pair_bytes(m.pair, m.sample.rows_read, base, cand))
        nbytes = m.sample.rows_read * inv[m.pair.base_name].row_bytes
        since_check[0] += nbytes
        if since_check[0] >= TRIM_CHECK_BYTES:  # blocks freed on the workers' heaps go back now, not never
            since_check[0] = 0
            release_free_memory()
        if progress is not None:
            progress(m.pair, nbytes)

    with (ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="measure") as pool,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="announce") as announcer, _intra_op_threads(1)):
        ahead = ReadAhead(chain.from_iterable(units(p, s, base, cand) for p, s in zip(order, samples)), announcer)
        try:
            for i, p in enumerate(order):
                kw = dict(fraction=fraction, rng=rngs[i], device=dev, seed=seed, buffers=buffers,
                          sample=samples[i], hint=False)
                if big[i]:
                    while pending:
                        finish(pending.popleft().result(), False)
                    consumed = (lambda rows, p=p: ahead.consumed(pair_bytes(p, rows, base, cand)))
                    finish(run(p, dict(kw, pool=pool, on_fold=consumed), picks[i]), True)
                    continue
                pending.append(pool.submit(run, p, kw, picks[i]))
                if len(pending) > PAIRS_AHEAD:
                    finish(pending.popleft().result(), False)
            while pending:
                finish(pending.popleft().result(), False)
        finally:  # after a failure (or Ctrl-C), pairs not started yet are dropped, not measured
            for f in pending:
                f.cancel()
    return out


__all__ = ["TensorMeasurement", "measure_pair", "measure_plan", "read_indexed", "block_rows", "DTYPES"]
