"""Hub refs: ``org/name`` or ``org/name@revision`` (a branch, a tag or a commit SHA).

A ref that does not have this shape is not a Hub ref (``parse_hub_ref`` returns None) and is left to the other
resolvers; a ref that has it but breaks the Hub's naming rules is a usage error naming the rule. Local paths always
win: ``open_model`` tries an existing file or folder before it treats ``org/name`` as a Hub id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hf_provenance.errors import UsageError

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_SHAPE = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>.*))?$")
MAX_PART = 96          # the Hub's limit on an org or repo name
MAX_REVISION = 256
DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub ref. ``revision`` is what the user typed after ``@``, or None for the default branch."""

    repo_id: str
    revision: str | None = None

    @property
    def org(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[1]

    @property
    def revision_or_default(self) -> str:
        return self.revision or DEFAULT_REVISION

    @property
    def is_commit(self) -> bool:
        """True when the revision is a full 40-hex commit SHA (then it pins the content by itself)."""
        return bool(self.revision and COMMIT_SHA.match(self.revision))

    def pinned(self, commit: str) -> str:
        """``org/name@<commit>``: the ref that reproduces exactly these bytes."""
        return f"{self.repo_id}@{commit}"

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_hub_ref(ref: str) -> HubRef | None:
    """Parse ``org/name[@revision]``.

    Args:
        ref: what the user typed.

    Returns:
        A :class:`HubRef`, or None when ``ref`` is not shaped like a Hub id (a path, a file name...).

    Raises:
        UsageError: the ref is shaped like a Hub id but breaks a naming rule (``--`` or ``..`` in a name, a name
            longer than 96 characters, an empty or malformed revision).

    Example:
        >>> parse_hub_ref("meta-llama/Llama-3.1-8B@main")
        HubRef(repo_id='meta-llama/Llama-3.1-8B', revision='main')
        >>> parse_hub_ref("./checkpoints/model.safetensors") is None
        True
    """
    match = _SHAPE.match(str(ref))
    if match is None:
        return None
    repo, rev = match.group("repo"), match.group("rev")
    for part in repo.split("/"):
        if "--" in part or ".." in part:
            raise UsageError(ref, f"Hub names may not contain '--' or '..' (got {part!r}); expected org/name")
        if part.endswith(".") or len(part) > MAX_PART:
            raise UsageError(ref, f"Hub names are at most {MAX_PART} characters and do not end with '.' "
                                  f"(got {part!r})")
    if rev is not None:
        _check_revision(ref, rev)
    return HubRef(repo, rev)


def _check_revision(ref: str, rev: str) -> None:
    if not rev:
        raise UsageError(ref, "empty revision after '@'; expected org/name@<branch, tag or commit SHA>")
    if len(rev) > MAX_REVISION:
        raise UsageError(ref, f"revision is {len(rev)} characters, above the {MAX_REVISION}-character limit")
    if any(c.isspace() or ord(c) < 32 or c in "\\~^:?*[" for c in rev):
        raise UsageError(ref, f"revision {rev!r} holds characters a git ref cannot (space, control, \\ ~ ^ : ? * [)")
    parts = rev.split("/")
    if any(p in ("", ".", "..") for p in parts) or rev.endswith(".lock"):
        raise UsageError(ref, f"revision {rev!r} is not a valid git ref (empty, '.' or '..' path segment, or "
                              "'.lock' suffix)")


__all__ = ["HubRef", "parse_hub_ref", "COMMIT_SHA", "DEFAULT_REVISION"]
