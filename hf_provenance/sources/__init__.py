"""Model sources: where a model's bytes come from, hidden behind ``ModelSource`` (see ``base``).

``open_model(ref)`` tries each resolver of ``RESOLVERS`` in order; the first that recognises the ref opens it.
A later Hub source is one more entry in that list; nothing above this package knows which source it got.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from hf_provenance.errors import ModelNotFoundError
from hf_provenance.sources.base import (DTYPES, CardMetadata, ContentId, ModelSource, TensorInfo, TensorReader,
                                        Vocabulary)
from hf_provenance.sources.header import parse_header, parse_header_file, read_header
from hf_provenance.sources.local import LocalSource
from hf_provenance.sources.reader import ByteTransport, LocalTransport, MemoryTransport, RowReader, scale_names

# A resolver returns a source for refs it recognises, None for refs that are not its kind.
Resolver = Callable[..., "ModelSource | None"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def _resolve_local(ref: str, *, allow_pickle: bool = False, **_: Any) -> LocalSource | None:
    """Local folder, HF cache snapshot or single file, when something exists at ``ref``."""
    if not os.path.lexists(os.path.expanduser(ref)):
        return None
    return LocalSource(ref, allow_pickle=allow_pickle)


RESOLVERS: list[Resolver] = [_resolve_local]
from hf_provenance.sources.hub import resolve_hub  # noqa: E402 - local paths first: an existing path wins
RESOLVERS.append(resolve_hub)


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` or ``org/name@revision`` (a ref that does not exist on disk may be meant for the Hub)."""
    return bool(_HUB_ID.match(ref))


def open_model(ref: str, *, allow_pickle: bool = False) -> ModelSource:
    """Open a model by ref.

    Args:
        ref: a folder in HF layout, an HF cache snapshot folder (or its ``models--org--name`` repo folder), or a
            single ``.safetensors`` file.
        allow_pickle: load pickle checkpoints (only with ``torch.load(weights_only=True)``) instead of refusing.

    Returns:
        A ``ModelSource``: config, inventory (headers only), vocab, card, content_id and a lazy row reader.

    Raises:
        ModelNotFoundError: nothing at ``ref`` (Hub ids are not supported yet), or a folder without config/weights.
        InputError (and subclasses): malformed headers, indexes, configs; unsafe paths; pickle files.

    Example:
        >>> src = open_model("path/to/model")              # doctest: +SKIP
        >>> src.reader.read_rows("embeddings.word_embeddings.weight", 0, 2).shape  # doctest: +SKIP
        torch.Size([2, 384])
    """
    ref = str(ref)
    for resolve in RESOLVERS:
        source = resolve(ref, allow_pickle=allow_pickle)
        if source is not None:
            return source
    hint = "; Hub ids are not supported yet" if looks_like_hub_id(ref) else ""
    raise ModelNotFoundError(ref, f"no such file or folder{hint}")


__all__ = ["open_model", "RESOLVERS", "looks_like_hub_id", "LocalSource", "ModelSource", "TensorInfo",
           "TensorReader", "CardMetadata", "ContentId", "Vocabulary", "DTYPES", "parse_header",
           "parse_header_file", "read_header", "RowReader", "ByteTransport", "LocalTransport", "MemoryTransport",
           "scale_names"]
