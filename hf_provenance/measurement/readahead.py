"""Announce the row blocks a plan will read, a bounded window ahead of the workers.

Local sources turn an announcement into ``posix_fadvise(WILLNEED)`` (the kernel starts reading at once), remote
ones into background range requests. A worker that reads synchronously keeps at most one request in flight per
file, and the kernel's own read-ahead does not keep the device busy either: on the benchmark machine, two streams of
1 MiB reads with 2.5 ms of work per block took 4.0 s cold, and 3.0 s with a 32 MiB window announced ahead (pure
reading 2.4 s → 1.3 s). The window is counted in stored bytes of both sides: announcements stay at most
``window`` bytes ahead of what the measurement has consumed, so page cache and remote caches hold a bounded amount
whatever the model size. Announcing blocks on a thread of its own keeps the main thread from stalling while the
device queue is full (``posix_fadvise`` then blocks).
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from hf_provenance.alignment.plan import PairSpec
from hf_provenance.measurement.sampling import RowSample

HINT_UNIT = 4 * 1024 * 1024     # stored bytes (both sides) announced per call
WINDOW = 64 * 1024 * 1024       # stored bytes (both sides) announced ahead of the measurement


def pair_bytes(pair: PairSpec, rows: int, base, cand) -> int:
    """Stored bytes of ``rows`` compared rows, both sides (the unit of the window)."""
    return rows * (base.inventory[pair.base_name].row_bytes + cand.inventory[pair.cand_name].row_bytes)


@dataclass
class _Unit:
    nbytes: int
    calls: list  # (prefetch function, [(tensor, start row, stop row)])

    def fire(self) -> None:
        for prefetch, spans in self.calls:
            try:
                prefetch(spans)
            except Exception:  # noqa: BLE001 - a hint only: the read that follows reports any real error
                pass


def _row_spans(name: str, idx: np.ndarray | None, a: int, b: int) -> list[tuple[str, int, int]]:
    """Rows a..b of the compared order as stored row ranges (runs of a row map coalesced)."""
    if idx is None:
        return [(name, int(a), int(b))]
    rows = np.unique(np.asarray(idx[a:b], dtype=np.int64))
    if not rows.size:
        return []
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(name, int(r[0]), int(r[-1]) + 1) for r in np.split(rows, cut)]


def units(pair: PairSpec, sample: RowSample, base, cand, unit: int = HINT_UNIT) -> Iterator[_Unit]:
    """A pair's blocks in read order, cut into announcements of about ``unit`` stored bytes (both sides).

    Sides that cannot be announced (no prefetch, a transposed view read through its own window, pieces of a fused
    bias) still count their bytes, so that announced and consumed bytes add up."""
    sides = []
    if not (pair.is_vector and (pair.base_rows is not None or pair.cand_rows is not None)):
        for src, name, idx, transposed in ((base, pair.base_name, pair.base_rows, pair.transposed[0]),
                                           (cand, pair.cand_name, pair.cand_rows, pair.transposed[1])):
            prefetch = getattr(src, "prefetch", None)
            if prefetch is not None and not transposed:
                sides.append((prefetch, name, idx))
    per_row = pair_bytes(pair, 1, base, cand)
    blocks, nbytes = [], 0
    for i, (a, b) in enumerate(sample.blocks):
        blocks.append((a, b))
        nbytes += (b - a) * per_row
        if nbytes >= unit or i == len(sample.blocks) - 1:
            calls = [(prefetch, [s for a, b in blocks for s in _row_spans(name, idx, a, b)])
                     for prefetch, name, idx in sides]
            yield _Unit(nbytes, [c for c in calls if c[1]])
            blocks, nbytes = [], 0


class ReadAhead:
    """Keeps announcements ``window`` stored bytes ahead of consumption, in plan order, on ``executor``.

    The main thread calls :meth:`consumed` as groups and pairs are measured; announcements run on the executor.
    """

    def __init__(self, pending: Iterable[_Unit], executor: Executor, window: int = WINDOW):
        self._units = iter(pending)
        self._executor = executor
        self.window = window
        self.announced = 0
        self.done = 0
        self._top_up()

    def consumed(self, nbytes: int) -> None:
        self.done += nbytes
        self._top_up()

    def _top_up(self) -> None:
        while self.announced < self.done + self.window:
            unit = next(self._units, None)
            if unit is None:
                return
            if unit.calls:
                self._executor.submit(unit.fire)
            self.announced += unit.nbytes


__all__ = ["HINT_UNIT", "WINDOW", "ReadAhead", "pair_bytes", "units"]
