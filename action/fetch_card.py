"""Fetch a Hub model's README.md at one revision, for the Action's ``update-card: pr``.

    python -P fetch_card.py REPO_ID REVISION DEST

``hf-provenance card --write DEST --push`` edits the card file it is given and uploads it whole, so DEST must first
hold the Hub's current card (at the revision the report measured), or the pull request would replace the card with
the section alone. A repository without a README.md leaves DEST absent (the card then holds the section only).
Exit codes follow DESIGN: 0 done, 2 the repository cannot be read with this token, 3 network failure; one line on
stderr, never the token.
"""

from __future__ import annotations

import os
import shutil
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("hf-provenance: fetch_card: usage: fetch_card.py REPO_ID REVISION DEST", file=sys.stderr)
        return 2
    repo_id, revision, dest = argv
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    if os.path.lexists(dest):
        os.remove(dest)
    try:
        path = hf_hub_download(repo_id, "README.md", revision=revision or None, repo_type="model")
    except EntryNotFoundError:
        print(f"hf-provenance: {repo_id}: no README.md yet; the pull request adds one")
        return 0
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        print(f"hf-provenance: {repo_id}: cannot read the repository's card ({exc.__class__.__name__}); check "
              "hf-token", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - network and HTTP errors: one line, exit 3 (never a verdict)
        first = str(exc).splitlines()[0] if str(exc) else "no detail"
        print(f"hf-provenance: {repo_id}: could not fetch README.md ({exc.__class__.__name__}: {first})",
              file=sys.stderr)
        return 3
    shutil.copyfile(path, dest)
    print(f"hf-provenance: {repo_id}: fetched README.md at {revision or 'the default branch'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
