"""The GitHub Action's main step: one comparison, the card section, step outputs, a job summary and annotations.

Run by action.yml as ``"$HFP_PYTHON" "$GITHUB_ACTION_PATH/action/check.py"`` with the interpreter that has
hf-provenance installed. Standard library only; the tool itself runs as a child process
(``python -P -m hf_provenance.cli.main``: ``-P`` keeps the working directory, i.e. the checked-out model repository,
off ``sys.path``, so nothing in it can be imported).

Inputs come from the environment only (action.yml maps each input to one variable): ``HFP_MODEL``,
``HFP_BASE_MODELS``, ``HFP_SAMPLE``, ``HFP_SEED``, ``HFP_DEVICE``, ``HFP_FAIL_ON``, ``HFP_FAIL_ON_BEST``,
``HFP_UPDATE_CARD``, ``HFP_CARD_FILE``, ``HFP_REPORT_DIR``, ``HFP_HF_TOKEN``, ``HFP_OIDC_RESOURCE``; and the runner's
``GITHUB_OUTPUT``, ``GITHUB_STEP_SUMMARY``, ``GITHUB_WORKSPACE``, ``RUNNER_TEMP``.

What it does, in order:

1. masks the token (``::add-mask::``), then stops workflow-command processing (``::stop-commands::<random>``), so
   nothing the tool or this script prints while it works (model refs, file names, error lines) can be read by the
   runner as a workflow command;
2. checks the inputs and looks for Git LFS pointer files in local refs (exit 2, with a file annotation);
3. runs ``compare`` once, writing ``report.json`` and ``report.html``; its exit code is the step's (DESIGN: 0 done,
   1 a fail-on verdict matched, 2 usage or input error, 3 runtime or I/O failure, 130 interrupted);
4. renders the card section from the saved report (``card --from-json``, no second comparison) into
   ``provenance.md`` and the job summary; with ``update-card`` writes the card file or opens a Hub pull request
   (only when the check passed);
5. resumes command processing and writes the annotations (data and properties escaped as GitHub's
   workflow-command rules require) and the step outputs (multi-line syntax with a random delimiter).

An exit code 3 is a failure of the tool (network, disk), never a provenance finding: it is annotated as such and
leaves the verdict outputs empty.
"""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import IO, Any

VERDICTS = ("identical", "derived", "partial", "independent", "inconclusive")
UPDATE_CARD = {"": "false", "false": "false", "no": "false", "file": "file", "true": "file", "pr": "pr"}
LFS_PREFIX = b"version https://git-lfs.github.com/spec/v1"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
SUMMARY_LIMIT = 900_000  # GitHub accepts 1 MiB of summary per step
OUTPUT_NAMES = ("verdict", "base", "relation", "verdicts", "exit-code", "error", "report-dir", "report-json",
                "report-html", "report-markdown", "card-file", "card-pr-url")
EXIT_MEANING = {0: "passed", 1: "a fail-on verdict matched", 2: "input or usage error",
                3: "runtime or network failure of the tool (not a provenance finding)", 130: "interrupted"}
TITLE = {2: "hf-provenance: input error", 3: "hf-provenance: tool failure, not a provenance finding",
         130: "hf-provenance: interrupted"}


# ------------------------------------------------------------------------------------------- workflow commands

def escape_data(text: str) -> str:
    """The message part of a workflow command: % CR LF escaped (GitHub's rules)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A property value (title=, file=): as data, plus : and , escaped."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


class Log:
    """The step's log. Text goes out while command processing is stopped; commands only through ``command``.

    Everything is written to one stream (stdout) so that the runner sees the stop and resume markers in the same
    order as the lines between them.
    """

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.token: str | None = None

    def _line(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def stop(self) -> None:
        if self.token is None:
            self.token = secrets.token_hex(16)
            self._line(f"::stop-commands::{self.token}")

    def resume(self) -> None:
        if self.token is not None:
            self._line(f"::{self.token}::")
            self.token = None

    def text(self, text: str) -> None:
        self.stop()
        for line in text.splitlines() or [""]:
            self._line(line)

    def command(self, name: str, data: str = "", **props: str | None) -> None:
        if self.token is not None:
            raise RuntimeError("workflow commands are stopped; call resume() first")
        prop = ",".join(f"{k}={escape_property(v)}" for k, v in props.items() if v)
        self._line(f"::{name}{' ' + prop if prop else ''}::{escape_data(data)}")


# ------------------------------------------------------------------------------------------- inputs

class InputProblem(Exception):
    """An input the action cannot use (exit 2); ``file`` names a file for the annotation, if any."""

    def __init__(self, message: str, *, file: str | None = None, more: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.file = file
        self.more = more or []


@dataclass
class Inputs:
    model: str
    bases: list[str]
    sample: str
    seed: str
    device: str
    fail_on: str
    fail_on_best: str
    update_card: str
    card_file: str
    report_dir: str
    token: str
    oidc_resource: str


def split_list(raw: str) -> list[str]:
    """Comma- or newline-separated values, stripped, empty ones dropped, duplicates once (first kept)."""
    out: list[str] = []
    for item in re.split(r"[,\r\n]", raw or ""):
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out


def read_inputs(env: dict[str, str]) -> Inputs:
    update = (env.get("HFP_UPDATE_CARD") or "").strip().lower()
    if update not in UPDATE_CARD:
        raise InputProblem(f"update-card must be \"false\", \"file\" or \"pr\", got {update!r}")
    temp = env.get("RUNNER_TEMP") or env.get("TMPDIR") or "/tmp"
    report_dir = (env.get("HFP_REPORT_DIR") or "").strip() or os.path.join(temp, "hf-provenance")
    return Inputs(
        model=(env.get("HFP_MODEL") or "").strip() or ".",
        bases=split_list(env.get("HFP_BASE_MODELS", "")),
        sample=(env.get("HFP_SAMPLE") or "").strip(),
        seed=(env.get("HFP_SEED") or "").strip(),
        device=(env.get("HFP_DEVICE") or "").strip(),
        fail_on=",".join(split_list(env.get("HFP_FAIL_ON", ""))),
        fail_on_best=",".join(split_list(env.get("HFP_FAIL_ON_BEST", ""))),
        update_card=UPDATE_CARD[update],
        card_file=(env.get("HFP_CARD_FILE") or "").strip(),
        report_dir=os.path.abspath(report_dir),
        token=(env.get("HFP_HF_TOKEN") or "").strip(),
        oidc_resource=(env.get("HFP_OIDC_RESOURCE") or "").strip(),
    )


def is_hub_id(ref: str) -> bool:
    return not os.path.exists(ref) and bool(HUB_ID.match(ref))


def workspace_relative(path: str, env: dict[str, str]) -> str:
    """A path as GitHub's file= annotation wants it: relative to the workspace when inside it."""
    ws = env.get("GITHUB_WORKSPACE") or os.getcwd()
    full = os.path.abspath(path)
    try:
        rel = os.path.relpath(full, os.path.abspath(ws))
    except ValueError:
        return full
    return full if rel.startswith("..") else rel


def lfs_pointers(ref: str, *, max_depth: int = 3) -> list[str]:
    """The ``.safetensors`` files under a local ref (folder or file) that are Git LFS pointer files."""
    if os.path.isfile(ref):
        candidates = [ref]
    elif os.path.isdir(ref):
        candidates = []
        root_depth = os.path.abspath(ref).rstrip(os.sep).count(os.sep)
        for folder, dirs, files in os.walk(ref):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if os.path.abspath(folder).count(os.sep) - root_depth >= max_depth:
                dirs[:] = []
            candidates += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".safetensors")]
    else:
        return []
    found = []
    for path in candidates:
        try:
            with open(path, "rb") as f:
                head = f.read(len(LFS_PREFIX))
        except OSError:
            continue  # the tool reports unreadable files itself
        if head == LFS_PREFIX:
            found.append(path)
    return found


def check_inputs(inp: Inputs, env: dict[str, str]) -> None:
    """Problems found before anything runs (exit 2)."""
    if inp.update_card == "pr" and not is_hub_id(inp.model):
        raise InputProblem(f"update-card \"pr\" opens a pull request on the Hub, so model must be a Hub id "
                           f"(org/name), got the local path {inp.model!r}; for a checked-out repository use "
                           "update-card \"file\" and commit the card in a later step")
    if inp.update_card == "file" and not inp.card_file and not os.path.isdir(inp.model):
        raise InputProblem(f"update-card \"file\" needs the card-file input when model is not a local folder "
                           f"(got {inp.model!r})")
    if os.path.exists(inp.report_dir) and not os.path.isdir(inp.report_dir):
        raise InputProblem(f"report-dir {inp.report_dir!r} is a file; give a folder")
    if inp.oidc_resource and not inp.token:
        if not env.get("ACTIONS_ID_TOKEN_REQUEST_URL"):
            raise InputProblem("hf-oidc-resource needs an OIDC id token: give the job `permissions: id-token: "
                               "write` (or pass hf-token instead)")
        import importlib.util

        if importlib.util.find_spec("huggingface_hub._oidc") is None:
            raise InputProblem("hf-oidc-resource: the installed huggingface_hub has no OIDC token exchange; "
                               "pass hf-token instead")
    pointers = [p for ref in [inp.model, *inp.bases] for p in lfs_pointers(ref)]
    if pointers:
        hint = ("is a Git LFS pointer file, not the weights: check the repository out with `lfs: true` "
                "(actions/checkout `with: { lfs: true }`) or pass the Hub id as model instead")
        shown = [workspace_relative(p, env) for p in pointers[:10]]
        raise InputProblem(f"{shown[0]} {hint}", file=pointers[0],
                           more=[(p, f"{s} {hint}") for p, s in zip(pointers[1:10], shown[1:])])


# ------------------------------------------------------------------------------------------- running the tool

@dataclass
class Run:
    rc: int
    stdout: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def error_line(self) -> str:
        """The tool's one-line error (the last ``hf-provenance: ...`` line it printed)."""
        for line in reversed(self.lines):
            if line.startswith("hf-provenance: "):
                return line
        return self.lines[-1] if self.lines else f"exit code {self.rc} without a message"


def child_env(inp: Inputs) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFP_")}
    if inp.token:
        env["HF_TOKEN"] = inp.token
    elif inp.oidc_resource:
        env["HF_OIDC_RESOURCE"] = inp.oidc_resource
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONSAFEPATH"] = "1"
    return env


def tool(args: list[str]) -> list[str]:
    return [sys.executable, "-P", "-m", "hf_provenance.cli.main", *args]


def run_tool(argv: list[str], env: dict[str, str], log: Log, *, capture_stdout: bool = False) -> Run:
    """Run a command; its output goes to the log (commands stopped) as it comes. ``capture_stdout`` keeps stdout
    out of the log and returns it (stderr is still logged)."""
    log.stop()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if capture_stdout else subprocess.STDOUT)
    run = Run(rc=0)
    try:
        if capture_stdout:
            out, err = proc.communicate()
            run.stdout = out.decode("utf-8", "replace")
            run.lines = err.decode("utf-8", "replace").splitlines()
            for line in run.lines:
                log.text(line)
        else:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                run.lines.append(line)
                log.text(line)
            proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    run.rc = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return run


def compare_args(inp: Inputs, paths: dict[str, str]) -> list[str]:
    args = ["compare", f"--json={paths['report-json']}", f"--html={paths['report-html']}"]
    args += [f"--base={b}" for b in inp.bases]
    if inp.sample:
        args.append(f"--sample={inp.sample}")
    if inp.seed:
        args.append(f"--seed={inp.seed}")
    if inp.device:
        args.append(f"--device={inp.device}")
    if inp.fail_on:
        args.append(f"--fail-on={inp.fail_on}")
    if inp.fail_on_best:
        args.append(f"--fail-on-best={inp.fail_on_best}")
    return [*args, "--", inp.model]  # after `--` a model ref that starts with '-' is still the model


# ------------------------------------------------------------------------------------------- summary

def code(text: str) -> str:
    """Inline code for the summary (Markdown + HTML): escaped, so a ref cannot add markup or break a table."""
    return "<code>" + html.escape(text).replace("|", "&#124;").replace("`", "&#96;") + "</code>"


def pre(text: str) -> str:
    return "<pre>" + html.escape(text) + "</pre>"


def ranked(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(doc.get("comparisons") or [], key=lambda c: c.get("rank", 0))


def summary_table(doc: dict[str, Any], failing: set[int]) -> str:
    rows = ["| rank | base | verdict | relation | fails the job |", "|---:|---|---|---|---|"]
    for i, c in enumerate(ranked(doc)):
        rel = ", ".join(c.get("relation") or []) or "—"
        rows.append(f"| {c.get('rank')} | {code(c['base']['ref'])} | **{html.escape(c['verdict'])}** | "
                    f"{html.escape(rel)} | {'yes' if i in failing else 'no'} |")
    return "\n".join(rows)


def failing_comparisons(doc: dict[str, Any], inp: Inputs) -> list[tuple[int, dict[str, Any], str]]:
    """(index in rank order, comparison, option) for each verdict that matched fail-on / fail-on-best."""
    fail_on = {v.lower() for v in inp.fail_on.split(",") if v}
    fail_best = {v.lower() for v in inp.fail_on_best.split(",") if v}
    out = []
    for i, c in enumerate(ranked(doc)):
        if c["verdict"] in fail_on:
            out.append((i, c, "fail-on"))
        elif i == 0 and c["verdict"] in fail_best:
            out.append((i, c, "fail-on-best"))
    return out


# ------------------------------------------------------------------------------------------- outputs

def write_outputs(path: str | None, values: dict[str, str]) -> None:
    """Step outputs in the multi-line form ``name<<DELIM`` … ``DELIM`` with an unguessable delimiter, so a value
    (a ref with a newline) can never end one output and start another."""
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        for name in OUTPUT_NAMES:
            value = values.get(name, "")
            delim = f"ghadelimiter_{secrets.token_hex(16)}"
            f.write(f"{name}<<{delim}\n{value}\n{delim}\n")


def append_summary(path: str | None, text: str) -> None:
    if not path:
        return
    if len(text.encode("utf-8")) > SUMMARY_LIMIT:
        text = text.encode("utf-8")[:SUMMARY_LIMIT].decode("utf-8", "ignore") + \
            "\n\n*(summary truncated; see the report files)*\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


# ------------------------------------------------------------------------------------------- main

@dataclass
class Annotation:
    level: str  # error | warning | notice
    title: str
    message: str
    file: str | None = None


def main() -> int:
    env = dict(os.environ)
    log = Log(sys.stdout)
    annotations: list[Annotation] = []
    outputs: dict[str, str] = {}
    summary: list[str] = []

    raw_token = (env.get("HFP_HF_TOKEN") or "").strip()
    for part in raw_token.splitlines():  # before anything else is printed
        if part.strip():
            log.command("add-mask", part.strip())
    log.command("group", "hf-provenance")
    log.stop()
    try:
        rc = _check(env, log, annotations, outputs, summary)
    except KeyboardInterrupt:
        rc = 130
        outputs["error"] = "hf-provenance: interrupted"
        annotations.append(Annotation("error", TITLE[130], "the check was interrupted before it finished"))
    except Exception as exc:  # noqa: BLE001 - a bug here must still end as one annotation and exit 3
        rc = 3
        msg = f"the action failed: {exc.__class__.__name__}: {exc}"
        outputs["error"] = msg
        log.text(msg)
        annotations.append(Annotation("error", "hf-provenance: action error, not a provenance finding", msg))
    outputs["exit-code"] = str(rc)
    try:
        write_outputs(env.get("GITHUB_OUTPUT"), outputs)
        append_summary(env.get("GITHUB_STEP_SUMMARY"), "\n\n".join(summary))
    finally:
        log.resume()
        log.command("endgroup")
        for a in annotations:
            log.command(a.level, a.message, title=a.title, file=a.file)
    return rc


def _check(env: dict[str, str], log: Log, annotations: list[Annotation], outputs: dict[str, str],
           summary: list[str]) -> int:
    try:
        inp = read_inputs(env)
        outputs["report-dir"] = inp.report_dir
        check_inputs(inp, env)
    except InputProblem as exc:
        message = str(exc)
        outputs["error"] = f"hf-provenance: {message}"
        log.text(f"hf-provenance: {message}")
        annotations.append(Annotation("error", TITLE[2], message,
                                      file=workspace_relative(exc.file, env) if exc.file else None))
        annotations += [Annotation("error", TITLE[2], m, file=workspace_relative(p, env)) for p, m in exc.more]
        summary.append(f"## hf-provenance: input error (exit 2)\n\n{pre(message)}")
        return 2

    os.makedirs(inp.report_dir, exist_ok=True)
    paths = {"report-json": os.path.join(inp.report_dir, "report.json"),
             "report-html": os.path.join(inp.report_dir, "report.html"),
             "report-markdown": os.path.join(inp.report_dir, "provenance.md")}
    for p in paths.values():  # a report left by an earlier run must not pass for this one
        if os.path.lexists(p):
            os.remove(p)
    cenv = child_env(inp)
    if inp.token:
        log.text("hf-provenance: using the hf-token input (masked)")
    elif inp.oidc_resource:
        log.text(f"hf-provenance: using an OIDC token exchange scoped to {inp.oidc_resource}")

    run = run_tool(tool(compare_args(inp, paths)), cenv, log)
    outputs["exit-code"] = str(run.rc)
    if run.rc not in (0, 1) or not os.path.isfile(paths["report-json"]):
        rc = run.rc if run.rc not in (0, 1) else 3
        line = run.error_line if run.rc not in (0, 1) else "compare ended without writing its JSON report"
        outputs["error"] = line
        title = TITLE.get(rc, "hf-provenance: internal error, not a provenance finding")
        annotations.append(Annotation("error", title, line))
        meaning = EXIT_MEANING.get(rc, "internal error of the tool (not a provenance finding)")
        note = ("\n\nThis is a failure of the check itself (network, disk or the tool), not a verdict about the "
                "model's weights: re-run the job." if rc != 2 else "")
        summary.append(f"## hf-provenance: {html.escape(meaning)} (exit {rc})\n\n{pre(line)}{note}")
        return rc

    with open(paths["report-json"], encoding="utf-8") as f:
        doc = json.load(f)
    outputs.update(paths)
    comps = ranked(doc)
    top = comps[0]
    outputs["verdict"] = top["verdict"]
    outputs["base"] = top["base"]["ref"]
    outputs["relation"] = ",".join(top.get("relation") or [])
    outputs["verdicts"] = json.dumps({c["base"]["ref"]: c["verdict"] for c in comps})

    # the card section, from the saved report (nothing is measured again)
    card = run_tool(tool(["card", f"--from-json={paths['report-json']}", "--write=-", "--", inp.model]), cenv, log,
                    capture_stdout=True)
    if card.rc == 0:
        section = card.stdout
        with open(paths["report-markdown"], "w", encoding="utf-8") as f:
            f.write(section)
    else:
        section = ""
        del outputs["report-markdown"]
        annotations.append(Annotation("warning", "hf-provenance: card section not rendered",
                                      f"the card section could not be rendered: {card.error_line}"))

    failing = failing_comparisons(doc, inp)
    model = doc["model"]["ref"]
    for _, c, option in failing:
        reason = (c.get("reasons") or [""])[0]
        annotations.append(Annotation(
            "error", f"hf-provenance: verdict {c['verdict']}",
            f"{model} vs base {c['base']['ref']}: verdict {c['verdict']} is in {option} "
            f"({inp.fail_on if option == 'fail-on' else inp.fail_on_best})" + (f"; {reason}" if reason else "")))
    for c in comps:
        if c["verdict"] == "inconclusive" and all(c is not f[1] for f in failing):
            reason = "; ".join((c.get("reasons") or [])[:2])
            annotations.append(Annotation("warning", "hf-provenance: inconclusive",
                                          f"{model} vs base {c['base']['ref']}: inconclusive" +
                                          (f" ({reason})" if reason else "")))
    rel = ", ".join(top.get("relation") or [])
    if run.rc == 0:
        annotations.append(Annotation("notice", f"hf-provenance: {top['verdict']}",
                                      f"{model} vs base {top['base']['ref']}: {top['verdict']}" +
                                      (f" ({rel})" if rel else "")))
    if run.rc == 1 and not failing:  # the tool matched something this script did not (should not happen)
        annotations.append(Annotation("error", "hf-provenance: fail-on matched", run.error_line))

    head = "passed" if run.rc == 0 else "failed: a fail-on verdict matched"
    parts = [f"## hf-provenance: {head}",
             f"Model {code(model)}: top verdict **{html.escape(top['verdict'])}** against "
             f"{code(top['base']['ref'])}.",
             summary_table(doc, {i for i, _, _ in failing}),
             f"Reports in {code(inp.report_dir)}: {code('report.json')}, {code('report.html')}, "
             f"{code('provenance.md')} (upload them with actions/upload-artifact)."]
    if section:
        parts.append(section.rstrip("\n"))
    summary.append("\n\n".join(parts))

    rc = run.rc
    if inp.update_card != "false":
        if run.rc != 0:
            log.text("hf-provenance: the card is not updated because the check failed")
        else:
            rc = _update_card(inp, paths, cenv, log, annotations, outputs, summary)
    return rc


def _update_card(inp: Inputs, paths: dict[str, str], cenv: dict[str, str], log: Log,
                 annotations: list[Annotation], outputs: dict[str, str], summary: list[str]) -> int:
    """Write the card file, or open a Hub pull request; the exit code of that step (0 when done)."""
    if inp.update_card == "file":
        target = inp.card_file or os.path.join(inp.model, "README.md")
        run = run_tool(tool(["card", f"--from-json={paths['report-json']}", f"--write={target}", "--", inp.model]),
                       cenv, log)
        if run.rc == 0:
            outputs["card-file"] = os.path.abspath(target)
            summary.append(f"Card updated: {code(os.path.abspath(target))}.")
            return 0
    else:
        with open(paths["report-json"], encoding="utf-8") as f:
            revision = json.load(f)["model"].get("revision") or ""
        card_dir = os.path.join(inp.report_dir, "card")
        os.makedirs(card_dir, exist_ok=True)
        target = os.path.join(card_dir, "README.md")
        fetch = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fetch_card.py")
        run = run_tool([sys.executable, "-P", fetch, inp.model.split("@")[0], revision, target], cenv, log)
        if run.rc == 0:
            run = run_tool(tool(["card", f"--from-json={paths['report-json']}", f"--write={target}", "--push", "--",
                                 inp.model]), cenv, log)
        if run.rc == 0:
            urls = [ln.rsplit("opened a pull request: ", 1)[1].strip() for ln in run.lines
                    if "opened a pull request: " in ln]
            outputs["card-pr-url"] = urls[-1] if urls else ""
            outputs["card-file"] = target
            if urls:
                summary.append(f"Card pull request: {code(urls[-1])}.")
            return 0
    rc = run.rc or 3
    annotations.append(Annotation("error", TITLE.get(rc, "hf-provenance: card update failed"),
                                  f"updating the card failed: {run.error_line}"))
    summary.append(f"Card update failed (exit {rc}):\n\n{pre(run.error_line)}")
    outputs["error"] = run.error_line
    return rc


def _on_sigterm(signum, frame):  # pragma: no cover - the runner cancels a job with SIGINT, then SIGTERM
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())
