"""``hf-provenance card`` and the report outputs of ``compare`` (``--markdown``, ``--html``, ``--plots``).

    hf-provenance card MODEL (--from-json REPORT | [--base BASE]...) --write README.md [--set-metadata]
                       [--replace-declared] [--push]

``--from-json`` renders a saved report without measuring anything, after checking that it was made for these
weights (the model's content id now equals the report's). Without it the comparison runs first. ``--write`` puts the
section between ``<!-- hf-provenance:start -->`` and ``<!-- hf-provenance:end -->`` (appended when the card has
none) and keeps every other byte; the file is written atomically, and not at all when nothing changed.
``--set-metadata`` updates ``base_model`` / ``base_model_relation`` (see ``report.card.plan_metadata``: a declared
base the report does not confirm is refused, exit 2, unless ``--replace-declared``). ``--push`` opens a pull request
on the Hub with the written card; it never commits to the main branch.

Everything is rendered and checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from hf_provenance.errors import InputError, ProvenanceError, RemoteError, UsageError

_SHA = re.compile(r"^[0-9a-f]{40}$")


class WriteError(ProvenanceError, OSError):
    """Raised when an output file (card, Markdown, HTML, plot) cannot be written; nothing half-written is left."""

    exit_code = 3


# ------------------------------------------------------------------------------------------------ compare outputs

def add_report_options(p: argparse.ArgumentParser) -> None:
    """``--markdown FILE``, ``--html FILE``, ``--plots DIR`` of ``compare``."""
    p.add_argument("--markdown", metavar="FILE", help="also write the model-card section (Markdown, between "
                                                      "hf-provenance markers) to FILE")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report (plots inlined) to FILE")
    p.add_argument("--plots", metavar="DIR", help="also write PNG plots and badge.svg to DIR (the --markdown section "
                                                  "then shows them)")


def check_report_targets(args: argparse.Namespace) -> None:
    """Option checks that need no model: run before anything is measured."""
    from hf_provenance.report import plots

    for opt in ("markdown", "html"):
        target = getattr(args, opt, None)
        if target and os.path.isdir(target):
            raise UsageError(target, f"--{opt} names a folder; give a file name")
    if getattr(args, "plots", None):
        if os.path.exists(args.plots) and not os.path.isdir(args.plots):
            raise UsageError(args.plots, "--plots names a file; give a folder")
        if not plots.available():
            raise UsageError("--plots", "needs matplotlib: pip install 'hf-provenance[plots]'")


class Outputs(list):
    """``[(path, bytes)]`` rendered in memory, plus ``notes`` (one terminal line each) printed once written."""

    def __init__(self, items=(), notes=(), stream=None):
        super().__init__(items)
        self.notes, self.stream = list(notes), stream


def render_reports(args: argparse.Namespace, doc: dict[str, Any]) -> Outputs:
    """Render the requested outputs in memory; ``write_outputs`` writes them (atomically) and prints the notes."""
    from hf_provenance.report import badge, plots
    from hf_provenance.report.card import render_section

    want_md, want_html, plot_dir = getattr(args, "markdown", None), getattr(args, "html", None), \
        getattr(args, "plots", None)
    stream = sys.stderr if getattr(args, "json", None) == "-" else sys.stdout
    out = Outputs(stream=stream)
    if not (want_md or want_html or plot_dir):
        return out
    pset = plots.render_plots(doc) if (plot_dir or want_html) and plots.available() else None
    if plot_dir:
        for name, png in pset.images.items():
            out.append((os.path.join(plot_dir, name), png))
        out.append((os.path.join(plot_dir, "badge.svg"), badge.badge_svg(doc).encode("utf-8")))
        # terminal: the first clause of each reason (the HTML report gives it in full)
        out.notes += [f"plots: {name} not drawn: {reason.split(' (')[0]}" for name, reason in pset.skipped.items()]
    if want_md:
        listing = []
        if plot_dir:
            rel = os.path.relpath(plot_dir, os.path.dirname(os.path.abspath(want_md))).replace(os.sep, "/")
            listing = pset.listing(rel)
        out.append((want_md, (render_section(doc, plots=listing) + "\n").encode("utf-8")))
    if want_html:
        from hf_provenance.report.html import render_html

        note = "" if pset is not None else "plots not drawn: matplotlib is not installed (pip install " \
                                           "'hf-provenance[plots]')"
        if pset is None:
            out.notes.append("html: " + note)
        out.append((want_html, render_html(doc, pset, plots_note=note).encode("utf-8")))
    return out


def write_outputs(outputs: list[tuple[str, bytes]]) -> None:
    """Write each (path, bytes) atomically, then print the outputs' notes."""
    from hf_provenance.atomic import write_bytes

    for path, data in outputs:
        try:
            write_bytes(path, data)
        except OSError as exc:
            raise WriteError(path, f"cannot write: {exc.strerror or exc}") from None
    for note in getattr(outputs, "notes", []):
        print(note, file=outputs.stream or sys.stdout)


# ------------------------------------------------------------------------------------------------ card

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the model the card describes (folder, file or Hub id)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from-json", metavar="REPORT", help="render this saved `compare --json` report (nothing is "
                                                           "measured; it must match MODEL's content id)")
    src.add_argument("--base", metavar="BASE", action="append", default=[],
                     help="compare with this base first (repeatable; default: the card's base_model)")
    p.add_argument("--sample", metavar="F", help="with --base: read only this fraction of row blocks")
    p.add_argument("--seed", metavar="N", default="0", help="with --base: seed (default 0)")
    p.add_argument("--device", metavar="D", default="cpu", help="with --base: cpu (default), cuda, cuda:N or mps")
    p.add_argument("--write", metavar="FILE", required=True,
                   help="the card to update (e.g. README.md; created if missing); '-' prints the section")
    p.add_argument("--set-metadata", action="store_true",
                   help="also set base_model / base_model_relation in the card's YAML header from the evidence")
    p.add_argument("--replace-declared", action="store_true",
                   help="with --set-metadata: replace a declared base_model or relation the report does not confirm")
    p.add_argument("--push", action="store_true", help="open a pull request on the Hub with the updated card "
                                                       "(MODEL must be a Hub id; never commits to main)")


def load_report(path: str) -> dict[str, Any]:
    """A saved compare report, schema-checked.

    Raises:
        InputError: unreadable, not JSON, or not an ``hf-provenance.compare/1`` document.
    """
    from hf_provenance import schemas

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise InputError(path, "no such report file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the report: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("hf-provenance.compare/"):
        raise InputError(path, "not a compare report (expected \"schema\": \"hf-provenance.compare/1\"; write one "
                               "with `hf-provenance compare MODEL --base BASE --json FILE`)")
    try:
        schemas.validate(doc)
    except schemas.SchemaError as exc:
        raise InputError(path, f"the report {exc}") from None
    return doc


def check_report_matches(model_ref: str, doc: dict[str, Any], *, where: str) -> None:
    """Refuse a report that was not made for MODEL's current weights (content id and revision).

    Raises:
        InputError: the content ids (or revisions) differ.
    """
    from hf_provenance import sources
    from hf_provenance.report.view import content_id

    src = sources.open_model(model_ref)
    try:
        now = src.content_id.to_dict()
        rev_now = src.revision
    finally:
        close = getattr(src, "close", None)
        if close:
            close()
    then = content_id(doc["model"])
    rev_then = doc["model"].get("revision")
    if (now["kind"], now["value"]) != (then["kind"], then["value"]) or (rev_then and rev_now and rev_then != rev_now):
        raise InputError(where, f"made for {then['kind']} {then['value'][:12]} (revision {rev_then or '—'}), but "
                                f"{model_ref} now has {now['kind']} {now['value'][:12]} (revision {rev_now or '—'}): "
                                "not rendering a report of other weights; compare again")


def _hub_repo(model_ref: str) -> str:
    from hf_provenance.sources import looks_like_hub_id

    if os.path.exists(os.path.expanduser(model_ref)) or not looks_like_hub_id(model_ref):
        raise UsageError("--push", f"needs MODEL as a Hub id (org/name), got the local path {model_ref}")
    return model_ref.split("@")[0]


def push_card(repo_id: str, data: bytes, doc: dict[str, Any]) -> str:
    """Open a pull request that updates README.md; returns its URL. Never a direct commit to main.

    Raises:
        RemoteError: the Hub refused or could not be reached (exit 3); the local file stays written.
    """
    from huggingface_hub import HfApi

    from hf_provenance.report.view import reproduce_command, statement

    rev = doc["model"].get("revision")
    summary = "; ".join(f"{c['verdict']}: {statement(c)}" for c in sorted(doc["comparisons"], key=lambda c: c["rank"]))
    kwargs: dict[str, Any] = {}
    if rev and _SHA.match(rev):
        kwargs["parent_commit"] = rev  # the PR starts from the revision the report measured
    try:
        info = HfApi().upload_file(
            path_or_fileobj=data, path_in_repo="README.md", repo_id=repo_id, repo_type="model", create_pr=True,
            commit_message=f"Add weight provenance section (hf-provenance {doc['tool']['version']})",
            commit_description=f"Generated by `hf-provenance card`. {summary}.\n\nReproduce: "
                               f"`{reproduce_command(doc)}`",
            **kwargs)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds; each becomes one line, exit 3
        raise RemoteError(repo_id, f"could not open the pull request ({exc.__class__.__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); the card was written "
                                   "locally") from None
    return str(getattr(info, "pr_url", None) or info)


def _read_card(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise InputError(path, f"cannot read the card: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"the card is not UTF-8 (byte {exc.start}); convert it first") from None


def run(args: argparse.Namespace) -> int:
    from hf_provenance.cli.commands import _command_line, parse_device, parse_sample, parse_seed
    from hf_provenance.report import card

    target = args.write
    if target != "-" and os.path.isdir(target):
        raise UsageError(target, "--write names a folder; give the card's file name (README.md)")
    if target == "-" and (args.set_metadata or args.push):
        raise UsageError("--write", "'-' prints the section only; --set-metadata and --push need a card file")
    if args.replace_declared and not args.set_metadata:
        raise UsageError("--replace-declared", "only applies with --set-metadata")
    repo_id = _hub_repo(args.model) if args.push else None
    if args.from_json:
        for opt, given in (("--sample", args.sample is not None), ("--seed", args.seed != "0"),
                           ("--device", args.device != "cpu")):
            if given:
                raise UsageError(opt, "has no effect with --from-json (the saved report is rendered as it is)")
        doc = load_report(args.from_json)
        check_report_matches(args.model, doc, where=args.from_json)
    else:
        from dataclasses import replace

        from hf_provenance.compare import compare

        sample, seed, device = parse_sample(args.sample), parse_seed(args.seed), parse_device(args.device)
        report = compare(args.model, list(args.base) or None, sample=sample, seed=seed, device=device)
        doc = replace(report, run={**report.run, "command": _command_line(args)}).to_dict()

    section = card.render_section(doc)
    if target == "-":
        sys.stdout.write(section + "\n")
        return 0
    old = _read_card(target)
    new = card.insert_section(old, section, where=target)
    messages: list[str] = []
    if args.set_metadata:
        change = card.plan_metadata(doc, new, where=target, replace_declared=args.replace_declared)
        new = card.update_metadata(new, change, where=target)
        messages += list(change.messages)
        messages += [f"set {k}: {v}" for k, v in change.values.items()]
    data = new.encode("utf-8")
    top = sorted(doc["comparisons"], key=lambda c: c["rank"])[0]
    from hf_provenance.report.view import statement

    if new == old:
        print(f"{target}: unchanged (the section is up to date)")
    else:
        write_outputs([(target, data)])
        print(f"{target}: wrote the provenance section")
    print(f"  {top['verdict']}: this model {statement(top)}")
    for m in messages:
        print(f"  metadata: {m}")
    if repo_id:
        url = push_card(repo_id, data, doc)
        print(f"{repo_id}: opened a pull request: {url}")
    return 0


__all__ = ["Outputs", "WriteError", "add_arguments", "add_report_options", "check_report_matches", "check_report_targets",
           "load_report", "push_card", "render_reports", "run", "write_outputs"]
