"""JSON output: validated against the document's schema, strict JSON (no NaN/Infinity), written atomically.

    text = dumps(report.to_dict())       # validates; raises before anything is written
    write_json("report.json", text)       # temp file + fsync + rename; "-" writes to stdout

Split in two so a command can serialise and validate first, render its terminal output, and write the file last:
when any step fails there is no JSON file (and an older file at that path is left as it was).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from hf_provenance import schemas
from hf_provenance.atomic import write_text
from hf_provenance.errors import ProvenanceError

STDOUT = "-"


class OutputError(ProvenanceError):
    """Raised when a report cannot be written as valid JSON (a value is NaN, or it does not match its schema).

    That is a bug in hf-provenance, not in the input: exit code 3, and nothing is written.
    """

    exit_code = 3


def dumps(doc: dict[str, Any], *, where: str = "JSON output", validate: bool = True) -> str:
    """Serialise ``doc`` as strict JSON (``allow_nan=False``) after checking it against its schema.

    Raises:
        OutputError: a non-finite number, a value JSON cannot hold, or a schema mismatch.
    """
    try:
        text = json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    except (ValueError, TypeError) as exc:
        raise OutputError(where, f"the report cannot be written as strict JSON ({exc}); nothing written "
                                 "(this is a bug in hf-provenance: please report it)") from None
    if validate:
        try:
            schemas.validate(doc)
        except schemas.SchemaError as exc:
            raise OutputError(where, f"the report {exc}; nothing written (this is a bug in hf-provenance: please "
                                     "report it)") from None
    return text


def write_json(target: str, text: str, *, stdout=None) -> None:
    """Write serialised JSON to ``target`` atomically, or to stdout when ``target`` is ``-``.

    Raises:
        OutputError: the file cannot be written (exit code 3); no partial file is left behind.
    """
    if target == STDOUT:
        out = stdout or sys.stdout
        out.write(text)
        out.flush()
        return
    try:
        write_text(target, text)
    except OSError as exc:
        raise OutputError(target, f"cannot write the JSON report: {exc.strerror or exc}") from None


def dump(doc: dict[str, Any], target: str) -> None:
    """``write_json(target, dumps(doc))``: validate, then write atomically."""
    write_json(target, dumps(doc, where=target))


__all__ = ["OutputError", "STDOUT", "dump", "dumps", "write_json"]
