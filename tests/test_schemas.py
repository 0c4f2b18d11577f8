"""The JSON Schemas shipped in hf_provenance/schemas: valid draft 2020-12, and every JSON the CLI writes matches.

Also checks that the schemas bite: a wrong verdict, a missing contract key, NaN or an unknown schema version are
refused before anything is written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from jsonschema import Draft202012Validator

from hf_provenance import schemas
from hf_provenance.cli.main import main
from hf_provenance.report import jsonout

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"
CONFIG_DIRS = sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def cli_json(capsys, tmp_path: Path, *argv) -> dict:
    """Run the CLI with --json, check the exit code and that the file is strict JSON; return it (validated)."""
    target = tmp_path / "out.json"
    code = main([str(a) for a in argv] + ["--json", str(target)])
    _, err = capsys.readouterr()
    assert code == 0, err

    def refuse(name):
        raise AssertionError(f"non-finite number {name} in {target}")

    doc = json.loads(target.read_text(encoding="utf-8"), parse_constant=refuse)
    schemas.validate(doc)
    Draft202012Validator(schemas.load(doc["schema"])).validate(doc)  # and directly with jsonschema
    return doc


def noisy_copy(src, dst: Path, scale: float = 0.05, seed: int = 1) -> Path:
    """MiniLM with Gaussian noise (``scale`` x std) added to every float tensor."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith((".json", ".txt")) and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst / name)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in load_file(os.path.join(src, "model.safetensors")).items():
        if t.is_floating_point() and t.numel() > 1:
            t = t + scale * t.float().std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        out[name] = t.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def compare_doc(minilm, tmp_path_factory) -> dict:
    """compare MiniLM against itself and against a noisy copy (one report, two bases)."""
    noisy = noisy_copy(minilm, tmp_path_factory.mktemp("schemas") / "noisy")
    target = tmp_path_factory.mktemp("schemas-out") / "compare.json"
    code = main(["compare", str(minilm), "--base", str(noisy), "--base", str(minilm), "--json", str(target)])
    assert code == 0
    return json.loads(target.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ the schemas

@pytest.mark.parametrize("name", schemas.NAMES)
def test_schema_is_valid_draft_2020_12(name):
    schema = schemas.load(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema"]["const"] == f"hf-provenance.{name}/1"


def test_load_accepts_short_and_document_names():
    assert schemas.load("compare") == schemas.load("hf-provenance.compare/1")
    with pytest.raises(KeyError, match="no schema 'report'"):
        schemas.load("report")


def test_schemas_ship_as_package_data():
    from importlib import resources

    names = {p.name for p in resources.files("hf_provenance.schemas").iterdir()}
    assert {"inspect.json", "arch.json", "compare.json"} <= names


# ------------------------------------------------------------------------------------------------ inspect

def test_inspect_minilm_validates(capsys, tmp_path, minilm):
    doc = cli_json(capsys, tmp_path, "inspect", minilm)
    assert doc["params"]["transformers_equivalent"] == 22_713_216


@pytest.mark.parametrize("folder", CONFIG_DIRS, ids=[p.name for p in CONFIG_DIRS])
def test_inspect_config_fixture_validates(capsys, tmp_path, folder):
    doc = cli_json(capsys, tmp_path, "inspect", folder)
    assert doc["inventory"] is None and doc["params"]["source"] == "config"
    assert doc["params"]["transformers_equivalent"] > 1_000_000_000


def test_inspect_lone_safetensors_file_validates(capsys, tmp_path, minilm):
    shutil.copy(os.path.join(minilm, "model.safetensors"), tmp_path / "w.safetensors")
    doc = cli_json(capsys, tmp_path, "inspect", tmp_path / "w.safetensors")
    assert doc["architecture"] is None


# ------------------------------------------------------------------------------------------------ arch

@pytest.mark.parametrize("model, base", [
    ("upstage__Solar-Open-100B", "zai-org__GLM-4.5-Air"),
    ("deepseek-ai__DeepSeek-V3", "deepseek-ai__DeepSeek-V2"),
    ("upstage__SOLAR-10.7B-v1.0", "mistralai__Mistral-7B-v0.1"),
    ("mistralai__Mixtral-8x7B-v0.1", "mistralai__Mistral-7B-v0.1"),
    ("Qwen__Qwen3-30B-A3B", "meta-llama__Llama-3.1-8B"),
])
def test_arch_fixture_pairs_validate(capsys, tmp_path, model, base):
    doc = cli_json(capsys, tmp_path, "arch", FIXTURES / model, FIXTURES / base)
    assert {c["status"] for c in doc["components"]} <= {"direct", "after alignment", "no counterpart"}


def test_arch_minilm_with_itself_is_all_direct(capsys, tmp_path, minilm):
    doc = cli_json(capsys, tmp_path, "arch", minilm, minilm)
    assert doc["by_status"]["after alignment"] == [] and doc["by_status"]["no counterpart"] == []


# ------------------------------------------------------------------------------------------------ compare

def test_compare_minilm_with_itself_validates(capsys, tmp_path, minilm):
    doc = cli_json(capsys, tmp_path, "compare", minilm, "--base", minilm, "--sample", "0.5")
    c = doc["comparisons"][0]
    assert c["verdict"] == "identical" and doc["run"]["sample"] == 0.5


def test_compare_against_a_noisy_copy_validates(compare_doc):
    schemas.validate(compare_doc)
    verdicts = {c["rank"]: c["verdict"] for c in compare_doc["comparisons"]}
    assert verdicts == {1: "identical", 2: "derived"}
    derived = compare_doc["comparisons"][1]
    assert "finetune" in derived["relation"]
    for t in derived["tensors"]:
        assert set(t["pearson"]) >= {"value", "ci", "z", "p", "null_method", "n"}


# ------------------------------------------------------------------------------------------------ refusals

def _broken(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize("path, value, where", [
    (("comparisons", 0, "verdict"), "probably", "comparisons/0/verdict"),
    (("comparisons", 0, "relation"), ["cousin"], "comparisons/0/relation/0"),
    (("comparisons", 0, "io"), KeyError, "comparisons/0"),
    (("comparisons", 0, "alignment", "heads"), KeyError, "comparisons/0/alignment"),
    (("run", "seed"), KeyError, "run"),
    (("run", "sample"), 1.5, "run/sample"),
    (("model", "content_id"), KeyError, "model"),
    (("comparisons", 0, "tensors", 0, "pearson", "null_method"), KeyError, "comparisons/0/tensors/0/pearson"),
    # three definitions deep (tensor -> statistic -> ci -> number_or_null): the references the validator inlines
    (("comparisons", 1, "tensors", 0, "pearson", "ci"), ["low", 0.5], "comparisons/1/tensors/0/pearson/ci/0"),
    (("tool", "name"), "other-tool", "tool/name"),
])
def test_schema_refuses_broken_compare_reports(compare_doc, path, value, where):
    with pytest.raises(schemas.SchemaError) as info:
        schemas.validate(_broken(compare_doc, path, value))
    assert info.value.path == where


def test_validation_inlines_every_local_reference():
    # what the validator checks against: the published schema with its $defs written in place, nothing left to
    # look up per item; a definition inlined keeps its sibling keywords (both must hold)
    for name in schemas.NAMES:
        inlined = schemas._validator(name).schema
        assert '"$ref"' not in json.dumps(inlined)
        Draft202012Validator.check_schema(inlined)
    node = {"$ref": "#/$defs/n", "description": "d"}
    assert schemas._inline_refs(node, {"n": {"type": "number"}}) == {"description": "d", "allOf": [{"type": "number"}]}
    assert schemas._inline_refs({"$ref": "other.json"}, {}) == {"$ref": "other.json"}


def test_unknown_schema_version_is_refused(compare_doc):
    with pytest.raises(schemas.SchemaError, match="unsupported version"):
        schemas.validate(dict(compare_doc, schema="hf-provenance.compare/2"))
    with pytest.raises(schemas.SchemaError, match="no \"schema\" field"):
        schemas.validate({"tool": {}})


def test_nan_and_schema_errors_write_nothing(compare_doc, tmp_path):
    target = tmp_path / "r.json"
    bad = _broken(compare_doc, ("comparisons", 0, "tensors", 0, "pearson", "value"), float("nan"))
    with pytest.raises(jsonout.OutputError, match="cannot be written as strict JSON") as info:
        jsonout.dump(bad, str(target))
    assert info.value.exit_code == 3
    with pytest.raises(jsonout.OutputError, match="does not match schema hf-provenance.compare/1"):
        jsonout.dump(_broken(compare_doc, ("comparisons", 0, "verdict"), "maybe"), str(target))
    assert not target.exists() and list(tmp_path.iterdir()) == []
    jsonout.dump(compare_doc, str(target))
    assert json.loads(target.read_text()) == compare_doc


def test_merge_fit_validates_against_the_compare_schema(make):
    """A report with two bases carries the merge fit; the schema checks its fields."""
    from hf_provenance.compare import compare
    from hf_provenance.schemas import validate

    d = compare(make("llama", "finetune"), [make("llama"), make("llama", "independent")]).to_dict()
    assert d["merge"] is not None and len(d["merge"]["weights"]) == 2
    validate(d)
    d["merge"]["weights"] = "not a list"
    with pytest.raises(Exception):
        validate(d)
