"""The model-card section and the ``card`` command: content read from real factory comparisons, stable markers,
byte-exact preservation outside them (CRLF, no YAML header), refusal of a report of other weights, the metadata
policy, the Hub pull request (a recording fake HfApi; no network), packaging of the templates."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jinja2
import pytest

from hf_provenance import schemas
from hf_provenance.cli.main import main
from hf_provenance.compare import compare
from hf_provenance.errors import InputError
from hf_provenance.report import badge, card
from hf_provenance.report.templates import code, code_cell, md
from hf_provenance.sources import open_model

ROOT = Path(__file__).resolve().parents[1]
SHA_MODEL = "1" * 40
SHA_BASE = "2" * 40


def _doc(model: str, bases: list[str], **kw) -> dict:
    doc = compare(model, bases, **kw).to_dict()
    schemas.validate(doc)  # every report a test renders matches its schema
    return doc


class AsHub:
    """A local factory model presented as a Hub repo (ref, kind, revision), to test Hub-only paths offline."""

    def __init__(self, src, ref: str, revision: str):
        self._src, self.ref, self.kind, self.revision = src, ref, "hub", revision

    def __getattr__(self, name):
        return getattr(self._src, name)


@pytest.fixture(scope="session")
def models(make):
    return {"base": make("llama"), "ft": make("llama", "finetune"), "indep": make("llama", "independent"),
            "moe_base": make("qwen3_moe"), "moe_ft": make("qwen3_moe", "finetune")}


@pytest.fixture(scope="session")
def reports(models):
    return {"ft": _doc(models["ft"], [models["base"]]), "indep": _doc(models["indep"], [models["base"]]),
            "moe": _doc(models["moe_ft"], [models["moe_base"]])}


@pytest.fixture(scope="session")
def hub_refs(models):
    """open_fn mapping Hub-like ids to the factory folders."""
    table = {"org/llama-ft": (models["ft"], SHA_MODEL), "org/llama-base": (models["base"], SHA_BASE),
             "org/llama-indep": (models["indep"], "3" * 40)}

    def open_fn(ref: str):
        if ref.split("@")[0] in table:
            path, sha = table[ref.split("@")[0]]
            return AsHub(open_model(path), ref.split("@")[0], sha)
        return open_model(ref)

    return open_fn


@pytest.fixture(scope="session")
def hub_report(hub_refs):
    return _doc("org/llama-ft", ["org/llama-base"], open_fn=hub_refs)


def run(capsys, *argv) -> tuple[int, str, str]:
    code_ = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code_, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _save(tmp_path, doc, name="report.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc, allow_nan=False), encoding="utf-8")
    return p


def _fmt(x: float) -> str:
    return f"{x:.3f}"


# ------------------------------------------------------------------------------------------------ content

def test_section_finetune_states_verdict_figures_and_provenance(reports, models):
    doc = reports["ft"]
    c = doc["comparisons"][0]
    assert c["verdict"] == "derived"
    s = card.render_section(doc)
    base_name = os.path.basename(models["base"])
    assert s.startswith(card.START) and s.endswith(card.END)
    assert f"### {md(base_name)}: derived" in s
    assert f"**This model shares weight lineage with {md(base_name)}.**" in s
    assert "relation: finetune (Hub `base_model_relation`: `finetune`)" in s
    assert f"Direction: {c['direction']}." in s
    for r in c["reasons"]:
        assert f"- {md(r)}" in s
    # component rows carry the report's numbers (value, upper bound, cosine, evidence count)
    for name, g in c["components"].items():
        row = next(line for line in s.splitlines() if line.startswith(f"| {md(name)} |"))
        cells = [x.strip() for x in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert cells[1] == str(g["n_tensors"])
        assert cells[3] == _fmt(g["pearson"]["value"])
        assert cells[4] == _fmt(g["abs_pearson"]["upper"])
        assert cells[6] == f"{g['n_evidence']}/{g['n_tensors']}"
    overall = c["overall"]["pearson"]["value"]
    assert f"| **overall** | {c['overall']['n_tensors']} |" in s and _fmt(overall) in s
    # layer profile: one row per layer with its r̄
    for g in c["layers"]:
        assert f"| {g['layer']} | {_fmt(g['pearson']['value'])} |" in s
    # thresholds used
    th = doc["run"]["thresholds"]
    assert f"`|r| ≥ {th['r_derived']}` and `|z| ≥ {th['z_derived']}`" in s
    assert f"δ = {th['delta']}" in s and th["source"].split(";")[0] in s
    # how it was measured: tool version, content ids, revision, seed, date, full read
    assert f"| tool | hf-provenance {doc['tool']['version']} |" in s
    assert doc["model"]["content_id"]["value"] in s and c["base"]["content_id"]["value"] in s
    assert f"| seed | {doc['run']['seed']} |" in s
    assert f"| date | {doc['run']['started']} |" in s
    assert "full read of every compared tensor" in s
    # architecture, alignment, hashes
    assert "All 44 compared configuration fields match." in s or "configuration fields differ" in s
    assert "- method: identity (same canonical key, same shape)" in s
    assert "- bit-equal after decoding: 0 of 39 tensors" in s
    # the one command that reproduces it
    repro = f"hf-provenance compare {models['ft']} --base {models['base']} --seed 0 --json provenance.json"
    assert f"```sh\n{repro}\n```" in s
    # shields badge of the top base
    assert f"[![provenance: shares lineage with {md(base_name)}]({badge.badge_url(doc)})](#weight-provenance)" in s
    # never an accusation the weights cannot support
    for word in ("stole", "stolen", "plagiar", "copied from", "theft", "violat"):
        assert word not in s.lower()


def test_section_independent(reports, models):
    doc = reports["indep"]
    c = doc["comparisons"][0]
    assert c["verdict"] == "independent"
    s = card.render_section(doc)
    name = md(os.path.basename(models["base"]))
    assert f"### {name}: independent" in s
    assert f"**This model shows no shared weight lineage with {name}.**" in s
    assert "base_model_relation" not in s.split("#### Per-component")[0]  # no Hub relation for independent
    upper = c["overall"]["abs_pearson"]["upper"]
    assert "| **overall** |" in s and _fmt(upper) in s
    assert "below δ" in s
    assert md(c["reasons"][0]) in s and "95% upper bound" in s
    assert "Direction: not applicable." in s
    assert "independent_of_" in badge.badge_url(doc) and badge.badge_url(doc).endswith("-6c757d")


def test_section_moe_finetune(reports, models):
    doc = reports["moe"]
    c = doc["comparisons"][0]
    assert c["verdict"] == "derived"
    s = card.render_section(doc)
    g = c["components"]["routed_experts"]
    assert f"| routed\\_experts | {g['n_tensors']} | {card_params(g['params'])} | {_fmt(g['pearson']['value'])} |" in s
    assert "| router |" in s
    assert md(os.path.basename(models["moe_base"])) in s
    assert f"--base {models['moe_base']} --seed 0" in s


def card_params(n: int) -> str:
    from hf_provenance.report.console import fmt_params

    return fmt_params(n)


def test_section_two_bases_ranked(models):
    doc = _doc(models["ft"], [models["indep"], models["base"]])
    s = card.render_section(doc)
    assert "| rank | base | verdict |" in s
    first = s.index("| 1 |")
    assert "derived" in s[first:first + 200]
    assert s.count("--base ") == 2
    assert f"| base 1 | `{models['base']}`" in s and f"| base 2 | `{models['indep']}`" in s


def test_sampled_report_shows_fraction_and_intervals(models):
    doc = _doc(models["ft"], [models["base"]], sample=0.5, seed=3)
    s = card.render_section(doc)
    assert "a sample of 50% of the row blocks, with 95% intervals" in s
    assert "--sample 0.5 --seed 3" in s
    assert "by the stratified jackknife" in s


def test_markdown_escaping_of_report_text(reports):
    doc = json.loads(json.dumps(reports["ft"]))
    c = doc["comparisons"][0]
    c["base"]["ref"] = "org/evil|<img src=x>_*name*"
    c["base"]["kind"] = "hub"
    c["reasons"] = ["r | z <b>bold</b> [link](http://x) $x$"]
    s = card.render_section(doc)
    outside_code = re.sub(r"`[^`]*`", "", s)
    assert not re.search(r"(?<!\\)<(img|b>)", outside_code)  # only backslash-escaped
    assert r"| base 1 | `org/evil\|<img src=x>_*name*`, revision" in s  # code span in a table: pipe escaped
    assert r"org/evil\|\<img src=x\>\_\*name\*" in s
    assert r"- r \| z \<b\>bold\</b\> \[link\](http://x) \$x\$" in s
    assert md("# title") == r"\# title" and md("1. item") == r"1\. item" and md("a\nb") == "a b"
    assert code("a`b") == "``a`b``" and code("`x") == "`` `x ``"
    assert code_cell("a|b") == r"`a\|b`"


def test_templates_are_strict(reports):
    doc = json.loads(json.dumps(reports["ft"]))
    del doc["tool"]["version"]
    with pytest.raises(jinja2.UndefinedError, match="version"):
        card.render_section(doc)


# ------------------------------------------------------------------------------------------------ markers

CARD_LF = "---\nlicense: mit\nbase_model: org/llama-base\n---\n\n# Model\n\nSome text.\n"


def test_insert_appends_then_replaces_in_place():
    sec1 = f"{card.START}\none\n{card.END}"
    sec2 = f"{card.START}\ntwo\nlines\n{card.END}"
    once = card.insert_section(CARD_LF, sec1)
    assert once.startswith(CARD_LF) and once.endswith(sec1 + "\n")
    assert card.insert_section(once, sec1) == once
    twice = card.insert_section(once, sec2)
    assert twice == CARD_LF + "\n" + sec2 + "\n"
    # text after the markers survives too
    wrapped = "intro\n" + sec1 + "\ntrailing ✓ text\n"
    assert card.insert_section(wrapped, sec2) == "intro\n" + sec2 + "\ntrailing ✓ text\n"


@pytest.mark.parametrize("text", ["no newline at end", "# Title\r\n\r\nbody\r\n", "\ufeff# BOM card\n", ""])
def test_insert_keeps_prefix_and_line_endings(text):
    sec = f"{card.START}\nx\n{card.END}"
    out = card.insert_section(text, sec)
    assert out.startswith(text)
    if "\r\n" in text:
        assert "\n" not in out.replace("\r\n", "")
    assert card.extract_section(out).replace("\r\n", "\n") == sec


@pytest.mark.parametrize("bad", [f"{card.START}\n", f"{card.END}\n{card.START}\n",
                                 f"{card.START}\n{card.END}\n{card.START}\n{card.END}\n"])
def test_unbalanced_markers_are_refused(bad):
    with pytest.raises(InputError, match="marker"):
        card.insert_section(bad, f"{card.START}\nx\n{card.END}", where="README.md")


# ------------------------------------------------------------------------------------------------ card command

@pytest.mark.parametrize("original", [
    CARD_LF,
    "# No YAML header\n\nJust text, no trailing newline",
    "---\r\nlicense: mit\r\n---\r\n\r\n# CRLF card\r\n\r\nBody.\r\n",
], ids=["yaml", "no-yaml", "crlf"])
def test_card_from_json_twice_keeps_outside_bytes(capsys, tmp_path, reports, models, original):
    report = _save(tmp_path, reports["ft"])
    readme = tmp_path / "README.md"
    readme.write_bytes(original.encode("utf-8"))
    code_, out, err = run(capsys, "card", models["ft"], "--from-json", report, "--write", readme)
    assert code_ == 0, err
    assert "wrote the provenance section" in out and "derived: this model shares weight lineage" in out
    first = readme.read_bytes()
    assert first.startswith(original.encode("utf-8"))
    text = first.decode("utf-8")
    if "\r\n" in original:
        assert "\n" not in text.replace("\r\n", "")
    section = card.extract_section(text)
    assert section.replace("\r\n", "\n") == card.render_section(reports["ft"])
    # second write: nothing changes (not even the mtime)
    mtime = readme.stat().st_mtime_ns
    code_, out, err = run(capsys, "card", models["ft"], "--from-json", report, "--write", readme)
    assert code_ == 0 and "unchanged" in out
    assert readme.read_bytes() == first and readme.stat().st_mtime_ns == mtime
    # content after the markers survives a replacement byte for byte
    tail = "\r\nAfter the section ✓\r\n" if "\r\n" in original else "\nAfter the section ✓\n"
    readme.write_bytes(first + tail.encode())
    code_, _, _ = run(capsys, "card", models["ft"], "--from-json", _save(tmp_path, reports["ft"], "r2.json"),
                      "--write", readme)
    assert code_ == 0 and readme.read_bytes() == first + tail.encode()


def test_card_creates_missing_file_and_prints_to_stdout(capsys, tmp_path, reports, models):
    report = _save(tmp_path, reports["ft"])
    readme = tmp_path / "new" / "README.md"
    assert run(capsys, "card", models["ft"], "--from-json", report, "--write", readme)[0] == 0
    assert readme.read_text(encoding="utf-8") == card.render_section(reports["ft"]) + "\n"
    code_, out, _ = run(capsys, "card", models["ft"], "--from-json", report, "--write", "-")
    assert code_ == 0 and out == card.render_section(reports["ft"]) + "\n"


def test_card_refuses_report_of_other_weights(capsys, tmp_path, reports, models):
    """A new revision of the model (its safetensors header changed) no longer matches the saved report."""
    from safetensors.torch import load_file, save_file

    v2 = tmp_path / "llama-ft-v2"
    shutil.copytree(models["ft"], v2)
    tensors = load_file(v2 / "model.safetensors")
    save_file(tensors, v2 / "model.safetensors", metadata={"format": "pt", "revision": "2"})
    report = _save(tmp_path, reports["ft"])
    readme = tmp_path / "README.md"
    readme.write_text(CARD_LF)
    code_, out, err = run(capsys, "card", v2, "--from-json", report, "--write", readme)
    assert code_ == 2 and out == ""
    line = one_line(err)
    assert line.startswith(f"hf-provenance: {report}: made for layout_id ")
    assert "not rendering a report of other weights" in line
    assert readme.read_text() == CARD_LF


@pytest.mark.parametrize("argv, where, problem", [
    (["--from-json", "nope.json"], "nope.json", "no such report file"),
    (["--from-json", "{bad}"], "{bad}", "not JSON"),
    (["--from-json", "{other}"], "{other}", "not a compare report"),
    (["--from-json", "{report}", "--seed", "3"], "--seed", "has no effect with --from-json"),
    (["--from-json", "{report}", "--push"], "--push", "needs MODEL as a Hub id"),
    (["--from-json", "{report}", "--replace-declared"], "--replace-declared", "only applies with --set-metadata"),
])
def test_card_usage_errors(capsys, tmp_path, reports, models, argv, where, problem):
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "other.json").write_text('{"schema": "hf-provenance.inspect/1"}')
    report = _save(tmp_path, reports["ft"])
    sub = {"{bad}": str(tmp_path / "bad.json"), "{other}": str(tmp_path / "other.json"), "{report}": str(report)}
    argv = [sub.get(a, a) for a in argv]
    where = sub.get(where, where)
    code_, _, err = run(capsys, "card", models["ft"], *argv, "--write", tmp_path / "README.md")
    assert code_ == 2
    assert one_line(err).startswith(f"hf-provenance: {where}: {problem}")
    assert not (tmp_path / "README.md").exists()


def test_card_with_base_runs_the_comparison(capsys, tmp_path, models):
    readme = tmp_path / "README.md"
    code_, out, err = run(capsys, "card", models["ft"], "--base", models["base"], "--write", readme)
    assert code_ == 0, err
    text = readme.read_text(encoding="utf-8")
    assert "shares weight lineage with" in text and text.count(card.START) == 1
    assert f"`hf-provenance card {models['ft']} --base {models['base']} --write {readme}`" in text


# ------------------------------------------------------------------------------------------------ metadata

def _patch_open(monkeypatch, hub_refs):
    import hf_provenance.sources as sources

    monkeypatch.setattr(sources, "open_model", lambda ref, **kw: hub_refs(ref))


def test_set_metadata_fills_missing_base(capsys, tmp_path, monkeypatch, hub_refs, hub_report):
    _patch_open(monkeypatch, hub_refs)
    report = _save(tmp_path, hub_report)
    readme = tmp_path / "README.md"
    original = "---\n# a comment kept\nlicense: mit\ntags:\n- a\n- b\n---\n# Card\n"
    readme.write_text(original)
    code_, out, err = run(capsys, "card", "org/llama-ft", "--from-json", report, "--write", readme, "--set-metadata")
    assert code_ == 0, err
    text = readme.read_text()
    assert text.startswith("---\n# a comment kept\nlicense: mit\ntags:\n- a\n- b\nbase_model: org/llama-base\n"
                           "base_model_relation: finetune\n---\n# Card\n")
    assert card.read_metadata(text) == {"license": "mit", "tags": ["a", "b"], "base_model": "org/llama-base",
                                        "base_model_relation": "finetune"}
    assert "metadata: set base_model: org/llama-base" in out
    code_, out, _ = run(capsys, "card", "org/llama-ft", "--from-json", report, "--write", readme, "--set-metadata")
    assert code_ == 0 and "unchanged" in out and readme.read_text() == text


def test_set_metadata_on_card_without_header_and_crlf(capsys, tmp_path, monkeypatch, hub_refs, hub_report):
    _patch_open(monkeypatch, hub_refs)
    report = _save(tmp_path, hub_report)
    readme = tmp_path / "README.md"
    readme.write_bytes(b"# Card\r\n\r\nBody.\r\n")
    assert run(capsys, "card", "org/llama-ft", "--from-json", report, "--write", readme, "--set-metadata")[0] == 0
    data = readme.read_bytes()
    assert data.startswith(b"---\r\nbase_model: org/llama-base\r\nbase_model_relation: finetune\r\n---\r\n"
                           b"# Card\r\n\r\nBody.\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_set_metadata_keeps_confirmed_declaration(capsys, tmp_path, monkeypatch, hub_refs, hub_report):
    _patch_open(monkeypatch, hub_refs)
    report = _save(tmp_path, hub_report)
    readme = tmp_path / "README.md"
    readme.write_text("---\nbase_model:\n  - org/llama-base\nbase_model_relation: quantized\n---\n")
    code_, out, _ = run(capsys, "card", "org/llama-ft", "--from-json", report, "--write", readme, "--set-metadata")
    assert code_ == 0
    assert card.read_metadata(readme.read_text()) == {"base_model": ["org/llama-base"],
                                                      "base_model_relation": "quantized"}
    assert "kept the declared base_model_relation 'quantized'; the evidence suggests 'finetune'" in out
    code_, out, _ = run(capsys, "card", "org/llama-ft", "--from-json", report, "--write", readme, "--set-metadata",
                        "--replace-declared")
    assert code_ == 0 and card.read_metadata(readme.read_text())["base_model_relation"] == "finetune"
    assert "replaced the declared base_model_relation 'quantized' with 'finetune'" in out


def test_set_metadata_refuses_to_overwrite_a_declared_base(capsys, tmp_path, monkeypatch, hub_refs, hub_report):
    _patch_open(monkeypatch, hub_refs)
    report = _save(tmp_path, hub_report)
    readme = tmp_path / "README.md"
    original = "---\nbase_model: someone/else\n---\n# Card\n"
    readme.write_text(original)
    code_, out, err = run(capsys, "card", "org/llama-ft", "--from-json", report, "--write", readme, "--set-metadata")
    assert code_ == 2 and out == ""
    assert one_line(err) == (
        f"hf-provenance: {readme}: the card declares base_model someone/else (someone/else: not compared), but the "
        "weights share lineage with org/llama-base; base_model not changed (compare against the declared base too, "
        "or pass --replace-declared)")
    assert readme.read_text() == original  # nothing written, not even the section
    code_, out, _ = run(capsys, "card", "org/llama-ft", "--from-json", report, "--write", readme, "--set-metadata",
                        "--replace-declared")
    assert code_ == 0
    assert card.read_metadata(readme.read_text())["base_model"] == "org/llama-base"
    assert "replaced the declared base_model someone/else (someone/else: not compared) with org/llama-base" in out


def test_set_metadata_with_no_lineage_changes_nothing(capsys, tmp_path, monkeypatch, hub_refs):
    _patch_open(monkeypatch, hub_refs)
    doc = _doc("org/llama-indep", ["org/llama-base"], open_fn=hub_refs)
    report = _save(tmp_path, doc)
    readme = tmp_path / "README.md"
    readme.write_text("---\nbase_model: org/llama-base\n---\n")
    code_, out, _ = run(capsys, "card", "org/llama-indep", "--from-json", report, "--write", readme,
                        "--set-metadata")
    assert code_ == 0
    assert card.read_metadata(readme.read_text()) == {"base_model": "org/llama-base"}
    assert ("the card declares org/llama-base as base_model, but the weights show no shared lineage with it "
            "(verdict independent); not removed") in out


def test_set_metadata_needs_hub_ids(capsys, tmp_path, reports, models):
    report = _save(tmp_path, reports["ft"])
    readme = tmp_path / "README.md"
    code_, _, err = run(capsys, "card", models["ft"], "--from-json", report, "--write", readme, "--set-metadata")
    assert code_ == 2 and "--set-metadata needs the base as a Hub id" in one_line(err)
    assert not readme.exists()


def test_update_metadata_refuses_unsafe_yaml():
    change = card.MetadataChange({"base_model": "org/b"})
    with pytest.raises(InputError, match="not valid YAML"):
        card.update_metadata("---\nkey: [unclosed\n---\n", change)


# ------------------------------------------------------------------------------------------------ push

class RecordingHfApi:
    calls: list = []

    def __init__(self, *args, **kwargs):
        RecordingHfApi.calls.append(("__init__", args, kwargs))

    def upload_file(self, **kwargs):
        RecordingHfApi.calls.append(("upload_file", (), kwargs))

        class Info:
            pr_url = "https://huggingface.co/org/llama-ft/discussions/7"

        return Info()

    def __getattr__(self, name):  # any other Hub call is a test failure
        raise AssertionError(f"unexpected HfApi.{name}")


def test_push_opens_a_pull_request(capsys, tmp_path, monkeypatch, hub_refs, hub_report):
    import huggingface_hub

    _patch_open(monkeypatch, hub_refs)
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    report = _save(tmp_path, hub_report)
    readme = tmp_path / "README.md"
    code_, out, err = run(capsys, "card", "org/llama-ft", "--from-json", report, "--write", readme, "--push")
    assert code_ == 0, err
    uploads = [c for c in RecordingHfApi.calls if c[0] == "upload_file"]
    assert len(uploads) == 1
    kw = uploads[0][2]
    assert kw["create_pr"] is True and kw["repo_id"] == "org/llama-ft" and kw["path_in_repo"] == "README.md"
    assert kw["repo_type"] == "model" and kw["parent_commit"] == SHA_MODEL and "revision" not in kw
    assert kw["path_or_fileobj"] == readme.read_bytes()
    assert "org/llama-base@" + SHA_BASE in kw["commit_description"]
    assert "opened a pull request: https://huggingface.co/org/llama-ft/discussions/7" in out


def test_push_failure_is_one_line_exit_3(capsys, tmp_path, monkeypatch, hub_refs, hub_report):
    import huggingface_hub

    class Failing(RecordingHfApi):
        def upload_file(self, **kwargs):
            raise ConnectionError("Max retries exceeded\nmore detail")

    _patch_open(monkeypatch, hub_refs)
    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    readme = tmp_path / "README.md"
    code_, _, err = run(capsys, "card", "org/llama-ft", "--from-json", _save(tmp_path, hub_report), "--write",
                        readme, "--push")
    assert code_ == 3
    assert one_line(err) == ("hf-provenance: org/llama-ft: could not open the pull request (ConnectionError: Max "
                             "retries exceeded); the card was written locally")
    assert readme.exists()


def test_reproduce_command_pins_hub_revisions(hub_report):
    s = card.render_section(hub_report)
    assert (f"hf-provenance compare org/llama-ft@{SHA_MODEL} --base org/llama-base@{SHA_BASE} --seed 0 "
            "--json provenance.json") in s
    assert f"| model | `org/llama-ft`, revision `{SHA_MODEL}`" in s


# ------------------------------------------------------------------------------------------------ badge

def test_badge_url_and_svg(reports):
    import xml.etree.ElementTree as ET

    doc = reports["moe"]
    url = badge.badge_url(doc)
    name = os.path.basename(doc["comparisons"][0]["base"]["ref"])
    assert url == ("https://img.shields.io/badge/provenance-shares_lineage_with_"
                   + name.replace("-", "--").replace("_", "__") + "-007ec6")
    svg = badge.badge_svg(doc)
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and root.get("aria-label") == f"provenance: shares lineage with {name}"
    assert "#007ec6" in svg and "http" not in svg.replace("http://www.w3.org/2000/svg", "")
    hub = {"comparisons": [{"rank": 1, "verdict": "partial", "base": {"ref": "org/a b-c_d", "kind": "hub"}}]}
    assert badge.badge_url(hub) == ("https://img.shields.io/badge/provenance-partly_shares_lineage_with_"
                                    "org%2Fa_b--c__d-1f9e89")


# ------------------------------------------------------------------------------------------------ compare outputs

def test_compare_writes_markdown_html_plots(capsys, tmp_path, models):
    out_dir = tmp_path / "out"
    md_file, html_file, plots = out_dir / "card.md", out_dir / "report.html", out_dir / "plots"
    code_, out, err = run(capsys, "compare", models["moe_ft"], "--base", models["moe_base"], "--json",
                          out_dir / "r.json", "--markdown", md_file, "--html", html_file, "--plots", plots)
    assert code_ == 0, err
    doc = json.loads((out_dir / "r.json").read_text())
    schemas.validate(doc)
    assert sorted(p.name for p in plots.iterdir()) == ["badge.svg", "components.png", "experts.png",
                                                       "layer_alignment.png", "layer_profile.png"]
    text = md_file.read_text(encoding="utf-8")
    assert text == card.render_section(doc, plots=[
        {"title": "Layer profile", "path": "plots/layer_profile.png"},
        {"title": "Per-tensor Pearson r by role and layer", "path": "plots/components.png"},
        {"title": "Expert pairs", "path": "plots/experts.png"},
        {"title": "Layer alignment map", "path": "plots/layer_alignment.png"}]) + "\n"
    assert "![Expert pairs](plots/experts.png)" in text
    assert out.splitlines()[-1] == "plots: pca not drawn: the report carries no layer sketches"
    html = html_file.read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') == 4


def test_compare_html_without_matplotlib(capsys, tmp_path, monkeypatch, models):
    from hf_provenance.report import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    code_, _, err = run(capsys, "compare", models["ft"], "--base", models["base"], "--plots", tmp_path / "p")
    assert code_ == 2 and one_line(err) == ("hf-provenance: --plots: needs matplotlib: pip install "
                                            "'hf-provenance[plots]'")
    code_, out, err = run(capsys, "compare", models["ft"], "--base", models["base"], "--html", tmp_path / "r.html")
    assert code_ == 0, err
    assert "html: plots not drawn: matplotlib is not installed" in out
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "data:image/png" not in html and "plots not drawn: matplotlib is not installed" in html


def test_compare_output_targets_are_checked_first(capsys, tmp_path, models):
    code_, _, err = run(capsys, "compare", models["ft"], "--base", models["base"], "--html", tmp_path)
    assert code_ == 2 and one_line(err) == f"hf-provenance: {tmp_path}: --html names a folder; give a file name"


# ------------------------------------------------------------------------------------------------ packaging

def test_pyproject_lists_every_package():
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_provenance").rglob("__init__.py")}
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert conf["package-dir"]["hf_provenance.templates"] == "templates"
    assert "*.j2" in conf["package-data"]["hf_provenance.templates"]


@pytest.mark.slow
def test_wheel_ships_templates_and_renders_outside_checkout(tmp_path, reports):
    pytest.importorskip("setuptools")
    wheel_dir, src = tmp_path / "wheel", tmp_path / "src"  # built from a copy: no build/ left in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("hf_provenance", "templates"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheel_dir), str(src)], capture_output=True, text=True, cwd=tmp_path)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1:]}")
    wheel = next(wheel_dir.glob("hf_provenance-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for t in ("card_section.md.j2", "html_report.html.j2", "_card_measured.md.j2"):
        assert f"hf_provenance/templates/{t}" in names
    assert "hf_provenance/statistics/thresholds.json" in names and "hf_provenance/schemas/compare.json" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    report = _save(tmp_path, reports["ft"])
    script = ("import json, hf_provenance.report.templates as T; from hf_provenance.report.card import "
              "render_section; from hf_provenance.report.html import render_html; "
              f"d = json.load(open({str(report)!r})); r = T.template_root(); "
              "assert 'site' in str(r), r; print(render_section(d).splitlines()[0]); render_html(d)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == card.START


def test_report_decided_without_reading_tensors_renders(reports):
    """compare's shortcuts (equal LFS hashes, adapters) report no tensors, layers or components."""
    from hf_provenance.report.html import render_html

    doc = json.loads(json.dumps(reports["ft"]))
    c = doc["comparisons"][0]
    c.update(tensors=[], layers=[], components={}, verdict="identical", relation=["copy"],
             reasons=["every weight file has the same LFS sha256 on both sides: identical without reading weights"])
    c["overall"].update(n_tensors=0, n_evidence=0, params=0)
    c["overall"]["pearson"].update(value=None, ci=None, p=None, n=0)
    c["alignment"]["lines"] = ["not needed: equal LFS sha256 certify identical bytes"]
    schemas.validate(doc)
    s = card.render_section(doc)
    assert "**This model has weights identical to" in s and "No component could be compared." in s
    assert "No per-layer tensors were compared." in s
    assert "- per-tensor SHA-256: no tensor was read for this base (see the alignment applied)" in s
    assert "- not needed: equal LFS sha256 certify identical bytes" in s
    assert "identical_to_" in badge.badge_url(doc)
    assert "no tensor was read for this base" in render_html(doc, None)
