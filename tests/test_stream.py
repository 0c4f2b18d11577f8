"""The measurement stream's workers: full reads split block by block over two threads, small pairs measured whole
and ahead, results in plan order. Whatever the scheduling, the sums must equal a one-thread pass bit for bit,
hashes must see the bytes in file order, and a failing read must surface instead of hanging."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_provenance.alignment.identity import identity_plan
from hf_provenance.errors import ReadError
from hf_provenance.measurement import sampling, stream
from hf_provenance.measurement.sampling import draw
from hf_provenance.sources import open_model
from hf_provenance.sources.reader import LocalTransport


def _pair(tmp_path, *, same: bool):
    """A base and a candidate: a big bf16 matrix, a big float32 one, a norm vector and a small matrix."""
    g = torch.Generator().manual_seed(1)
    base = {
        "model.embed_tokens.weight": torch.randn(40_000, 128, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(12_000, 256, generator=g),
        "model.layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(256, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 256, generator=g),
    }
    cand = {k: (v if same else (v.float() + 0.3 * torch.randn(v.shape, generator=g)).to(v.dtype))
            for k, v in base.items()}
    cand["model.layers.0.mlp.down_proj.weight"][:100] = base["model.layers.0.mlp.down_proj.weight"][:100]
    out = []
    for name, tensors in (("base", base), ("model", cand)):
        d = tmp_path / name
        d.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
        out.append(str(d))
    return (*out, base, cand)


def _sequential(plan, base, model, fraction, seed):
    """The reference: every pair measured inline on this thread, one block group after another (with the one
    torch thread the workers use: float32 reductions split over more threads would add in another order)."""
    inv = base.inventory
    out = []
    with stream._intra_op_threads(1):
        for p in sorted(plan.pairs, key=lambda p: (inv[p.base_name].file, inv[p.base_name].start)):
            rng = np.random.default_rng([seed, stream.zlib.crc32(p.base_name.encode())])
            sample = draw(p.n_rows, p.n_cols * inv[p.base_name].itemsize, fraction, rng)
            out.append(stream.measure_pair(p, base, model, fraction=fraction, rng=rng,
                                           device=torch.device("cpu"), seed=seed, sample=sample))
    return out


def _fingerprint(m) -> tuple:
    acc = m.acc
    return (m.pair.base_name, acc.totals.tobytes(), acc.col_a.numpy().tobytes(), acc.col_b.numpy().tobytes(),
            acc.sdd, acc.equal, acc.max_abs_diff, m.sha_a, m.sha_b, m.simhash_a, m.simhash_b, len(acc.blocks),
            acc.blocks.scalars.tobytes(), acc.blocks.col_a.tobytes(), acc.blocks.col_b.tobytes(), m.sample.blocks)


@pytest.fixture
def small_chunks(monkeypatch):
    """64 KiB full-read blocks: the big tensors become dozens of groups shared between the workers."""
    monkeypatch.setattr(sampling, "FULL_READ_CHUNK", 64 * 1024)
    monkeypatch.setattr(stream, "FULL_READ_CHUNK", 64 * 1024)


def test_workers_run_with_one_torch_and_one_blas_thread_each_and_restore_them():
    # two workers on two cores: torch and the BLAS pools (numpy's OpenBLAS) at one thread each while they run,
    # the caller's settings after (OpenBLAS threads left at two spin on the cores the workers need)
    from threadpoolctl import threadpool_info

    def blas():
        return sorted(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")

    torch_before, blas_before = torch.get_num_threads(), blas()
    assert blas_before, "numpy's BLAS should be visible to threadpoolctl"
    with stream._intra_op_threads(1):
        assert torch.get_num_threads() == 1
        assert set(blas()) == {1}
    assert torch.get_num_threads() == torch_before and blas() == blas_before


@pytest.mark.parametrize("fraction", [None, 0.1])
def test_workers_give_the_sums_of_one_thread_bit_for_bit(tmp_path, small_chunks, fraction):
    base_dir, model_dir, base_t, cand_t = _pair(tmp_path, same=False)
    base, model = open_model(base_dir), open_model(model_dir)
    plan, _ = identity_plan(base, model)
    groups = {p.base_name: len(draw(p.n_rows, p.n_cols * base.inventory[p.base_name].itemsize, fraction,
                                    np.random.default_rng(0)).blocks) for p in plan.pairs}
    if fraction is None:
        assert max(groups.values()) >= 20  # the parallel path really has many groups to share out
    else:
        assert sum(1 for p in plan.pairs if p.n_rows >= 12_000) == 2  # two sampled pairs, measured whole ahead
    parallel = stream.measure_plan(plan, base, model, fraction=fraction, seed=4)
    again = stream.measure_plan(plan, base, model, fraction=fraction, seed=4)
    reference = _sequential(plan, base, model, fraction, 4)
    assert [_fingerprint(m) for m in parallel] == [_fingerprint(m) for m in reference]
    assert [_fingerprint(m) for m in again] == [_fingerprint(m) for m in reference]
    big = next(m for m in parallel if m.pair.base_name.endswith("down_proj.weight"))
    if fraction is None:
        name = "model.layers.0.mlp.down_proj.weight"
        assert big.acc.equal == int((base_t[name] == cand_t[name]).sum()) >= 100 * 256  # exact across groups
        assert big.bytes_differ and big.sha_a is None


def test_hashes_see_the_bytes_in_file_order(tmp_path, small_chunks):
    """Identical tensors of many groups: the per-tensor SHA-256 equals hashlib over the stored bytes, which only
    holds if the workers fed the hash in file order."""
    base_dir, model_dir, base_t, _ = _pair(tmp_path, same=True)
    base, model = open_model(base_dir), open_model(model_dir)
    plan, _ = identity_plan(base, model)
    for _ in range(3):  # a race shows on some runs only
        ms = {m.pair.base_name: m for m in stream.measure_plan(plan, base, model, fraction=None, seed=0)}
        for name, t in base_t.items():
            want = hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            assert ms[name].sha_a == ms[name].sha_b == want, name
            assert ms[name].acc.equal == t.numel() and ms[name].acc.max_abs_diff == 0.0


@pytest.mark.parametrize("where", ["first group", "later group"])
def test_a_failing_read_in_a_worker_is_raised_not_hung(tmp_path, small_chunks, monkeypatch, where):
    """A read that fails in the first group of a split tensor (the one the others wait on for their scale) or in
    the middle of it, while other groups are in flight: the error comes out, nothing hangs."""
    base_dir, model_dir, *_ = _pair(tmp_path, same=True)
    base, model = open_model(base_dir), open_model(model_dir)
    plan, _ = identity_plan(base, model)
    real, calls, lock = LocalTransport.pread_into, [0], threading.Lock()
    info = base.inventory["model.layers.0.mlp.down_proj.weight"]
    blocks = draw(info.n_rows, info.row_bytes, None, np.random.default_rng(0)).blocks
    assert len(blocks) >= stream.SPLIT_BLOCKS  # a tensor split between the workers
    target = info.start + blocks[0 if where == "first group" else 5][0] * info.row_bytes

    def flaky(self, file, offset, buffer):
        with lock:
            calls[0] += 1
        if file == info.file and offset == target and "base" in str(self._paths.get(file, file)):
            raise ReadError(file, f"read failed at byte {offset}: Input/output error")
        return real(self, file, offset, buffer)

    monkeypatch.setattr(LocalTransport, "pread_into", flaky)
    outcome = []

    def run():
        try:
            stream.measure_plan(plan, base, model, fraction=None, seed=0)
            outcome.append("finished")
        except ReadError as exc:
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the stream hung after a failed read"
    assert len(outcome) == 1 and isinstance(outcome[0], ReadError)


def test_one_reader_serves_several_threads_their_own_rows(tmp_path):
    """Raw views of the reader's buffer are per thread: a read on another thread does not overwrite them."""
    path = tmp_path / "m.safetensors"
    w = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32).to(torch.bfloat16)
    save_file({"w": w}, str(path))
    reader = open_model(str(tmp_path)).reader
    first = reader.read_raw("w", 0, 8, copy=False)
    seen = []
    t = threading.Thread(target=lambda: seen.append(reader.read_raw("w", 32, 40, copy=False).clone()))
    t.start()
    t.join()
    assert torch.equal(first, w[0:8]) and torch.equal(seen[0], w[32:40])


def test_concurrent_reads_on_one_reader_return_the_right_rows(tmp_path):
    """Local reads run without the reader's lock: four threads hammering one reader each get their own rows, and
    the byte counter adds up."""
    w = torch.randn(4096, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    reader = open_model(str(tmp_path)).reader
    before, errors = reader.bytes_read, []

    def hammer(seed):
        rng = np.random.default_rng(seed)
        for _ in range(300):
            s = int(rng.integers(0, 4000))
            e = s + int(rng.integers(1, 96))
            got = reader.read_raw("w", s, min(e, 4096), copy=False).clone()
            if not torch.equal(got, w[s:min(e, 4096)]):
                errors.append((s, e))
            got = reader.read_rows("w", s, min(e, 4096))
            if not torch.equal(got, w[s:min(e, 4096)].float()):
                errors.append((s, e))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    expected = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        for _ in range(300):
            s = int(rng.integers(0, 4000))
            e = min(s + int(rng.integers(1, 96)), 4096)
            expected += 2 * (e - s) * 64 * 2
    assert reader.bytes_read - before == expected


class _Recorder:
    """An executor stand-in that runs announcements at once and remembers them."""

    def __init__(self):
        self.fired = 0

    def submit(self, fn):
        self.fired += 1
        fn()


def test_read_ahead_stays_a_window_ahead_and_announces_everything(tmp_path):
    from hf_provenance.measurement.readahead import ReadAhead, pair_bytes, units

    base_dir, model_dir, *_ = _pair(tmp_path, same=False)
    base, model = open_model(base_dir), open_model(model_dir)
    plan, _ = identity_plan(base, model)
    spans = {"base": [], "model": []}
    for src, side in ((base, "base"), (model, "model")):
        src.prefetch = lambda blocks, got=spans[side]: got.extend(blocks)
    pairs = sorted(plan.pairs, key=lambda p: p.base_name)
    samples = [draw(p.n_rows, p.n_cols * base.inventory[p.base_name].itemsize, None, np.random.default_rng(0))
               for p in pairs]
    total = sum(pair_bytes(p, s.rows_read, base, model) for p, s in zip(pairs, samples))
    biggest = max(u.nbytes for p, s in zip(pairs, samples) for u in units(p, s, base, model, unit=256 * 1024))
    window = 4 * 1024 * 1024
    assert total > 4 * window
    ra = ReadAhead((u for p, s in zip(pairs, samples) for u in units(p, s, base, model, unit=256 * 1024)),
                   _Recorder(), window=window)
    assert window <= ra.announced < window + biggest
    while ra.done < total:
        ra.consumed(128 * 1024)
        assert ra.announced - ra.done < window + biggest or ra.announced == total  # never further ahead
    assert ra.announced == total  # every byte announced exactly once
    for p, s in zip(pairs, samples):  # each side's rows announced, as the blocks the measurement reads
        for name, side in ((p.base_name, "base"), (p.cand_name, "model")):
            got = sorted((a, b) for n, a, b in spans[side] if n == name)
            assert got == [tuple(map(int, blk)) for blk in s.blocks], name


def test_row_maps_are_announced_as_coalesced_runs():
    from hf_provenance.measurement.readahead import _row_spans

    idx = np.array([5, 6, 7, 0, 1, 9, 3])
    assert _row_spans("t", idx, 0, 7) == [("t", 0, 2), ("t", 3, 4), ("t", 5, 8), ("t", 9, 10)]
    assert _row_spans("t", None, 2, 9) == [("t", 2, 9)]


def test_a_blas_limit_that_fails_leaves_the_measurement_running(monkeypatch):
    # threadpoolctl is a speed hint: a BLAS it cannot handle (or a broken install) must not stop a comparison
    import threadpoolctl

    def broken(**kw):
        raise RuntimeError("unsupported BLAS")

    monkeypatch.setattr(threadpoolctl, "threadpool_limits", broken)
    before = torch.get_num_threads()
    with stream._intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
