"""Rows of a tensor stored transposed (GPT-2 ``Conv1D``: ``[.., in, out]``), read in ``nn.Linear`` orientation.

A pair compares the two sides row by row in one orientation, ``[out, in]`` (the canonical one; a stacked tensor
``[E, in, out]`` is read as ``[E * out, in]``). The reader only reads stored rows, and a row of the transposed view
is a *column* of the stored tensor, so this module keeps a **column window**: the stored columns ``c0 .. c1`` of
one stacked matrix (all of its ``in`` rows), decoded to float32 and transposed, at most ``budget`` bytes
(``WINDOW_BYTES``, 64 MiB). Requested rows are served from the window; a row outside it loads the next window,
reading the stored matrix in row chunks of ``CHUNK_BYTES`` and keeping only the window's columns.

Why this design (and not a strided read per block): row blocks arrive in ascending order, so

* a matrix that fits the budget (every GPT-2 ``Conv1D``: gpt2-xl's largest is 1600 x 6400 x 4 B = 41 MiB) is read
  **once**, whatever the number of row blocks, and memory is the matrix plus one chunk;
* a larger one is read ``ceil(out / width)`` times (``width = budget / (4 * in)`` columns per window): memory stays
  bounded at the cost of re-reading, and ``bytes_read`` counts every pass.

Comparing base^T with the candidate is valid for the statistics too: Pearson with double centring treats both axes
the same way, so transposing both sides leaves every sum unchanged; only the meaning of each axis for the null
(``PairSpec.axes``) is kept from the ``[out, in]`` orientation. Sampling draws row blocks of the transposed view, but
every window reads whole stored rows: a transposed pair is read in full whatever ``--sample`` says.
"""

from __future__ import annotations

import math

import numpy as np
import torch

WINDOW_BYTES = 64 << 20
CHUNK_BYTES = 4 << 20


class TransposedRows:
    """Serves rows of the transposed view of one stored tensor (``reader`` rows are its stored rows).

    Example:
        >>> t = TransposedRows(source.reader, source.inventory["h.0.mlp.c_fc.weight"])  # doctest: +SKIP
        >>> t.rows(np.arange(64)).shape      # the first 64 output features of c_fc, [64, in]  # doctest: +SKIP
    """

    def __init__(self, reader, info, *, budget: int = WINDOW_BYTES, chunk_bytes: int = CHUNK_BYTES):
        if len(info.shape) < 2:
            raise ValueError(f"{info.name}: a transposed read needs a matrix, got shape {list(info.shape)}")
        self.reader, self.name = reader, info.name
        self.n_in, self.n_out = int(info.shape[-2]), int(info.shape[-1])
        self.stack = math.prod(info.shape[:-2])
        self.width = min(self.n_out, max(1, budget // (4 * max(1, self.n_in))))
        self.chunk_rows = max(1, chunk_bytes // (4 * max(1, self.n_out)))
        self.window: tuple[int, int, int, torch.Tensor] | None = None  # (matrix, c0, c1, [c1 - c0, in] float32)
        self.windows_loaded = 0

    @property
    def n_rows(self) -> int:
        return self.stack * self.n_out

    def rows(self, idx: np.ndarray | None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``idx[start:stop]`` of the transposed view (rows ``start..stop`` when ``idx`` is None), [k, in]."""
        stop = self.n_rows if stop is None else stop
        sel = np.arange(start, stop) if idx is None else np.asarray(idx[start:stop], dtype=np.int64)
        if sel.size and (sel.min() < 0 or sel.max() >= self.n_rows):
            raise IndexError(f"{self.name}: transposed rows out of range 0..{self.n_rows - 1}")
        out = torch.empty((len(sel), self.n_in), dtype=torch.float32)
        matrix, col = sel // self.n_out, sel % self.n_out
        pending = np.arange(len(sel))
        while pending.size:
            first = pending[0]
            m, c0, c1, win = self._window(int(matrix[first]), int(col[first]))
            inside = (matrix[pending] == m) & (col[pending] >= c0) & (col[pending] < c1)
            hit = pending[inside]
            out[torch.from_numpy(hit)] = win[torch.from_numpy(col[hit] - c0)]
            pending = pending[~inside]
        return out

    def _window(self, m: int, c: int) -> tuple[int, int, int, torch.Tensor]:
        w = self.window
        if w is not None and w[0] == m and w[1] <= c < w[2]:
            return w
        c0 = min(c, self.n_out - self.width)  # a matrix that fits is one window starting at column 0
        c1 = c0 + self.width
        self.window = None  # free the old window before reading the next
        win = torch.empty((c1 - c0, self.n_in), dtype=torch.float32)
        first = m * self.n_in
        for s in range(first, first + self.n_in, self.chunk_rows):
            e = min(first + self.n_in, s + self.chunk_rows)
            x = self.reader.read_rows(self.name, s, e).reshape(e - s, self.n_out)
            win[:, s - first:e - first] = x[:, c0:c1].T
        self.window = (m, c0, c1, win)
        self.windows_loaded += 1
        return self.window


__all__ = ["CHUNK_BYTES", "WINDOW_BYTES", "TransposedRows"]
