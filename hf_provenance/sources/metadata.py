"""What a model folder declares besides its weights: config, card YAML, quantisation, adapter, vocabulary.

Files are read as data only (JSON, YAML via ``yaml.safe_load``, sentencepiece protobuf); nothing from the folder is
imported or executed. A malformed card or tokenizer is a note, never a crash: they are claims, not evidence.
A malformed config.json is an error, because every later stage depends on it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from hf_provenance.errors import ConfigError, InputError, PathEscapeError
from hf_provenance.sources.base import CardMetadata, Vocabulary
from hf_provenance.sources.paths import checked_file

MAX_METADATA_BYTES = 512 * 2**20  # tokenizer.json of large-vocabulary models reaches tens of MB


def read_text(path: str, roots: tuple[str, ...], error: type[InputError] = InputError) -> str:
    """Text of a metadata file after the path checks; ``error(path, ...)`` when too large or not UTF-8."""
    real = checked_file(path, roots)
    size = os.path.getsize(real)
    if size > MAX_METADATA_BYTES:
        raise error(path, f"{size} bytes, above the {MAX_METADATA_BYTES}-byte limit for metadata files")
    with open(real, "rb") as handle:
        data = handle.read(MAX_METADATA_BYTES + 1)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_json(path: str, roots: tuple[str, ...], error: type[InputError] = InputError) -> Any:
    """Parsed JSON of a metadata file; ``error(path, "not valid JSON (...)")`` when it does not parse."""
    text = read_text(path, roots, error)
    try:
        return json.loads(text)
    except RecursionError:
        raise error(path, "not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise error(path, f"not valid JSON ({exc})") from None


def _read_json_object(folder: str, name: str, roots: tuple[str, ...]) -> dict[str, Any] | None:
    """``folder/name`` as a dict, None when absent; ConfigError when it is not a JSON object."""
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        return None
    doc = read_json(path, roots, ConfigError)
    if not isinstance(doc, dict):
        raise ConfigError(path, f"must be a JSON object, got {type(doc).__name__}")
    return doc


def read_config(folder: str, roots: tuple[str, ...]) -> dict[str, Any] | None:
    """config.json as a dict, None when absent; ConfigError when it is not a JSON object."""
    return _read_json_object(folder, "config.json", roots)


def read_adapter(folder: str, roots: tuple[str, ...]) -> dict[str, Any] | None:
    """adapter_config.json (PEFT) as a dict, None when absent; ConfigError when it is not a JSON object."""
    return _read_json_object(folder, "adapter_config.json", roots)


def quantization_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    qc = (config or {}).get("quantization_config")
    return qc if isinstance(qc, dict) else None


def quantization_method(config: dict[str, Any] | None) -> str | None:
    """``config["quantization_config"]["quant_method"]``, or None."""
    method = (quantization_config(config) or {}).get("quant_method")
    return method if isinstance(method, str) else None


# --- model card ------------------------------------------------------------------------------------------------
def parse_card(text: str, where: str) -> tuple[CardMetadata, list[str]]:
    """Card metadata from README text's YAML front matter, plus notes on anything ignored. Never raises."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if not lines or lines[0].rstrip() != "---":
        return CardMetadata(), []
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip() in ("---", "...")), None)
    if end is None:
        return CardMetadata(), [f"{where}: YAML front matter has no closing '---'; card metadata ignored"]
    try:
        doc = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CardMetadata(), [f"{where}: YAML front matter is not valid YAML ({first}); card metadata ignored"]
    except RecursionError:
        return CardMetadata(), [f"{where}: YAML front matter nested too deeply; card metadata ignored"]
    if doc is None:
        return CardMetadata(), []
    if not isinstance(doc, dict):
        return CardMetadata(), [f"{where}: YAML front matter is a {type(doc).__name__}, not a mapping; "
                                "card metadata ignored"]
    notes: list[str] = []
    base = doc.get("base_model")
    if base is None:
        bases: tuple[str, ...] = ()
    elif isinstance(base, str):
        bases = (base.strip(),) if base.strip() else ()
    elif isinstance(base, list):
        bases = tuple(b.strip() for b in base if isinstance(b, str) and b.strip())
        if len(bases) != len(base):
            notes.append(f"{where}: base_model entries that are not names were ignored")
    else:
        bases = ()
        notes.append(f"{where}: base_model is a {type(base).__name__}, not a name or a list; ignored")
    return CardMetadata(base_model=bases, base_model_relation=_str_field(doc, "base_model_relation", where, notes),
                        license=_str_field(doc, "license", where, notes), raw=doc), notes


def _str_field(doc: dict[str, Any], key: str, where: str, notes: list[str]) -> str | None:
    value = doc.get(key)
    if value is None or isinstance(value, str):
        return value.strip() if isinstance(value, str) else None
    notes.append(f"{where}: {key} is a {type(value).__name__}, not a string; ignored")
    return None


def read_card(folder: str, roots: tuple[str, ...]) -> tuple[CardMetadata, list[str]]:
    path = os.path.join(folder, "README.md")
    if not os.path.lexists(path):
        return CardMetadata(), []
    try:
        text = read_text(path, roots)
    except PathEscapeError:
        raise
    except InputError as exc:  # unreadable card: a note, the weights are still comparable
        return CardMetadata(), [f"{exc}; card metadata ignored"]
    return parse_card(text, path)


# --- vocabulary ------------------------------------------------------------------------------------------------
def vocab_from_tokenizer_json(doc: Any) -> Vocabulary | None:
    """Vocabulary of a tokenizers ``tokenizer.json`` document: model.vocab plus added_tokens; None if absent."""
    model = doc.get("model") if isinstance(doc, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    tokens: dict[str, int] = {}
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        for token, idx in vocab.items():
            if not (isinstance(idx, int) and not isinstance(idx, bool)):
                return None
            tokens[token] = idx
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        for idx, entry in enumerate(vocab):
            if not (isinstance(entry, list) and entry and isinstance(entry[0], str)):
                return None
            tokens[entry[0]] = idx
    else:
        return None
    special = set()
    for added in doc.get("added_tokens") or []:
        if not isinstance(added, dict):
            continue
        content, idx = added.get("content"), added.get("id")
        if isinstance(content, str) and isinstance(idx, int) and not isinstance(idx, bool):
            tokens[content] = idx
            if added.get("special"):
                special.add(content)
    return Vocabulary("tokenizer.json", tokens, frozenset(special))


def vocab_from_vocab_txt(text: str) -> Vocabulary:
    """One token per line, id = line number (as BERT's WordPiece vocab.txt; a repeated token keeps its last id)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return Vocabulary("vocab.txt", {token: idx for idx, token in enumerate(lines)})


def read_vocab(folder: str, roots: tuple[str, ...]) -> tuple[Vocabulary | None, list[str]]:
    """The first of tokenizer.json, vocab.txt, tokenizer.model that gives a vocabulary; notes say what failed."""
    notes: list[str] = []
    path = os.path.join(folder, "tokenizer.json")
    if os.path.lexists(path):
        try:
            vocab = vocab_from_tokenizer_json(read_json(path, roots))
        except PathEscapeError:
            raise
        except InputError as exc:
            vocab, notes = None, notes + [f"{exc}; vocabulary not read from it"]
        else:
            if vocab is not None:
                return vocab, notes
            notes.append(f"{path}: no model.vocab in a known format; vocabulary not read from it")
    path = os.path.join(folder, "vocab.txt")
    if os.path.lexists(path):
        try:
            return vocab_from_vocab_txt(read_text(path, roots)), notes
        except PathEscapeError:
            raise
        except InputError as exc:
            notes.append(f"{exc}; vocabulary not read from it")
    path = os.path.join(folder, "tokenizer.model")
    if os.path.lexists(path):
        vocab, note = _vocab_from_sentencepiece(path, roots)
        if note:
            notes.append(note)
        if vocab is not None:
            return vocab, notes
    return None, notes


def _vocab_from_sentencepiece(path: str, roots: tuple[str, ...]) -> tuple[Vocabulary | None, str | None]:
    try:
        import sentencepiece
    except ImportError:
        return None, f"{path}: sentencepiece is not installed; vocabulary not read (pip install sentencepiece)"
    try:
        real = checked_file(path, roots)
        processor = sentencepiece.SentencePieceProcessor(model_file=real)
        n = processor.get_piece_size()
        tokens = {processor.id_to_piece(i): i for i in range(n)}
        special = frozenset(processor.id_to_piece(i) for i in range(n)
                            if processor.is_control(i) or processor.is_unknown(i))
    except PathEscapeError:
        raise
    except InputError as exc:
        return None, f"{exc}; vocabulary not read"
    except Exception as exc:  # noqa: BLE001 - a corrupt protobuf is a note, not a crash
        return None, f"{path}: sentencepiece could not load it ({exc}); vocabulary not read"
    return Vocabulary("tokenizer.model", tokens, special), None
