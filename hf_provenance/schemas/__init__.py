"""JSON Schemas (draft 2020-12) of the documents the CLI writes, shipped inside the package.

    >>> from hf_provenance import schemas
    >>> schemas.load("compare")["properties"]["schema"]["const"]
    'hf-provenance.compare/1'
    >>> try:
    ...     schemas.validate({"schema": "hf-provenance.compare/2"})
    ... except schemas.SchemaError as exc:
    ...     print(exc.path, "|", exc.message)
    schema | unsupported version; this tool writes hf-provenance.compare/1

Each document names its schema in its ``"schema"`` field (``hf-provenance.<name>/<major>``); ``validate`` picks the
schema from it. Validation needs ``jsonschema``; without it ``validate`` only checks the ``schema`` field and the
top-level required keys (and says so through ``FULL_VALIDATION``).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

NAMES = ("inspect", "arch", "compare")
PREFIX = "hf-provenance."

try:  # jsonschema is a test dependency; the CLI validates fully whenever it is installed
    import jsonschema as _jsonschema
except ImportError:  # pragma: no cover - exercised only in installs without jsonschema
    _jsonschema = None

FULL_VALIDATION = _jsonschema is not None


class SchemaError(ValueError):
    """Raised when a document does not match its schema; ``path`` is where (``comparisons/0/verdict``)."""

    def __init__(self, schema: str, path: str, message: str):
        self.schema, self.path, self.message = schema, path, message
        super().__init__(f"does not match schema {schema} at {path or '(top level)'}: {message}")


def _name(name: str) -> str:
    """'compare', 'compare/1' or 'hf-provenance.compare/1' -> 'compare'."""
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    short = short.split("/")[0]
    if short not in NAMES:
        raise KeyError(f"no schema {name!r}; have {', '.join(PREFIX + n + '/1' for n in NAMES)}")
    return short


@functools.lru_cache(maxsize=None)
def _load_text(short: str) -> str:
    return resources.files(__name__).joinpath(f"{short}.json").read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """The schema ``name`` ('inspect', 'arch', 'compare', or a document's ``"schema"`` value), as a fresh dict."""
    return json.loads(_load_text(_name(name)))


@functools.lru_cache(maxsize=None)
def _validator(short: str):
    """The validator of a shipped schema (tests check each schema, and its inlined form, against the metaschema;
    doing it here cost every run 0.03-0.1 s)."""
    schema = load(short)
    return _jsonschema.Draft202012Validator(_inline_refs(schema, schema.get("$defs", {})))


def _inline_refs(node, defs: dict):
    """The schema with each local ``{"$ref": "#/$defs/x"}`` replaced by the definition itself (ours are not
    recursive): the same constraints, without a reference lookup per array item (a third of the time it took to
    validate a report of 200 tensors)."""
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _inline_refs(v, defs) for k, v in node.items() if k != "$ref"}
    ref = node.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
        return out if ref is None else {**out, "$ref": ref}
    target = _inline_refs(defs[ref[len("#/$defs/"):]], defs)
    return {**out, "allOf": [*out.get("allOf", []), target]} if out else target


def validate(doc: dict[str, Any]) -> None:
    """Check ``doc`` against the schema its ``"schema"`` field names.

    Raises:
        SchemaError: the field is missing or unknown, or the document does not match (first error, best match).
    """
    tag = doc.get("schema") if isinstance(doc, dict) else None
    if not isinstance(tag, str):
        raise SchemaError("(none)", "schema", "the document has no \"schema\" field")
    try:
        short = _name(tag)
    except KeyError as exc:
        raise SchemaError(tag, "schema", str(exc.args[0])) from None
    expected = load(short)["properties"]["schema"]["const"]
    if tag != expected:
        raise SchemaError(tag, "schema", f"unsupported version; this tool writes {expected}")
    if _jsonschema is None:  # pragma: no cover
        missing = [k for k in load(short).get("required", []) if k not in doc]
        if missing:
            raise SchemaError(tag, missing[0], "required key missing")
        return
    error = _jsonschema.exceptions.best_match(_validator(short).iter_errors(doc))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path)
        raise SchemaError(tag, path, error.message if len(error.message) < 300 else error.message[:297] + "...")


__all__ = ["NAMES", "SchemaError", "load", "validate", "FULL_VALIDATION"]
