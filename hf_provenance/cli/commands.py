"""The commands of ``hf-provenance``: each one parses its options, calls one library function, renders its result.

Every command is a ``Command`` (name, help, ``add_arguments(parser)``, ``run(args) -> exit code``) in
``COMMANDS``; ``cli/main.py`` builds the parser from them and turns exceptions into one line and an exit code.
Options shared by several commands (``--json FILE``) are defined once. Option values are checked before any model
is opened, and every problem is a ``UsageError`` naming the option (exit code 2).

JSON output is serialised and validated against its schema first, the terminal report is printed next, and the
file is written last, atomically: when anything fails there is no JSON file.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from hf_provenance.cli import card as card_cli
from hf_provenance.errors import UsageError

VERDICTS = ("identical", "derived", "partial", "independent", "inconclusive")


@dataclass(frozen=True)
class Command:
    """One sub-command: what ``main.build_parser`` needs to register it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    preload: tuple[str, ...] = ()  # the heavy modules ``run`` imports (``main`` loads them first, see there)


# --------------------------------------------------------------------------------------------- shared options

def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE ('-' for stdout; the "
                                                  "terminal report then goes to stderr)")


def _check_json_target(target: str | None) -> None:
    if target and target != "-" and os.path.isdir(target):
        raise UsageError(target, "--json names a folder; give a file name such as report.json")


def _streams(args: argparse.Namespace):
    """Where the terminal report goes: stdout, or stderr when the JSON goes to stdout."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def _emit(args: argparse.Namespace, doc: dict[str, Any], render: Callable[[dict, Any], None]) -> None:
    """Validate and serialise ``doc`` (if --json), render it, then write the JSON (atomically)."""
    from hf_provenance.report.jsonout import dumps, write_json

    text = dumps(doc, where=args.json) if args.json else None
    stream = _streams(args)
    try:
        render(doc, stream)
        stream.flush()
    except BrokenPipeError:  # `| head`: the report's reader left; the files asked for are still written
        _detach(stream)
    if text is not None:
        write_json(args.json, text)


def _detach(stream) -> None:
    """Point a stream whose reader went away at /dev/null, so that later writes and the interpreter's last flush
    do not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's StringIO): nothing to detach
        pass


def _command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "_argv", None)
    if argv is None:
        argv = sys.argv[1:]
    return " ".join(shlex.quote(str(a)) for a in ["hf-provenance", *argv])


# --------------------------------------------------------------------------------------------- option values

def parse_sample(raw: str | None) -> float | None:
    """``--sample F``: a fraction in (0, 1], or None for a full read."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise UsageError("--sample", f"must be a fraction in (0, 1] (e.g. 0.1 reads a tenth of the row blocks), "
                                     f"got {raw!r}")
    return value


def parse_seed(raw: str | int) -> int:
    """``--seed N``: a whole number >= 0."""
    try:
        value = int(str(raw), 10)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError("--seed", f"must be a whole number >= 0, got {raw!r}")
    return value


def parse_verdicts(values: list[str], option: str) -> tuple[str, ...]:
    """``--fail-on derived,identical`` (repeatable, comma-separated) -> ('derived', 'identical')."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item not in VERDICTS:
                raise UsageError(option, f"unknown verdict {item!r}; choose from {', '.join(VERDICTS)}")
            if item not in out:
                out.append(item)
    if values and not out:
        raise UsageError(option, f"no verdict given; choose from {', '.join(VERDICTS)}")
    return tuple(out)


def parse_device(raw: str) -> str:
    """``--device D``: cpu, cuda, cuda:N or mps, and only when that device is usable here."""
    import torch

    try:
        dev = torch.device(raw)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError("--device", f"{raw!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError("--device", f"{raw} requested but CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError("--device", f"{raw} requested but only {torch.cuda.device_count()} CUDA device(s) "
                                         "are visible")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError("--device", f"{raw} requested but the MPS backend is not available; use --device cpu")
    elif dev.type != "cpu":
        raise UsageError("--device", f"{raw!r} is not supported; use cpu, cuda, cuda:N or mps")
    return raw


# --------------------------------------------------------------------------------------------- inspect

def _add_allow_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .bin/.pt/.pth/.ckpt checkpoints (only through torch.load(weights_only=True), whole "
                        "tensors in memory); refused by default because pickles can run code")


def _opener(args: argparse.Namespace):
    from functools import partial

    from hf_provenance.sources import open_model

    return partial(open_model, allow_pickle=bool(getattr(args, "allow_pickle", False)))


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a model folder, a .safetensors file or an HF cache snapshot")
    _add_json(p)
    _add_allow_pickle(p)


def run_inspect(args: argparse.Namespace) -> int:
    from hf_provenance.inspect_model import inspect_model
    from hf_provenance.report.terminal_inspect import render_inspect

    _check_json_target(args.json)
    _emit(args, inspect_model(args.model, open_fn=_opener(args)).to_dict(), render_inspect)
    return 0


# --------------------------------------------------------------------------------------------- arch

def _arch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the model (folder, .safetensors file; config.json is needed)")
    p.add_argument("base", metavar="BASE", help="the base model to compare its architecture with")
    _add_json(p)


def run_arch(args: argparse.Namespace) -> int:
    from hf_provenance.arch_report import arch_report
    from hf_provenance.report.terminal_inspect import render_arch

    _check_json_target(args.json)
    _emit(args, arch_report(args.model, args.base).to_dict(), render_arch)
    return 0


# --------------------------------------------------------------------------------------------- compare

def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the model whose lineage is in question")
    p.add_argument("--base", metavar="BASE", action="append", default=[],
                   help="a suspected base model; repeat the flag for several (default: the card's base_model)")
    p.add_argument("--sample", metavar="F", help="read only this fraction (0, 1] of row blocks, with intervals "
                                                 "(default: read every byte)")
    p.add_argument("--seed", metavar="N", default="0", help="seed of the sample and permutation nulls (default 0)")
    p.add_argument("--device", metavar="D", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    _add_json(p)
    p.add_argument("--fail-on", metavar="V,...", action="append", default=[],
                   help="exit 1 when any base's verdict is one of these (identical, derived, partial, independent, "
                        "inconclusive)")
    p.add_argument("--fail-on-best", metavar="V,...", action="append", default=[],
                   help="exit 1 when the top-ranked base's verdict is one of these")
    _add_allow_pickle(p)
    card_cli.add_report_options(p)


def run_compare(args: argparse.Namespace) -> int:
    from hf_provenance.compare import compare
    from hf_provenance.report.terminal_compare import render_compare

    sample = parse_sample(args.sample)
    seed = parse_seed(args.seed)
    fail_on = parse_verdicts(args.fail_on, "--fail-on")
    fail_on_best = parse_verdicts(args.fail_on_best, "--fail-on-best")
    _check_json_target(args.json)
    card_cli.check_report_targets(args)
    device = parse_device(args.device)

    progress = ProgressBar(sample, opener=_opener(args))
    try:
        report = compare(args.model, list(args.base) or None, sample=sample, seed=seed, device=device,
                         open_fn=progress.open_model, progress=progress)
    finally:
        progress.close()
    report = replace(report, run={**report.run, "command": _command_line(args)})
    doc = report.to_dict()
    outputs = card_cli.render_reports(args, doc)  # rendered before anything is written
    _emit(args, doc, render_compare)
    card_cli.write_outputs(outputs)
    return _fail_on(doc, fail_on, fail_on_best)


def _fail_on(doc: dict[str, Any], fail_on: tuple[str, ...], fail_on_best: tuple[str, ...]) -> int:
    """1 (and one line on stderr) when a --fail-on / --fail-on-best verdict matched, else 0."""
    comps = doc["comparisons"]
    hits = [(c, "--fail-on") for c in comps if c["verdict"] in fail_on]
    best = [c for c in comps if c["rank"] == 1][:1]
    hits += [(c, "--fail-on-best") for c in best if c["verdict"] in fail_on_best]
    if not hits:
        return 0
    c, option = hits[0]
    print(f"hf-provenance: {doc['model']['ref']}: {option} matched: verdict {c['verdict']} against base "
          f"{c['base']['ref']} (rank {c['rank']})", file=sys.stderr)
    return 1


class ProgressBar:
    """A byte-progress bar on stderr for ``compare``: shown only when stderr is a terminal and the run has already
    lasted ``delay_s`` (short runs stay silent); transient, so it leaves nothing behind.

    ``open_model`` wraps ``sources.open_model`` to learn each base's size; the instance itself is the
    ``progress(pair, bytes)`` callback ``compare`` calls after each tensor pair.
    """

    delay_s = 1.0

    def __init__(self, sample: float | None, *, stream=None, opener=None):
        self.opener = opener
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.sample = sample
        self.t0 = time.monotonic()
        self.opened = 0
        self.total = 0
        self.done = 0
        self.base_ref = ""
        self._bar = None
        self._task = None

    def open_model(self, ref: str):
        from hf_provenance.sources import open_model

        src = (self.opener or open_model)(ref)
        if self.opened:  # the first ref opened is the model; the others are bases
            self.base_ref = ref
            self.total += sum(i.nbytes for i in src.inventory.values())
        self.opened += 1
        return src

    def __call__(self, pair: Any, nbytes: int) -> None:
        self.done += int(nbytes)
        if not self.enabled:
            return
        if self._bar is None:
            if time.monotonic() - self.t0 < self.delay_s:
                return
            self._start()
        total = None if self.sample else max(self.total, self.done)
        self._bar.update(self._task, completed=self.done, total=total,
                         description=f"comparing with {os.path.basename(self.base_ref.rstrip('/')) or 'base'}")

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(file=self.stream, stderr=True)
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                             console=console, transient=True)
        self._task = self._bar.add_task("comparing", total=None)
        self._bar.start()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# --------------------------------------------------------------------------------------------- demo

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR", help="where the factory keeps the demo models (default: "
                                                      "$HF_PROVENANCE_FACTORY_CACHE or ~/.cache/hf-provenance/factory)")


def run_demo(args: argparse.Namespace) -> int:
    from hf_provenance.cli.demo import run_demo as demo

    return demo(cache_dir=args.cache_dir)


COMMANDS: list[Command] = [
    Command("inspect", "Describe one model: architecture, parameter counts, tensor inventory, card metadata.",
            _inspect_args, run_inspect, ("hf_provenance.inspect_model", "hf_provenance.report.terminal_inspect")),
    Command("arch", "Compare two architectures side by side (config.json only): what pairs up, and how.",
            _arch_args, run_arch, ("hf_provenance.arch_report", "hf_provenance.report.terminal_inspect")),
    Command("compare", "Compare a model's weights with one or more suspected bases: identical, derived, partial, "
                       "independent or inconclusive.", _compare_args, run_compare,
            ("hf_provenance.compare", "hf_provenance.report.terminal_compare")),
    Command("card", "Write the provenance section (and optionally base_model metadata) into a model card, from a "
                    "saved report or a fresh comparison; --push opens a pull request on the Hub.",
            card_cli.add_arguments, card_cli.run, ("hf_provenance.sources", "hf_provenance.report.card")),
    Command("demo", "Build a tiny model family (fine-tune, independent, cast, pruned, vocabulary-extended) and show "
                    "what the tool finds.", _demo_args, run_demo, ("hf_provenance.cli.demo",)),
]

__all__ = ["COMMANDS", "Command", "ProgressBar", "VERDICTS", "parse_device", "parse_sample", "parse_seed",
           "parse_verdicts"]
