"""Every error the tool raises on purpose.

Each class says when it is raised, carries the file or ref it concerns, and subclasses the builtin a generic
handler would expect. ``exit_code`` follows the contract in DESIGN (2 usage/input, 3 runtime/I-O).
The CLI turns any of them into one line: ``hf-provenance: <where>: <problem>``.
"""

from __future__ import annotations


class ProvenanceError(Exception):
    """Base class. ``where`` names the file, tensor or ref; ``problem`` says what is wrong and how to fix it."""

    exit_code = 3

    def __init__(self, where: str | object, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class UsageError(ProvenanceError, ValueError):
    """Raised when the command line asks for something impossible (missing --base with no declared base...)."""

    exit_code = 2


class InputError(ProvenanceError, ValueError):
    """Raised when a model file, folder or config is malformed or unsupported."""

    exit_code = 2


class ModelNotFoundError(InputError, FileNotFoundError):
    """Raised when a ref names no folder, file or repo, or a folder holds no weights."""


class HeaderError(InputError):
    """Raised when a safetensors header is malformed (length, JSON, dtype, offsets, shapes, names)."""


class LFSPointerError(InputError):
    """Raised when a weight file is a Git LFS pointer instead of the weights it points to."""


class UnsafeFormatError(InputError):
    """Raised for pickle checkpoints (.bin/.pt/.pth/.ckpt), which could execute code when loaded."""


class PathEscapeError(InputError, PermissionError):
    """Raised when an index or symlink points outside the model folder (or the HF cache repo's blobs/)."""


class ConfigError(InputError):
    """Raised when config.json is missing, not JSON, or contradicts itself or the tensor shapes."""


class IndexError_(InputError):
    """Raised when a sharded index disagrees with its shards (missing shard, tensor absent or unlisted)."""


class RemoteError(ProvenanceError, ConnectionError):
    """Raised when the Hub (or HF_ENDPOINT) cannot be reached after retries; never turned into a verdict."""

    exit_code = 3


class ReadError(ProvenanceError, OSError):
    """Raised when reading bytes fails mid-run (disk error, file shrank)."""

    exit_code = 3


class Interrupted(ProvenanceError, KeyboardInterrupt):
    """Raised when SIGINT/SIGTERM arrives; outputs in progress are discarded."""

    exit_code = 130
