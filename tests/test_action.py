"""The GitHub Action (action.yml + action/): schema-valid, and run locally the way the runner runs a composite action.

The harness (``run_action``) reads action.yml and, for each ``run:`` step, does what the runner does: substitutes
``${{ inputs.* }}``, ``${{ steps.*.outputs.* }}``, ``${{ github.action_path }}`` and ``${{ runner.temp }}`` in the
step's ``env:`` values only, writes the body to a file and runs it with ``bash --noprofile --norc -eo pipefail
FILE`` (``shell: bash``), with fresh GITHUB_OUTPUT / GITHUB_STEP_SUMMARY files per step, GITHUB_ACTION_PATH,
RUNNER_TEMP and GITHUB_WORKSPACE, then parses the output file (``name=value`` and ``name<<DELIM``) and stops at the
first failing step. ``uses:`` steps (actions/setup-python) are skipped; the install step is skipped through
HF_PROVENANCE_ACTION_SKIP_INSTALL=1 with this interpreter, which imports the checkout's hf_provenance.

The log is read with a parser that follows the runner's rules for workflow commands (``::name k=v::data`` after
leading whitespace, the legacy ``##[name]data`` anywhere in a line, ``::stop-commands::TOKEN`` … ``::TOKEN::``, lines
split on CR, LF and CRLF, data and properties unescaped), so a test sees exactly the commands the runner would act on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACTION_YML = ROOT / "action.yml"
WORKFLOW_YML = ROOT / ".github" / "workflows" / "self-test.yml"
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]  # what the runner runs for `shell: bash`
REGISTERED = {"add-mask", "debug", "warning", "error", "notice", "group", "endgroup", "echo", "save-state",
              "set-output", "set-env", "add-path", "add-matcher", "remove-matcher", "stop-commands",
              "internal-set-repo-path"}
OUR_COMMANDS = {"add-mask", "group", "endgroup", "error", "warning", "notice"}


def load_action() -> dict:
    return yaml.safe_load(ACTION_YML.read_text(encoding="utf-8"))


def load_check():
    spec = importlib.util.spec_from_file_location("hfp_action_check", ROOT / "action" / "check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------- the runner's rules

@dataclass
class Command:
    name: str
    props: dict[str, str]
    data: str
    line: str


def _unescape_data(s: str) -> str:
    return s.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")


def _unescape_property(s: str) -> str:
    return s.replace("%0D", "\r").replace("%0A", "\n").replace("%3A", ":").replace("%2C", ",").replace("%25", "%")


def _parse_v2(line: str, registered: set[str]) -> Command | None:
    s = line.lstrip()
    if not s.startswith("::"):
        return None
    end = s.find("::", 2)
    if end < 0:
        return None
    info = s[2:end]
    name = info.split(" ", 1)[0]
    if name.lower() not in registered:
        return None
    props = {}
    if " " in info:
        for item in info.split(" ", 1)[1].strip().split(","):
            pair = [p for p in item.split("=", 1) if p]
            if len(pair) == 2:
                props[pair[0]] = _unescape_property(pair[1])
    return Command(name.lower(), props, _unescape_data(s[end + 2:]), line)


def _parse_v1(line: str, registered: set[str]) -> Command | None:
    i = line.find("##[")
    if i < 0:
        return None
    rb = line.find("]", i)
    if rb < 0:
        return None
    info = line[i + 3:rb]
    name = info.split(" ", 1)[0]
    if name.lower() not in registered:
        return None
    props = {}
    if " " in info:
        for item in info.split(" ", 1)[1].split(";"):
            pair = [p for p in item.split("=", 1) if p]
            if len(pair) == 2:
                props[pair[0]] = pair[1]
    return Command(name.lower(), props, line[rb + 1:], line)


def parse_commands(log: str) -> list[Command]:
    """The workflow commands the runner acts on in ``log`` (stop/resume markers are consumed, not returned)."""
    out: list[Command] = []
    stop_token: str | None = None
    for line in re.split(r"\r\n|\r|\n", log):
        registered = REGISTERED | ({stop_token.lower()} if stop_token else set())
        cmd = _parse_v2(line, registered) or _parse_v1(line, registered)
        if cmd is None:
            continue
        if stop_token is not None:
            if cmd.name == stop_token.lower():
                stop_token = None
            continue
        if cmd.name == "stop-commands":
            assert cmd.data, "stop-commands without a token"
            stop_token = cmd.data
            continue
        out.append(cmd)
    assert stop_token is None, "the step ended with workflow commands still stopped"
    return out


def parse_output_file(text: str) -> dict[str, str]:
    """GITHUB_OUTPUT as the runner reads it: ``name=value`` lines and ``name<<DELIM`` … ``DELIM`` blocks."""
    out: dict[str, str] = {}
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    i = 0
    while i < len(lines):
        line = lines[i]
        eq, hd = line.find("="), line.find("<<")
        if eq >= 0 and (hd < 0 or eq < hd):
            out[line[:eq]] = line[eq + 1:]
            i += 1
            continue
        assert hd > 0, f"malformed output line {line!r}"
        name, delim = line[:hd], line[hd + 2:]
        body: list[str] = []
        i += 1
        while lines[i] != delim:  # IndexError: the runner fails the step (no closing delimiter)
            body.append(lines[i])
            i += 1
        out[name] = "\n".join(body)
        i += 1
    return out


# ------------------------------------------------------------------------------------------- the harness

@dataclass
class ActionRun:
    rc: int
    log: str
    commands: list[Command]
    outputs: dict[str, str]
    steps: dict[str, dict[str, str]]
    summary: str
    ran: list[str] = field(default_factory=list)

    def annotations(self, level: str) -> list[Command]:
        return [c for c in self.commands if c.name == level]


def _evaluate(expr: str, ctx: dict) -> str:
    parts = expr.split(".")
    if len(parts) == 2 and parts[0] == "inputs":
        return ctx["inputs"][parts[1]]
    if expr == "github.action_path":
        return ctx["action_path"]
    if expr == "runner.temp":
        return ctx["runner_temp"]
    if len(parts) == 4 and parts[0] == "steps" and parts[2] == "outputs":
        return ctx["steps"].get(parts[1], {}).get(parts[3], "")
    raise AssertionError(f"the harness does not evaluate ${{{{ {expr} }}}}; teach it, or simplify action.yml")


def substitute(value: str, ctx: dict) -> str:
    return EXPR.sub(lambda m: _evaluate(m.group(1), ctx), str(value))


def run_action(inputs: dict[str, str], *, tmp: Path, workspace: Path, env: dict[str, str] | None = None,
               skip_install: bool = True, timeout: float = 600) -> ActionRun:
    action = load_action()
    declared = action["inputs"]
    unknown = set(inputs) - set(declared)
    assert not unknown, f"not inputs of action.yml: {unknown}"
    ctx = {"inputs": {k: str(inputs.get(k, spec.get("default", ""))) for k, spec in declared.items()},
           "action_path": str(ROOT), "runner_temp": str(tmp / "runner_temp"), "steps": {}}
    Path(ctx["runner_temp"]).mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ)
    base_env.update({"GITHUB_ACTIONS": "true", "CI": "true", "GITHUB_ACTION_PATH": str(ROOT),
                     "GITHUB_WORKSPACE": str(workspace), "RUNNER_TEMP": ctx["runner_temp"],
                     "PYTHONPATH": str(ROOT)})
    if skip_install:
        base_env.update({"HF_PROVENANCE_ACTION_SKIP_INSTALL": "1", "HF_PROVENANCE_ACTION_PYTHON": sys.executable})
    base_env.update(env or {})
    log, summary, ran, rc = [], [], [], 0
    for n, step in enumerate(action["runs"]["steps"]):
        if "uses" in step:
            continue  # actions/setup-python: the harness already runs on Python >= 3.11
        assert step["shell"] == "bash"
        files = {k: tmp / f"step{n}_{k}" for k in ("output", "summary", "env", "path", "state")}
        for f in files.values():
            f.write_text("")
        script = tmp / f"step{n}.sh"
        script.write_text(step["run"])
        step_env = {**base_env, "GITHUB_OUTPUT": str(files["output"]), "GITHUB_STEP_SUMMARY": str(files["summary"]),
                    "GITHUB_ENV": str(files["env"]), "GITHUB_PATH": str(files["path"]),
                    "GITHUB_STATE": str(files["state"])}
        step_env.update({k: substitute(v, ctx) for k, v in (step.get("env") or {}).items()})
        proc = subprocess.run([*BASH, str(script)], cwd=workspace, env=step_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout)
        ran.append(step.get("id", f"step{n}"))
        text = proc.stdout.decode("utf-8", "replace")
        log.append(text)
        parse_commands(text)  # each step's stop/resume pairs are balanced
        if "id" in step:
            ctx["steps"][step["id"]] = parse_output_file(files["output"].read_text(encoding="utf-8"))
        summary.append(files["summary"].read_text(encoding="utf-8"))
        # the action leaves the job's environment alone (no token or path exported to later steps)
        assert files["env"].read_text() == "" and files["path"].read_text() == "", "GITHUB_ENV/GITHUB_PATH written"
        if proc.returncode != 0:
            rc = proc.returncode
            break
    outputs = {k: substitute(v["value"], ctx) for k, v in action["outputs"].items()}
    full = "".join(log)
    return ActionRun(rc, full, parse_commands(full), outputs, ctx["steps"], "".join(summary), ran)


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def models(make):
    return {v: make("llama", v) for v in ("base", "finetune", "independent")}


@pytest.fixture
def ws(tmp_path):
    """A checked-out repository (the workspace) and the harness's temp folder."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return workspace


def copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def lfs_checkout(dst: Path, src: str) -> Path:
    """A model folder as `actions/checkout` leaves it without `lfs: true`: weights replaced by pointer files."""
    copy_model(src, dst)
    (dst / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 1572864\n")
    return dst


def assert_only_our_commands(run: ActionRun) -> None:
    """Every command the runner would act on is one this action writes, and every annotation carries our title."""
    for c in run.commands:
        assert c.name in OUR_COMMANDS, f"unexpected workflow command {c.line!r}"
        if c.name in ("error", "warning", "notice"):
            assert c.props.get("title", "").startswith("hf-provenance"), f"annotation not ours: {c.line!r}"
            assert set(c.props) <= {"title", "file"}, c.line
        if c.name in ("group", "endgroup"):
            assert c.data in ("hf-provenance", ""), c.line


# ------------------------------------------------------------------------------------------- action.yml itself

def _check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (in the test extra)")
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
                          capture_output=True, text=True, timeout=120)


def test_action_yml_validates_against_the_github_actions_schema():
    proc = _check_jsonschema("vendor.github-actions", ACTION_YML)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_self_test_workflow_validates_against_the_github_workflows_schema():
    proc = _check_jsonschema("vendor.github-workflows", WORKFLOW_YML)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_self_test_workflow_uses_the_local_action_against_factory_models():
    wf = yaml.safe_load(WORKFLOW_YML.read_text(encoding="utf-8"))
    steps = wf["jobs"]["action"]["steps"]
    assert sum(s.get("uses") == "./" for s in steps) >= 3
    assert any("from hf_provenance.factory import build" in s.get("run", "") for s in steps)
    for s in steps:
        assert "${{" not in s.get("run", ""), f"expression in a run body: {s.get('name')}"


def test_no_expression_in_any_run_body_and_inputs_reach_scripts_only_through_env():
    action = load_action()
    assert action["runs"]["using"] == "composite"
    used_inputs: set[str] = set()
    for step in action["runs"]["steps"]:
        if "run" in step:
            assert "${{" not in step["run"], f"expression interpolated into shell code: {step['run']!r}"
            assert step["shell"] == "bash" and "if" not in step
            for value in (step.get("env") or {}).values():
                for expr in EXPR.findall(str(value)):
                    assert re.fullmatch(r"inputs\.[\w-]+|steps\.[\w-]+\.outputs\.[\w-]+", expr), expr
                    used_inputs.update(re.findall(r"^inputs\.([\w-]+)$", expr))
        else:
            assert step["uses"].startswith("actions/setup-python@") and step["if"] == "inputs.python-version != ''"
            used_inputs.update(re.findall(r"inputs\.([\w-]+)", json.dumps(step)))
    assert used_inputs == set(action["inputs"]), "every input is used, and only through env: or with:"
    for script in (ROOT / "action").iterdir():
        if script.suffix in (".sh", ".py"):
            assert "${{" not in script.read_text(encoding="utf-8"), script.name
    # every variable the scripts read is set by action.yml (no input silently dropped)
    env_names = {k for s in action["runs"]["steps"] for k in (s.get("env") or {})}
    read = set(re.findall(r"HFP_[A-Z_]+", (ROOT / "action" / "check.py").read_text()
                          + (ROOT / "action" / "install.sh").read_text()))
    assert read <= env_names, read - env_names


def test_outputs_are_the_ones_the_script_writes():
    check = load_check()
    action = load_action()
    from_check = {k for k, v in action["outputs"].items() if "steps.check." in v["value"]}
    assert from_check == set(check.OUTPUT_NAMES)


@pytest.mark.parametrize("raw, data, prop", [
    ("plain", "plain", "plain"),
    ("50% done", "50%25 done", "50%25 done"),
    ("a\r\nb", "a%0D%0Ab", "a%0D%0Ab"),
    ("title: a, b", "title: a, b", "title%3A a%2C b"),
    ("%0A::error::x", "%250A::error::x", "%250A%3A%3Aerror%3A%3Ax"),
])
def test_workflow_command_escaping(raw, data, prop):
    check = load_check()
    assert check.escape_data(raw) == data
    assert check.escape_property(raw) == prop
    assert _unescape_data(data) == raw and _unescape_property(prop) == raw


@pytest.mark.parametrize("raw, expected", [
    ("a/b", ["a/b"]),
    ("a/b, c/d", ["a/b", "c/d"]),
    ("a/b\nc/d\n", ["a/b", "c/d"]),
    (" a/b ,\r\n\n c/d , a/b", ["a/b", "c/d"]),
    ("", []),
])
def test_base_models_are_comma_or_newline_separated(raw, expected):
    assert load_check().split_list(raw) == expected


# ------------------------------------------------------------------------------------------- runs

def test_fine_tune_against_its_base_passes(models, ws, tmp_path):
    """The default model `.`: the checkout is the fine-tune. It also holds a `hf_provenance/` package and a
    `json.py` that would create a canary if imported: the tool runs with `python -P`, so neither is."""
    repo = copy_model(models["finetune"], ws / "repo")
    canary = tmp_path / "imported-from-the-checkout"
    evil = f"import pathlib\npathlib.Path({str(canary)!r}).write_text('x')\n"
    (repo / "hf_provenance").mkdir()
    (repo / "hf_provenance" / "__init__.py").write_text(evil)
    (repo / "json.py").write_text(evil)
    run = run_action({"base-models": models["base"], "fail-on": "independent"}, tmp=tmp_path, workspace=repo)

    assert run.rc == 0, run.log
    assert not canary.exists()
    out = run.outputs
    assert (out["verdict"], out["relation"], out["base"], out["exit-code"], out["error"]) == \
        ("derived", "finetune", models["base"], "0", "")
    assert json.loads(out["verdicts"]) == {models["base"]: "derived"}
    assert out["report-dir"] == str(tmp_path / "runner_temp" / "hf-provenance")
    doc = json.loads(Path(out["report-json"]).read_text())
    assert doc["schema"] == "hf-provenance.compare/1" and doc["comparisons"][0]["verdict"] == "derived"
    assert doc["model"]["ref"] == "."
    assert Path(out["report-html"]).read_text().lstrip().lower().startswith("<!doctype html")
    section = Path(out["report-markdown"]).read_text()
    assert section.startswith("<!-- hf-provenance:start -->") and "## Weight provenance" in section
    assert out["python"] == sys.executable
    # the summary: status, the table, and the card section rendered from the saved report
    assert "## hf-provenance: passed" in run.summary
    assert "| 1 | <code>" in run.summary and "**derived** | finetune | no |" in run.summary
    assert section.strip() in run.summary
    assert "img.shields.io/badge/provenance-shares_lineage_with" in run.summary
    # annotations: one notice, no error
    assert [c.data for c in run.annotations("notice")] == [f". vs base {models['base']}: derived (finetune)"]
    assert run.annotations("error") == [] and run.annotations("warning") == []
    assert_only_our_commands(run)
    assert run.ran == ["install", "check"]


def test_independent_model_fails_the_job_with_an_error_annotation(models, ws, tmp_path):
    run = run_action({"model": models["independent"], "base-models": models["base"], "fail-on": "independent"},
                     tmp=tmp_path, workspace=ws)
    assert run.rc == 1, run.log
    assert (run.outputs["verdict"], run.outputs["exit-code"]) == ("independent", "1")
    [err] = run.annotations("error")
    assert err.props["title"] == "hf-provenance: verdict independent"
    assert err.data.startswith(f"{models['independent']} vs base {models['base']}: verdict independent is in "
                               "fail-on (independent); ")
    assert run.annotations("notice") == []
    assert "## hf-provenance: failed: a fail-on verdict matched" in run.summary
    assert "**independent** | — | yes |" in run.summary
    assert "hf-provenance:start" in run.summary  # the section is still rendered
    assert_only_our_commands(run)


def test_fail_on_best_looks_at_the_top_ranked_base_only(models, ws, tmp_path):
    run = run_action({"model": models["finetune"], "base-models": f"{models['independent']},{models['base']}",
                      "fail-on": "", "fail-on-best": "independent"}, tmp=tmp_path, workspace=ws)
    assert run.rc == 0, run.log  # the independent base is ranked second
    assert run.outputs["verdict"] == "derived"


@pytest.mark.parametrize("sep", ["\n", ", "], ids=["newline", "comma"])
def test_several_bases(models, ws, tmp_path, sep):
    bases = sep.join([models["independent"], models["base"]]) + ("\n" if sep == "\n" else "")
    run = run_action({"model": models["finetune"], "base-models": bases, "fail-on": "inconclusive"},
                     tmp=tmp_path, workspace=ws)
    assert run.rc == 0, run.log
    verdicts = json.loads(run.outputs["verdicts"])
    assert list(verdicts.items()) == [(models["base"], "derived"), (models["independent"], "independent")]
    assert (run.outputs["verdict"], run.outputs["base"]) == ("derived", models["base"])
    doc = json.loads(Path(run.outputs["report-json"]).read_text())
    assert len(doc["comparisons"]) == 2
    assert "**derived** | finetune | no |" in run.summary and "**independent** | — | no |" in run.summary
    assert_only_our_commands(run)


def test_lfs_pointer_checkout_gives_a_clear_error(models, ws, tmp_path):
    repo = lfs_checkout(ws / "repo", models["finetune"])
    # a second pointer file whose name tries to end the annotation and start another (names come from the repo)
    hostile_name = "shards/x,y:z\n::error::forged\r%0A::warning::forged.safetensors"
    (repo / "shards").mkdir()
    shutil.copy(repo / "model.safetensors", repo / hostile_name)
    run = run_action({"base-models": models["base"]}, tmp=tmp_path, workspace=repo)
    assert run.rc == 2
    err, err2 = run.annotations("error")
    assert err.props == {"title": "hf-provenance: input error", "file": "model.safetensors"}
    assert "Git LFS pointer" in err.data and "lfs: true" in err.data and "Hub id" in err.data
    assert err2.props == {"title": "hf-provenance: input error", "file": hostile_name}
    assert err2.data.startswith(f"{hostile_name} is a Git LFS pointer file")
    assert run.outputs["verdict"] == "" and run.outputs["exit-code"] == "2"
    assert "lfs: true" in run.outputs["error"]
    assert "## hf-provenance: input error (exit 2)" in run.summary
    assert_only_our_commands(run)


def test_lfs_pointer_without_the_precheck_is_still_exit_2(models, tmp_path):
    """The tool itself refuses a pointer file (what the pre-check anticipates): same exit code, its own line."""
    repo = lfs_checkout(tmp_path / "repo", models["finetune"])
    proc = subprocess.run([sys.executable, "-P", "-m", "hf_provenance.cli.main", "compare", f"--base={models['base']}",
                           "--", str(repo)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2
    assert "Git LFS pointer" in proc.stderr and "lfs: true" in proc.stderr


def test_network_failure_is_a_tool_error_not_a_verdict(models, ws, tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_PROVENANCE_HTTP_RETRIES": "0",
           "HF_PROVENANCE_HTTP_TIMEOUT": "2"}
    run = run_action({"model": "some-org/some-model", "base-models": models["base"], "fail-on": "independent"},
                     tmp=tmp_path, workspace=ws, env=env)
    assert run.rc == 3, run.log
    [err] = run.annotations("error")
    assert err.props["title"] == "hf-provenance: tool failure, not a provenance finding"
    assert err.data.startswith("hf-provenance: some-org/some-model: ")
    assert run.outputs["verdict"] == "" and run.outputs["verdicts"] == "" and run.outputs["exit-code"] == "3"
    assert "not a verdict" in run.summary
    assert_only_our_commands(run)


def test_update_card_file_writes_the_section_into_the_card(models, ws, tmp_path):
    repo = copy_model(models["finetune"], ws / "repo")
    before = (repo / "README.md").read_text()
    run = run_action({"base-models": models["base"], "update-card": "file"}, tmp=tmp_path, workspace=repo)
    assert run.rc == 0, run.log
    assert run.outputs["card-file"] == str(repo / "README.md")
    after = (repo / "README.md").read_text()
    assert after.startswith(before.rstrip("\n")) and "<!-- hf-provenance:start -->" in after
    assert Path(run.outputs["report-markdown"]).read_text().strip() in after


def test_update_card_pr_fetches_the_hub_card_at_the_compared_revision(models, ws, tmp_path):
    """A Hub model (the fake Hub of tests/hub_server.py): compared by byte ranges, its README.md fetched at the
    compared commit, the section inserted, and the pull request attempted. The fake Hub has no upload endpoint, so
    the push fails: exit 3, annotated as a failure of the tool, while the verdict outputs stand."""
    from tests.hub_server import FakeHub

    with FakeHub() as hub:
        commit = hub.add_repo("org/ft", models["finetune"])
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_PROVENANCE_HTTP_RETRIES": "0",
               "HF_PROVENANCE_HTTP_BACKOFF": "0", "HF_PROVENANCE_RANGE_CACHE": str(tmp_path / "ranges")}
        run = run_action({"model": "org/ft", "base-models": models["base"], "update-card": "pr",
                          "hf-token": "hf_fake_token"}, tmp=tmp_path, workspace=ws, env=env)
    assert run.rc == 3, run.log
    assert (run.outputs["verdict"], run.outputs["exit-code"]) == ("derived", "3")
    doc = json.loads(Path(run.outputs["report-json"]).read_text())
    assert doc["model"]["revision"] == commit
    card = (tmp_path / "runner_temp" / "hf-provenance" / "card" / "README.md").read_text()
    original = (Path(models["finetune"]) / "README.md").read_text()
    assert card.startswith(original.rstrip("\n")) and "<!-- hf-provenance:start -->" in card
    [err] = run.annotations("error")
    assert err.props["title"] == "hf-provenance: tool failure, not a provenance finding"
    assert err.data.startswith("updating the card failed: hf-provenance: org/ft: could not open the pull request")
    assert "hf_fake_token" not in run.log.replace("::add-mask::hf_fake_token", "")
    assert_only_our_commands(run)


@pytest.mark.parametrize("inputs, fragment", [
    ({"update-card": "pr"}, "model must be a Hub id"),
    ({"update-card": "sometimes"}, "update-card must be"),
    ({"hf-oidc-resource": "org/name"}, "id-token: write"),
])
def test_input_problems_stop_before_anything_runs(models, ws, tmp_path, inputs, fragment):
    run = run_action({"model": models["finetune"], "base-models": models["base"], **inputs}, tmp=tmp_path,
                     workspace=ws, env={"ACTIONS_ID_TOKEN_REQUEST_URL": ""})
    assert run.rc == 2
    [err] = run.annotations("error")
    assert fragment in err.data and err.props["title"] == "hf-provenance: input error"
    assert not (tmp_path / "runner_temp" / "hf-provenance" / "report.json").exists()


def test_usage_errors_of_the_tool_are_exit_2_annotations(models, ws, tmp_path):
    run = run_action({"model": models["finetune"], "base-models": models["base"], "sample": "2"},
                     tmp=tmp_path, workspace=ws)
    assert run.rc == 2
    [err] = run.annotations("error")
    assert err.data.startswith("hf-provenance: --sample: must be a fraction in (0, 1]")


# ------------------------------------------------------------------------------------------- hostile inputs

def hostile(canary: Path) -> list[str]:
    c = str(canary)
    return [f"$(touch {c})", f"`touch {c}`", f"\"; touch {c}; echo \"", f"'; touch {c}; echo '", f"; rm -rf {c}",
            f"x\ntouch {c}", f"${{IFS}}touch${{IFS}}{c}", "::error::forged-v2", "%0A::error::forged-escaped",
            "x\r::warning::forged-cr", "##[error]forged-v1", "  ::notice title=x::forged-indented"]


@pytest.mark.parametrize("field", ["model", "base-models", "sample", "seed", "device", "fail-on", "fail-on-best",
                                   "update-card", "card-file", "report-dir"])
def test_hostile_input_values_execute_nothing_and_forge_no_command(models, ws, tmp_path, field):
    canary = tmp_path / "canary"
    values = hostile(canary)
    inputs = {"model": models["finetune"], "base-models": models["base"]}
    if field == "base-models":
        inputs[field] = "\n".join(values)  # the tool stops at the first ref that does not exist
    else:
        inputs[field] = ("rd-" if field == "report-dir" else "") + "\n".join(values)
    run = run_action(inputs, tmp=tmp_path, workspace=ws)
    assert not canary.exists()
    assert run.rc in (0, 2), run.log  # refused as an input or usage error (or harmless data: report-dir)
    assert_only_our_commands(run)
    for c in run.commands:
        assert "forged" not in c.props.get("title", "")
    if run.rc == 2:
        [err] = run.annotations("error")
        assert err.props["title"] == "hf-provenance: input error"
    # outputs cannot be forged either: the names are ours, each value is one piece
    assert set(run.steps["check"]) == set(load_check().OUTPUT_NAMES)
    assert run.outputs["exit-code"] == str(run.rc)


def test_hostile_token_is_masked_before_anything_and_never_printed(models, ws, tmp_path):
    canary = tmp_path / "canary"
    token = f"hf_Secret$(touch {canary})`touch {canary}`"
    run = run_action({"model": models["finetune"], "base-models": models["base"],
                      "hf-token": token + "\n::error::forged"}, tmp=tmp_path, workspace=ws)
    assert run.rc == 0, run.log
    assert not canary.exists()
    masks = [c.data for c in run.commands if c.name == "add-mask"]
    assert token in masks and "::error::forged" in masks
    first = parse_commands(run.log.split("::stop-commands::")[0])
    assert [c.name for c in first][:len(masks)] == ["add-mask"] * len(masks), "mask before any other output"
    for line in run.log.splitlines():
        if token in line:
            assert line.startswith("::add-mask::"), f"token printed: {line!r}"
    assert_only_our_commands(run)


def test_hostile_folder_names_reach_annotations_as_data(models, ws, tmp_path):
    """Existing folders whose names hold newlines, % escapes and commands: the comparison runs, and each
    annotation is one command whose unescaped data is exactly the names."""
    model = copy_model(models["finetune"], tmp_path / "ft\n::error::forged %0A::warning::forged\r.")
    base = copy_model(models["base"], tmp_path / "base title:x %0A ##[error]forged")  # no comma or newline:
    # those separate base-models
    run = run_action({"model": str(model), "base-models": str(base), "fail-on": "independent"},
                     tmp=tmp_path, workspace=ws)
    assert run.rc == 0, run.log
    assert [c.data for c in run.annotations("notice")] == [f"{model} vs base {base}: derived (finetune)"]
    assert run.annotations("error") == [] and run.annotations("warning") == []
    assert json.loads(run.outputs["verdicts"]) == {str(base): "derived"}
    assert run.outputs["base"] == str(base)
    assert_only_our_commands(run)


def test_hostile_ref_in_the_tools_error_line_stays_data(models, ws, tmp_path):
    """The tool names the missing ref in its one-line error; the runner reads it as data, and the annotation
    carries it escaped (one line, no second command)."""
    ref = "./nope ::error title=forged::x %0A::error::forged ##[error]forged"
    run = run_action({"model": models["finetune"], "base-models": f"{models['base']}\n{ref}"},
                     tmp=tmp_path, workspace=ws)
    assert run.rc == 2
    [err] = run.annotations("error")
    assert err.props["title"] == "hf-provenance: input error"
    assert ref in err.data
    raw = [line for line in run.log.splitlines() if line.startswith("hf-provenance: ./nope")]
    assert raw and _parse_v1(raw[0], REGISTERED) is not None  # would be a command outside stop-commands
    assert_only_our_commands(run)


# ------------------------------------------------------------------------------------------- the install script

FAKE_PYTHON = """#!/usr/bin/env bash
# records each call's arguments (NUL-separated, then an END-OF-CALL record) and fakes `-m venv DIR`
printf '%s\\0' "$@" END-OF-CALL >> "$FAKE_LOG"
if [[ $1 == -m && $2 == venv ]]; then mkdir -p "$3/bin" && ln -sf "$0" "$3/bin/python"; fi
exit 0
"""


def fake_calls(log: Path) -> list[list[str]]:
    calls, cur = [], []
    for arg in log.read_bytes().decode().split("\0")[:-1]:
        if arg == "END-OF-CALL":
            calls.append(cur)
            cur = []
        else:
            cur.append(arg)
    return calls


def test_install_script_passes_hostile_values_as_single_arguments(ws, tmp_path):
    canary = tmp_path / "canary"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    torch_spec = f"torch==2.13.0; touch {canary}"
    index = f"https://example.invalid/$(touch {canary})"
    log = tmp_path / "calls.log"
    run = run_action({"torch": torch_spec, "torch-index-url": index}, tmp=tmp_path, workspace=ws,
                     skip_install=False, env={"PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_LOG": str(log),
                                              "HF_PROVENANCE_ACTION_SKIP_INSTALL": ""})
    assert not canary.exists()
    venv_py = str(tmp_path / "runner_temp" / "hf-provenance-venv" / "bin" / "python")
    assert run.steps["install"]["python"] == venv_py
    calls = fake_calls(log)
    assert ["-m", "venv", str(tmp_path / "runner_temp" / "hf-provenance-venv")] in calls
    pip = [c for c in calls if c[:3] == ["-m", "pip", "install"]]
    assert pip[0][-3:] == [f"--index-url={index}", "--", torch_spec]
    assert pip[1][-2:] == ["--", f"{ROOT}[plots]"]
    # the fake `import hf_provenance` "works", so the check step ran with the venv interpreter (the fake)
    assert run.ran == ["install", "check"]


def test_install_refuses_a_torch_option(ws, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text(FAKE_PYTHON)
    (fake_bin / "python3").chmod(0o755)
    run = run_action({"torch": "--index-url=http://evil.invalid/ torch"}, tmp=tmp_path, workspace=ws,
                     skip_install=False, env={"PATH": f"{fake_bin}:{os.environ['PATH']}",
                                              "FAKE_LOG": str(tmp_path / "log"),
                                              "HF_PROVENANCE_ACTION_SKIP_INSTALL": ""})
    assert run.rc == 2 and run.ran == ["install"]
    [err] = run.annotations("error")
    assert err.props["title"] == "hf-provenance: install" and "not an option" in err.data


def test_skip_install_needs_an_interpreter_that_imports_the_package(ws, tmp_path):
    run = run_action({}, tmp=tmp_path, workspace=ws, env={"HF_PROVENANCE_ACTION_PYTHON": "/bin/false"})
    assert run.rc == 2 and run.ran == ["install"]
    [err] = run.annotations("error")
    assert "cannot import hf_provenance" in err.data
