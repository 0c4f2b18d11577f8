"""Keep the streamed blocks from pinning memory.

glibc's malloc, once it has freed a large mmapped block, raises its mmap threshold and serves later blocks of that
size from its heap arenas (one per worker thread); what is freed there stays resident. Over a 3B-parameter model
that grew the resident set by ~50 MiB per layer (1.5 GiB peak). ``malloc_trim(0)`` hands the free pages back (it
also releases free chunks inside the heaps), which keeps the peak flat in model size. It is called between tensors,
but only once the resident set has grown by ``SLACK`` since the last call: trimming after every tensor made the
next blocks fault their pages in again (a 3B full compare went from 22 s to 29 s). Pinning the mmap threshold
instead would map and fault in every block (2.5x slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys


@functools.lru_cache(maxsize=1)
def _trim():
    if not sys.platform.startswith("linux"):
        return None
    # the process's own symbols first: ctypes.util.find_library spawns ldconfig (tens of ms), so it comes last
    for name in (None, "libc.so.6", "find"):
        try:
            return ctypes.CDLL(ctypes.util.find_library("c") if name == "find" else name).malloc_trim
        except (OSError, AttributeError, TypeError):  # musl and others have no malloc_trim: nothing to hand back
            continue
    return None


SLACK = 256 << 20  # bytes the resident set may grow by before the free heap pages are handed back
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_floor = [0]


def _resident() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``) once the resident set has grown by
    ``SLACK`` since the last time; a no-op where there is no glibc."""
    trim = _trim()
    if trim is None:
        return
    rss = _resident()
    if rss > _floor[0] + SLACK:
        trim(0)
        _floor[0] = _resident()


__all__ = ["release_free_memory"]
