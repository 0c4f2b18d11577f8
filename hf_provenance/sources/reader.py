"""The row-block reader: k rows of a tensor cost k x row_bytes, whatever the transport.

Bytes are fetched by a :class:`ByteTransport` (``os.preadv`` locally; HTTP Range remotely) into a reusable, growable
``bytearray`` viewed with ``torch.frombuffer`` -- never mmap (mapped pages count as resident memory), never a whole
tensor to get some of its rows. FP8 weights are dequantised with their companion scales, reading only the scale
rows the requested weight rows need:

* ``X.weight_scale_inv`` (DeepSeek-V3 style block scales, shape ``(..., ceil(out/B0), ceil(in/B1))``, block size from
  ``quantization_config["weight_block_size"]``, default [128, 128]): ``w * scale_inv`` per block, as DeepSeek's
  ``weight_dequant`` does.
* ``X.weight_scale`` (compressed-tensors FP8): shape ``(out, 1)``/``(out,)`` per output channel, or one element per
  tensor: ``w * scale``. A block-grid ``weight_scale`` (compressed-tensors block strategy) is applied per block.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
from typing import Any, Mapping, Protocol

import torch

from hf_provenance.errors import InputError, ReadError
from hf_provenance.sources.base import DTYPES, TensorInfo

if sys.byteorder != "little":  # safetensors stores little-endian; frombuffer would misread on big-endian hosts
    raise ImportError("hf_provenance.sources.reader requires a little-endian host")

FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
DEFAULT_BLOCK = (128, 128)
# Suffixes of quantisation scale tensors. The first two are dequantisation companions of "<X>.weight"; the others
# (activation and KV-cache scales of compressed-tensors / FP8 checkpoints) are never applied to weights.
COMPANION_SUFFIXES = ("_scale_inv", "_scale")
OTHER_SCALE_SUFFIXES = (".input_scale", ".output_scale", ".k_scale", ".v_scale")
_GROW = 1 << 20  # buffers grow in whole MiB


class ByteTransport(Protocol):
    """Fetches byte ranges of the files named in ``TensorInfo.file``."""

    def pread_into(self, file: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` entirely with the bytes at ``offset`` of ``file``; raise ReadError on EOF or I/O error."""

    def close(self) -> None: ...


class LocalTransport:
    """``os.preadv`` on one cached file descriptor per file; safe to call from several threads at once.

    Args:
        paths: optional map from ``TensorInfo.file`` to the (already validated) path to open, so that symlinks
            resolved and checked by the source are not followed again.
    """

    concurrent = True  # preadv reads at an explicit offset: no shared file position

    def __init__(self, paths: Mapping[str, str] | None = None):
        self._paths = dict(paths or {})
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._open(file)
                self._fds[file] = fd
            return fd

    def _open(self, file: str) -> int:
        path = self._paths.get(file, file)
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ReadError(file, f"cannot open: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ReadError(file, f"{path} is no longer a regular file")
        return fd

    def pread_into(self, file: str, offset: int, buffer: memoryview) -> None:
        fd, done, want = self._fd(file), 0, len(buffer)
        while done < want:
            try:
                got = os.preadv(fd, [buffer[done:]], offset + done)
            except OSError as exc:
                raise ReadError(file, f"read failed at byte {offset + done}: {exc.strerror}") from None
            if got == 0:
                raise ReadError(file, f"unexpected end of file at byte {offset + done} (expected {want} bytes "
                                      f"from byte {offset}); did the file shrink?")
            done += got

    def advise(self, file: str, spans: list[tuple[int, int]]) -> None:
        """Ask the kernel to read byte spans ahead (``posix_fadvise(WILLNEED)``): sampled blocks scattered over a
        file then arrive while earlier ones are being computed, without reader threads. A hint only."""
        if not hasattr(os, "posix_fadvise"):
            return
        fd = self._fd(file)
        for a, b in spans:
            try:
                os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)
            except OSError:
                return

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class MemoryTransport:
    """Serves files held in memory (test bytes; the opt-in pickle path)."""

    concurrent = True

    def __init__(self, files: Mapping[str, bytes | bytearray | memoryview]):
        self._files = {name: memoryview(data).cast("B") for name, data in files.items()}

    def pread_into(self, file: str, offset: int, buffer: memoryview) -> None:
        data = self._files.get(file)
        if data is None:
            raise ReadError(file, "no such file in memory")
        if offset + len(buffer) > len(data):
            raise ReadError(file, f"unexpected end of file at byte {len(data)} (expected {len(buffer)} bytes "
                                  f"from byte {offset})")
        buffer[:] = data[offset: offset + len(buffer)]

    def close(self) -> None:
        self._files = {}


def is_scale_name(name: str, inventory: Mapping[str, TensorInfo]) -> bool:
    """True for quantisation scales: companions of a weight in ``inventory`` and activation/KV-cache scales."""
    if name.endswith(OTHER_SCALE_SUFFIXES):
        return True
    return _companion_owner(name, inventory) is not None


def scale_names(inventory: Mapping[str, TensorInfo]) -> frozenset[str]:
    """Every tensor of ``inventory`` that is a quantisation scale (see :func:`is_scale_name`)."""
    return frozenset(n for n in inventory if is_scale_name(n, inventory))


def _companion_owner(name: str, inventory: Mapping[str, TensorInfo]) -> str | None:
    for suffix in COMPANION_SUFFIXES:
        if name.endswith(suffix):
            owner = name[: -len(suffix)]
            if owner in inventory and owner.endswith("weight"):
                return owner
    return None


def block_size(quantization_config: Mapping[str, Any] | None) -> tuple[int, int]:
    """``weight_block_size`` of a quantization_config, default (128, 128); InputError when malformed."""
    raw = (quantization_config or {}).get("weight_block_size")
    if raw is None:
        return DEFAULT_BLOCK
    if (isinstance(raw, (list, tuple)) and len(raw) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in raw)):
        return int(raw[0]), int(raw[1])
    raise InputError("quantization_config", f"weight_block_size must be two positive integers, got {raw!r}")


class RowReader:
    """Reads row blocks of the tensors of ``inventory`` through ``transport`` (implements ``TensorReader``).

    Each thread reads into its own reusable buffers, so several threads may share a reader (the measurement's
    workers do). Reads run concurrently on transports that declare ``concurrent = True`` (``preadv`` at an offset
    is), and are serialised by a lock on the others.

    Example:
        >>> reader = RowReader(source.inventory, LocalTransport())      # doctest: +SKIP
        >>> reader.read_rows("model.embed_tokens.weight", 0, 64).shape  # doctest: +SKIP
        torch.Size([64, 4096])
    """

    def __init__(self, inventory: Mapping[str, TensorInfo], transport: ByteTransport,
                 quantization_config: Mapping[str, Any] | None = None):
        self.inventory = dict(inventory)
        self.transport = transport
        self.quantization_config = dict(quantization_config or {})
        self.block = block_size(self.quantization_config)
        self.bytes_read = 0
        self.scale_names = scale_names(self.inventory)
        self._local = threading.local()  # per thread: [weight rows, scale rows] buffers
        self._lock = threading.Lock() if not getattr(transport, "concurrent", False) else contextlib.nullcontext()
        self._count_lock = threading.Lock()

    # --- public -------------------------------------------------------------------------------------------
    def scale_companion(self, name: str) -> str | None:
        """Name of the scale tensor applied to FP8 weight ``name`` by :meth:`read_rows`, or None."""
        info = self._info(name)
        if info.dtype not in FP8_DTYPES:
            return None
        for suffix in COMPANION_SUFFIXES:
            if name + suffix in self.inventory:
                return name + suffix
        return None

    def scale_kind(self, name: str) -> str | None:
        """How :meth:`read_rows` dequantises ``name``: "block", "channel", "tensor", or None (no scale)."""
        companion = self.scale_companion(name)
        return None if companion is None else self._scale_plan(name, companion)[0]

    def is_scale(self, name: str) -> bool:
        return name in self.scale_names

    def read_raw(self, name: str, start: int = 0, stop: int | None = None, *, copy: bool = True) -> torch.Tensor:
        """Rows [start, stop) in the stored dtype, shape (k, row_len).

        ``copy=False`` returns a view of the calling thread's reusable buffer, valid only until that thread's next
        read from this reader: for a caller that consumes it at once (hash it, convert it).
        """
        info = self._info(name)
        start, stop = self._range(info, start, stop)
        with self._lock:
            rows = self._rows(info, start, stop, 0)
            return rows.clone() if copy else rows

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) decoded to float32, FP8 scales applied, shape (k, row_len)."""
        info = self._info(name)
        start, stop = self._range(info, start, stop)
        companion = self.scale_companion(name)
        with self._lock:
            raw = self._rows(info, start, stop, 0)
            out = raw.to(torch.float32)
            if out.data_ptr() == raw.data_ptr() and raw.numel():
                out = out.clone()  # float32 on disk: do not hand out a view of the reused buffer
            if companion is not None and stop > start:
                out.mul_(self._scales(info, companion, start, stop))
        return out

    def release(self) -> None:
        """Drop the calling thread's reusable buffers (they grow to the largest block read; a thread's buffers
        also go when the thread ends)."""
        self._local.buffers = [bytearray(), bytearray()]

    def close(self) -> None:
        self.release()
        self.transport.close()

    # --- internals ----------------------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        try:
            return self.inventory[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r}") from None

    @staticmethod
    def _range(info: TensorInfo, start: int, stop: int | None) -> tuple[int, int]:
        stop = info.n_rows if stop is None else stop
        if not (0 <= start <= stop <= info.n_rows):
            raise ValueError(f"{info.name}: rows [{start}, {stop}) outside [0, {info.n_rows})")
        return int(start), int(stop)

    def _torch_dtype(self, info: TensorInfo) -> torch.dtype:
        dtype = DTYPES[info.dtype][1]
        if dtype is None:
            raise InputError(info.file, f"tensor {info.name!r}: dtype {info.dtype} is not supported by torch "
                                        f"{torch.__version__}")
        return dtype

    @property
    def _buffers(self) -> list[bytearray]:
        bufs = getattr(self._local, "buffers", None)
        if bufs is None:
            bufs = self._local.buffers = [bytearray(), bytearray()]
        return bufs

    def _fetch(self, info: TensorInfo, first_byte: int, nbytes: int, slot: int) -> memoryview:
        buf = self._buffers[slot]
        if len(buf) < nbytes:
            buf = self._buffers[slot] = bytearray(-(-nbytes // _GROW) * _GROW)
        view = memoryview(buf)[:nbytes]
        self.transport.pread_into(info.file, info.start + first_byte, view)
        with self._count_lock:
            self.bytes_read += nbytes
        return view

    def _rows(self, info: TensorInfo, start: int, stop: int, slot: int) -> torch.Tensor:
        """A view of the reusable buffer holding rows [start, stop); valid until the next read into ``slot``."""
        dtype, k = self._torch_dtype(info), stop - start
        nbytes = k * info.row_bytes
        if nbytes == 0:
            return torch.empty((k, info.row_len), dtype=dtype)
        self._fetch(info, start * info.row_bytes, nbytes, slot)
        flat = torch.frombuffer(self._buffers[slot], dtype=dtype, count=k * info.row_len)
        return flat.view(k, info.row_len)

    def _elements(self, info: TensorInfo, first: int, last: int, slot: int) -> torch.Tensor:
        """Elements [first, last) of a tensor in flat order, as float32 (used for per-channel scales)."""
        dtype, n = self._torch_dtype(info), last - first
        self._fetch(info, first * info.itemsize, n * info.itemsize, slot)
        return torch.frombuffer(self._buffers[slot], dtype=dtype, count=n).to(torch.float32)

    def _scale_plan(self, name: str, companion: str) -> tuple[str, tuple[int, ...]]:
        weight, scale = self.inventory[name], self.inventory[companion]
        if scale.dtype not in ("F32", "BF16", "F16", "F64"):
            raise InputError(scale.file, f"tensor {companion!r}: scale dtype {scale.dtype} is not a float type")
        wshape, sshape = weight.shape, scale.shape
        if scale.numel == 1:
            return "tensor", sshape
        if len(wshape) >= 2:
            if sshape in (wshape[:-1], wshape[:-1] + (1,)):
                return "channel", sshape
            b0, b1 = self.block
            grid = wshape[:-2] + (-(-wshape[-2] // b0), -(-wshape[-1] // b1))
            if sshape == grid:
                return "block", sshape
            expected = (f"{_shape(grid)} (blocks {b0}x{b1}), {_shape(wshape[:-1] + (1,))} (per channel) or "
                        "one element")
        else:
            expected = "one element"
        raise InputError(scale.file, f"tensor {companion!r}: scale shape {_shape(sshape)} does not fit weight "
                                     f"{name!r} of shape {_shape(wshape)}; expected {expected}")

    def _scales(self, info: TensorInfo, companion: str, start: int, stop: int) -> torch.Tensor:
        """Scales matching weight rows [start, stop), broadcastable to (k, row_len)."""
        kind, _ = self._scale_plan(info.name, companion)
        scale = self.inventory[companion]
        if kind == "tensor":
            return self._elements(scale, 0, 1, 1).reshape(())
        if kind == "channel":
            return self._elements(scale, start, stop, 1).reshape(-1, 1)
        b0, b1 = self.block
        out_dim, in_dim = info.shape[-2], info.shape[-1]
        blocks_per_matrix = -(-out_dim // b0)
        rows = torch.arange(start, stop)
        scale_row = (rows // out_dim) * blocks_per_matrix + (rows % out_dim) // b0
        first, last = int(scale_row[0]), int(scale_row[-1]) + 1
        grid = self._rows(scale, first, last, 1).to(torch.float32)
        per_row = grid.index_select(0, scale_row - first)
        return per_row.repeat_interleave(b1, dim=1)[:, :in_dim]


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")" if len(shape) != 1 else f"({shape[0]},)"


__all__ = ["ByteTransport", "LocalTransport", "MemoryTransport", "RowReader", "block_size", "is_scale_name",
           "scale_names", "FP8_DTYPES"]
