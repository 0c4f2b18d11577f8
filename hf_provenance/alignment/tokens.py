"""Token strings across tokenizer families: every ordinary token becomes ``(bytes, word_start)``.

Tokenizer families write the same piece of text differently:

- ``bytelevel`` (GPT-2 byte-level BPE: GPT-2, Llama 3, Qwen, DeepSeek): each byte is written as one printable
  character (GPT-2's ``bytes_to_unicode`` table: printable Latin-1 bytes stand for themselves, the others are
  shifted to U+0100..), so a space is ``Ġ`` and a newline ``Ċ``; a token starting with a space starts a word.
- ``metaspace`` (SentencePiece: Llama 1/2, Mistral, Gemma): a space is ``▁`` and a leading ``▁`` starts a word;
  byte-fallback tokens ``<0xNN>`` stand for one byte.
- ``wordpiece`` (BERT): a plain token starts a word, ``##`` marks a continuation.

:func:`normalise` maps a token to the bytes it decodes to (without the word-start space) and whether it starts a
word; :func:`spell` is its inverse. Special and added tokens (``Vocabulary.special``) are not normalised: they are
matched by exact string (see :mod:`hf_provenance.alignment.vocab`).

The family is detected (:func:`detect`) from the ``tokenizer.json`` structure when it is at hand (model type,
pre-tokenizer, normalizer, decoder), else from the vocabulary file's format (``vocab.txt`` is WordPiece's,
``tokenizer.model`` SentencePiece's), else from the strings themselves (the share of ``Ġ``/``▁``/``##`` marks).
Every detection records how it was made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

BYTELEVEL, METASPACE, WORDPIECE, UNKNOWN = "bytelevel", "metaspace", "wordpiece", "unknown"
KINDS = (BYTELEVEL, METASPACE, WORDPIECE, UNKNOWN)
META = "\u2581"  # ▁
WORDPIECE_PREFIX = "##"
BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Share of ordinary tokens that must carry a family's mark for string-based detection to name that family.
MIN_MARK_SHARE = 0.02


def _byte_table() -> dict[int, str]:
    """GPT-2's printable byte map: bytes '!'..'~', '¡'..'¬', '®'..'ÿ' stand for themselves; the remaining 68 bytes
    take U+0100, U+0101, ... in byte order (so 0x20 -> 'Ġ', 0x0A -> 'Ċ')."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


BYTE_TO_CHAR: dict[int, str] = _byte_table()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}


def normalise(token: str, kind: str) -> tuple[bytes, bool]:
    """The bytes a token decodes to (its word-start space removed) and whether it starts a word.

    Args:
        token: an ordinary token string (special tokens are matched by exact string, never normalised).
        kind: ``bytelevel``, ``metaspace``, ``wordpiece`` or ``unknown`` (UTF-8 bytes of the string, no word start).

    Example:
        >>> normalise("Ġhello", "bytelevel"), normalise("▁hello", "metaspace"), normalise("hello", "wordpiece")
        ((b'hello', True), (b'hello', True), (b'hello', True))
        >>> normalise("##lo", "wordpiece"), normalise("<0x0A>", "metaspace"), normalise("Ċ", "bytelevel")
        ((b'lo', False), (b'\\n', False), (b'\\n', False))
    """
    if kind == BYTELEVEL:
        try:
            data = bytes(CHAR_TO_BYTE[c] for c in token)
        except KeyError:  # not in the byte alphabet: a literal added token
            return token.encode("utf-8"), False
        if data.startswith(b" "):
            return data[1:], True
        return data, False
    if kind == METASPACE:
        m = BYTE_TOKEN.match(token)
        if m is not None:
            return bytes([int(m.group(1), 16)]), False
        if token.startswith(META):
            return token[1:].replace(META, " ").encode("utf-8"), True
        return token.replace(META, " ").encode("utf-8"), False
    if kind == WORDPIECE:
        if token.startswith(WORDPIECE_PREFIX) and len(token) > len(WORDPIECE_PREFIX):
            return token[len(WORDPIECE_PREFIX):].encode("utf-8"), False
        return token.encode("utf-8"), True
    if kind == UNKNOWN:
        return token.encode("utf-8"), False
    raise ValueError(f"tokenizer kind {kind!r} is not one of {list(KINDS)}")


def spell(data: bytes, word_start: bool, kind: str) -> str:
    """The token string of ``kind`` that normalises to ``(data, word_start)`` (inverse of :func:`normalise`).

    A leading space is a word start: ``(b" x", False)`` is written as the token ``(b"x", True)``.
    Raises ``ValueError`` when ``kind`` cannot write it (a lone non-UTF-8 byte that starts a word in ``metaspace``,
    any non-UTF-8 bytes or an empty continuation in ``wordpiece``).

    Example:
        >>> spell(b"hello", True, "bytelevel"), spell(b"hello", False, "wordpiece")
        ('Ġhello', '##hello')
    """
    if kind == BYTELEVEL:
        return "".join(BYTE_TO_CHAR[b] for b in ((b" " if word_start else b"") + data))
    if kind == METASPACE:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if len(data) == 1 and not word_start:
                return f"<0x{data[0]:02X}>"
            raise ValueError(f"metaspace cannot spell {data!r} (word_start={word_start})") from None
        return (META if word_start else "") + text.replace(" ", META)
    if kind == WORDPIECE:
        if not data and not word_start:
            raise ValueError("wordpiece cannot spell an empty continuation ('##' is a word-start token)")
        return ("" if word_start else WORDPIECE_PREFIX) + data.decode("utf-8")
    raise ValueError(f"cannot spell tokens of kind {kind!r}; use one of {[BYTELEVEL, METASPACE, WORDPIECE]}")


@dataclass(frozen=True)
class TokenizerKind:
    """A detected tokenizer family and how it was detected (``tokenizer.json: pre_tokenizer ByteLevel`` ...)."""

    kind: str
    how: str

    @property
    def known(self) -> bool:
        return self.kind != UNKNOWN

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "how": self.how}


def _walk(node: Any) -> Iterable[dict]:
    """Every dict in a tokenizer.json component (Sequence pre-tokenizers and decoders nest)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _mentions_meta(d: dict) -> bool:
    """A Replace/Prepend/Strip step that writes or reads '▁' (SentencePiece converted to tokenizers)."""
    values = [d.get("content"), d.get("prepend"), d.get("replacement")]
    pattern = d.get("pattern")
    if isinstance(pattern, dict):
        values.extend(pattern.values())
    return any(isinstance(v, str) and META in v for v in values)


def from_tokenizer_json(doc: Any) -> TokenizerKind | None:
    """The family from a ``tokenizer.json`` document's model, normalizer, pre-tokenizer and decoder; None when
    they do not say (a WordLevel model without pre-tokenizer, say)."""
    if not isinstance(doc, dict):
        return None
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    parts = {name: list(_walk(doc.get(name))) for name in ("pre_tokenizer", "decoder", "normalizer")}
    for name in ("pre_tokenizer", "decoder"):
        if any(d.get("type") == "ByteLevel" for d in parts[name]):
            return TokenizerKind(BYTELEVEL, f"tokenizer.json: {name} ByteLevel")
    for name in ("pre_tokenizer", "decoder"):
        if any(d.get("type") == "Metaspace" for d in parts[name]):
            return TokenizerKind(METASPACE, f"tokenizer.json: {name} Metaspace")
    for name in ("normalizer", "decoder"):
        if any(_mentions_meta(d) for d in parts[name]):
            return TokenizerKind(METASPACE, f"tokenizer.json: {name} replaces spaces with '▁'")
    prefix = model.get("continuing_subword_prefix")
    if model.get("type") == "WordPiece" or any(d.get("type") == "WordPiece" for d in parts["decoder"]):
        if prefix not in (None, WORDPIECE_PREFIX):
            return TokenizerKind(UNKNOWN, f"tokenizer.json: WordPiece with prefix {prefix!r} (only '##' is known)")
        return TokenizerKind(WORDPIECE, "tokenizer.json: model WordPiece")
    return None


def from_strings(tokens: Iterable[str], special: Iterable[str] = ()) -> TokenizerKind:
    """The family from the share of ordinary tokens carrying each family's mark (``Ġ``, ``▁``, ``##``)."""
    skip = set(special)
    n = g = m = h = 0
    for t in tokens:
        if t in skip:
            continue
        n += 1
        if t.startswith("Ġ"):
            g += 1
        elif t.startswith(META):
            m += 1
        elif t.startswith(WORDPIECE_PREFIX) and len(t) > 2:
            h += 1
    if n == 0:
        return TokenizerKind(UNKNOWN, "strings: no ordinary tokens")
    shares = {BYTELEVEL: g / n, METASPACE: m / n, WORDPIECE: h / n}
    kind, share = max(shares.items(), key=lambda kv: kv[1])
    mark = {BYTELEVEL: "'Ġ'", METASPACE: "'▁'", WORDPIECE: "'##'"}[kind]
    if share < MIN_MARK_SHARE:
        return TokenizerKind(UNKNOWN, f"strings: no family mark on {MIN_MARK_SHARE:.0%} of {n} tokens")
    return TokenizerKind(kind, f"strings: {share:.0%} of {n} ordinary tokens start with {mark}")


def detect(vocab, doc: Any = None) -> TokenizerKind:
    """The family of a :class:`~hf_provenance.sources.base.Vocabulary`: from ``doc`` (its ``tokenizer.json``,
    when the caller has it) or a ``tokenizer_kind`` the source attached to the vocabulary (a TokenizerKind read from
    tokenizer.json when it was parsed), else the file format, else the strings."""
    found = from_tokenizer_json(doc) if doc is not None else getattr(vocab, "tokenizer_kind", None)
    if found is not None:
        return found
    if vocab.kind == "vocab.txt":
        return TokenizerKind(WORDPIECE, "vocab.txt (WordPiece's vocabulary format)")
    if vocab.kind == "tokenizer.model":
        return TokenizerKind(METASPACE, "tokenizer.model (SentencePiece)")
    return from_strings(vocab.tokens, vocab.special)


__all__ = ["KINDS", "BYTELEVEL", "METASPACE", "WORDPIECE", "UNKNOWN", "BYTE_TO_CHAR", "CHAR_TO_BYTE",
           "TokenizerKind", "normalise", "spell", "detect", "from_tokenizer_json", "from_strings"]
