"""The command line: exit codes, the exact one-line errors, text and JSON output of inspect / arch / compare / demo.

Most tests run the CLI in-process through ``main([...])`` with capsys; a few run it as a subprocess
(``python -m hf_provenance.cli.main``) to check the exit status, stderr and the SIGTERM handler for real.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_provenance.cli import commands
from hf_provenance.cli.main import _report, main
from hf_provenance.errors import Interrupted, UsageError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"
SOLAR = FIXTURES / "upstage__Solar-Open-100B"
GLM = FIXTURES / "zai-org__GLM-4.5-Air"
LFS = ("version https://git-lfs.github.com/spec/v1\noid sha256:"
       "4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")
LFS_HINT = ("is a Git LFS pointer, not the weights: fetch them with `git lfs pull` (or `lfs: true` in "
            "actions/checkout), or pass the Hub id instead")
UNPICKLE = ("refusing to unpickle (pickle files can run code when loaded); convert the checkpoint to safetensors, "
            "or pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)")
VERDICT_LIST = "identical, derived, partial, independent, inconclusive"
SAMPLE_HINT = "must be a fraction in (0, 1] (e.g. 0.1 reads a tenth of the row blocks)"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """stderr must be exactly one line, without a traceback."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def flat(text: str) -> str:
    """Text with every run of whitespace (including the console's line wraps) made one space."""
    return " ".join(text.split())


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity."""
    def refuse(name):
        raise AssertionError(f"non-finite number {name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("HF_PROVENANCE_DEBUG", None)
    return env


def cli_subprocess(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_provenance.cli.main", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env(), cwd=ROOT)


# ------------------------------------------------------------------------------------------------ inputs

def noisy_copy(src: str, dst: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """MiniLM with Gaussian noise (``scale`` x each tensor's std) added to every float tensor: a derived model."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith((".json", ".txt")) and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst / name)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, t in state.items():
        if t.is_floating_point() and t.numel() > 1:
            t = t + scale * t.float().std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        out[name] = t.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def noisy(minilm, tmp_path_factory) -> str:
    return str(noisy_copy(minilm, tmp_path_factory.mktemp("noisy") / "minilm-noisy"))


def _empty(tmp: Path) -> Path:
    folder = tmp / "empty"
    folder.mkdir()
    (folder / "README.md").write_text("nothing here\n")
    return folder


def _pickle_only(tmp: Path) -> Path:
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return folder


def _lfs(tmp: Path) -> Path:
    folder = tmp / "lfs"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_text(LFS)
    return folder


def _bad_config(tmp: Path) -> Path:
    folder = tmp / "badconfig"
    folder.mkdir()
    (folder / "config.json").write_text("{")
    return folder


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("make, argv, expected", [
    (lambda tmp: tmp / "does-not-exist", ["inspect", "{p}"], "hf-provenance: {p}: no such file or folder"),
    (_empty, ["inspect", "{p}"],
     "hf-provenance: {p}: no config.json and no weight files (*.safetensors) in this folder"),
    (_pickle_only, ["inspect", "{p}"], "hf-provenance: {p}/pytorch_model.bin: " + UNPICKLE),
    (_lfs, ["inspect", "{p}"], "hf-provenance: {p}/model.safetensors: " + LFS_HINT),
    (lambda tmp: _lfs(tmp) / "model.safetensors", ["inspect", "{p}"], "hf-provenance: {p}: " + LFS_HINT),
    (_bad_config, ["inspect", "{p}"], "hf-provenance: {p}/config.json: not valid JSON (Expecting property name "
                                      "enclosed in double quotes: line 1 column 2 (char 1))"),
    (_bad_config, ["arch", "{p}", "{p}"], "hf-provenance: {p}/config.json: not valid JSON (Expecting property "
                                          "name enclosed in double quotes: line 1 column 2 (char 1))"),
    (lambda tmp: tmp / "nope", ["compare", "{p}", "--base", "{p}"], "hf-provenance: {p}: no such file or folder"),
], ids=["nonexistent", "no-weights-no-config", "pickle-only", "lfs-folder", "lfs-file", "invalid-config",
        "arch-invalid-config", "compare-nonexistent"])
def test_input_errors_are_one_line_exit_2(capsys, tmp_path, make, argv, expected):
    p = make(tmp_path)
    code, out, err = run(capsys, *[a.format(p=p) for a in argv])
    assert code == 2
    assert one_line(err) == expected.format(p=p)
    assert out == ""


@pytest.mark.parametrize("extra, expected", [
    (["--sample", "1.5"], f"hf-provenance: --sample: {SAMPLE_HINT}, got '1.5'"),
    (["--sample", "0"], f"hf-provenance: --sample: {SAMPLE_HINT}, got '0'"),
    (["--sample", "nan"], f"hf-provenance: --sample: {SAMPLE_HINT}, got 'nan'"),
    (["--sample", "a tenth"], f"hf-provenance: --sample: {SAMPLE_HINT}, got 'a tenth'"),
    (["--seed", "-3"], "hf-provenance: --seed: must be a whole number >= 0, got '-3'"),
    (["--fail-on", "derived,forked"],
     f"hf-provenance: --fail-on: unknown verdict 'forked'; choose from {VERDICT_LIST}"),
    (["--fail-on-best", "maybe"],
     f"hf-provenance: --fail-on-best: unknown verdict 'maybe'; choose from {VERDICT_LIST}"),
    (["--fail-on", ","], f"hf-provenance: --fail-on: no verdict given; choose from {VERDICT_LIST}"),
    (["--device", "tpu"], "hf-provenance: --device: 'tpu' is not a device; use cpu, cuda, cuda:N or mps"),
])
def test_bad_compare_options_exit_2_before_opening_anything(capsys, extra, expected):
    # the model does not exist: option errors must be reported first, without touching it
    code, out, err = run(capsys, "compare", "/nonexistent/model", "--base", "/nonexistent/base", *extra)
    assert code == 2
    assert one_line(err) == expected


def test_device_cuda_without_cuda_is_a_usage_error(capsys, monkeypatch, minilm):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    code, out, err = run(capsys, "compare", minilm, "--base", minilm, "--device", "cuda")
    assert code == 2
    assert one_line(err) == ("hf-provenance: --device: cuda requested but CUDA is not available (this torch build "
                             "has no CUDA support); use --device cpu")


def test_compare_without_base_or_card_base_model(capsys, minilm):
    code, out, err = run(capsys, "compare", minilm)
    assert code == 2
    assert one_line(err) == f"hf-provenance: {minilm}: the model card declares no base_model: pass --base BASE"


def test_argparse_errors_are_one_line(capsys):
    code, out, err = run(capsys, "compare")
    assert code == 2
    assert one_line(err) == ("hf-provenance: compare: usage error: the following arguments are required: MODEL "
                             "(see 'hf-provenance compare --help')")
    code, out, err = run(capsys, "frobnicate")
    assert code == 2
    assert one_line(err).startswith("hf-provenance: usage error: argument COMMAND: invalid choice: 'frobnicate'")


def test_json_target_that_is_a_folder(capsys, tmp_path, minilm):
    code, out, err = run(capsys, "inspect", minilm, "--json", tmp_path)
    assert code == 2
    assert one_line(err) == f"hf-provenance: {tmp_path}: --json names a folder; give a file name such as report.json"


def test_debug_switch_prints_the_traceback(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_PROVENANCE_DEBUG", "1")
    code, out, err = run(capsys, "inspect", tmp_path / "missing")
    assert code == 2
    assert "Traceback" in err
    assert err.splitlines()[-1] == f"hf-provenance: {tmp_path / 'missing'}: no such file or folder"


def test_report_maps_interrupts_and_io_errors(capsys):
    cases = [(Interrupted("interrupted", "terminated by SIGTERM"), 130,
              "hf-provenance: interrupted: terminated by SIGTERM"),
             (KeyboardInterrupt(), 130, "hf-provenance: interrupted"),
             (UsageError("--sample", "bad"), 2, "hf-provenance: --sample: bad"),
             (OSError(28, "No space left on device"), 3,
              "hf-provenance: I/O error: [Errno 28] No space left on device")]
    for exc, code, line in cases:
        assert _report(exc) == code
        assert one_line(capsys.readouterr().err) == line


def test_verdict_names_match_the_library():
    from hf_provenance.verdict import VERDICTS

    assert commands.VERDICTS == VERDICTS


# ------------------------------------------------------------------------------------------------ inspect

def test_inspect_minilm_text(capsys, minilm):
    code, out, err = run(capsys, "inspect", minilm)
    assert code == 0 and err == ""
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 100  # COLUMNS=100 in conftest
    out = flat(out)
    assert "bert (BertModel)" in out
    assert "6 encoder layers" in out and "hidden 384" in out
    assert "12 query / 12 KV heads" in out and "12 heads (12 KV)" in out
    assert "vocabulary 30,522" in out
    assert "22.7M parameters" in out
    assert "22,713,216 (22.7M)" in out and "22,713,728 (22.7M)" in out
    assert "license apache-2.0" in out
    assert "Unknown tensor names: none" in out
    assert "Config vs inventory: consistent" in out


def test_inspect_minilm_json(capsys, tmp_path, minilm):
    target = tmp_path / "out" / "inspect.json"
    code, out, err = run(capsys, "inspect", minilm, "--json", target)
    assert code == 0 and err == ""
    d = strict_json(target.read_text())
    assert d["schema"] == "hf-provenance.inspect/1"
    p = d["params"]
    assert p["transformers_equivalent"] == 22_713_216
    assert p["total_checkpoint"] == 22_713_728
    assert p["mtp"] == 0 and p["active_per_token"] == 22_713_216 and p["buffers"] == 512
    a = d["architecture"]
    assert (a["model_type"], a["num_layers"], a["hidden_size"], a["num_heads"], a["vocab_size"]) == \
        ("bert", 6, 384, 12, 30522)
    inv = d["inventory"]
    assert inv["tensors"] == 104 and inv["params"] == 22_713_728 and inv["unknown"] == []
    comps = {g["name"]: g for g in inv["by_component"]}
    assert comps["attention"]["tensors"] == 48 and comps["dense_mlp"]["tensors"] == 24
    assert sum(g["params"] for g in inv["by_component"]) == inv["params"]
    assert {g["name"]: g["tensors"] for g in inv["by_dtype"]} == {"F32": 103, "I64": 1}
    assert d["card"] == {"base_model": [], "base_model_relation": None, "license": "apache-2.0"}
    assert d["findings"] == [] and d["quantization"] is None and d["adapter"] is None
    assert d["model"]["content_id"]["kind"] == "layout_id"


def test_inspect_json_to_stdout_puts_the_report_on_stderr(capsys, minilm):
    code, out, err = run(capsys, "inspect", minilm, "--json", "-")
    assert code == 0
    assert strict_json(out)["params"]["total_checkpoint"] == 22_713_728
    assert "bert (BertModel)" in err


def test_inspect_config_only_folder(capsys, tmp_path):
    target = tmp_path / "glm.json"
    code, out, err = run(capsys, "inspect", GLM, "--json", target)
    assert code == 0
    out = flat(out)
    assert "46 decoder layers (+1 MTP)" in out
    assert "128 routed + 1 shared experts, 8 routed active per token" in out
    assert "no weight files (config only)" in out
    d = strict_json(target.read_text())
    assert d["inventory"] is None and d["params"]["source"] == "config"
    assert d["params"]["mtp"] > 0 and d["params"]["active_per_token"] < d["params"]["transformers_equivalent"]


def test_inspect_single_safetensors_file_without_config(capsys, tmp_path, minilm):
    shutil.copy(os.path.join(minilm, "model.safetensors"), tmp_path / "weights.safetensors")
    target = tmp_path / "file.json"
    code, out, err = run(capsys, "inspect", tmp_path / "weights.safetensors", "--json", target)
    assert code == 0
    out = flat(out)
    assert "Architecture: unknown (no config.json; inventory only)" in out
    assert "22,713,728 (22.7M)" in out
    d = strict_json(target.read_text())
    assert d["architecture"] is None and d["has_config"] is False
    assert d["params"]["total_checkpoint"] == 22_713_728 and d["params"]["transformers_equivalent"] is None
    assert {g["name"] for g in d["inventory"]["by_component"]} >= {"embeddings", "attention", "dense_mlp"}


# ------------------------------------------------------------------------------------------------ arch

def test_arch_solar_open_vs_glm_air(capsys, tmp_path):
    target = tmp_path / "arch.json"
    code, out, err = run(capsys, "arch", SOLAR, GLM, "--json", target)
    assert code == 0 and err == ""
    rows = {}
    components_table = out[out.index("Components ("):out.index("L = layers")]
    for line in components_table.splitlines():
        parts = line.split()
        if parts and parts[0] in ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "router", "routed",
                                  "input", "post-attention", "lm_head"):
            rows[parts[0]] = line
    for name in ("k_proj", "v_proj", "router", "input", "post-attention"):
        assert " match " in rows[name], rows[name]
    for name in ("q_proj", "o_proj", "routed", "embed_tokens", "lm_head"):
        assert " differ " in rows[name], rows[name]
    assert "Depth: 48 vs 46 decoder layers (+1 MTP in base)" in out
    assert "not evidence of independence" in flat(out)

    d = strict_json(target.read_text())
    comps = {c["name"]: c for c in d["components"]}
    for name in ("attn_k", "attn_v", "moe_router", "norm_attn", "norm_mlp", "final_norm"):
        assert comps[name]["shapes_match"] is True, name
    for name in ("attn_q", "attn_o", "moe_experts", "moe_shared_experts", "embed_tokens", "lm_head"):
        assert comps[name]["shapes_match"] is False, name
    assert comps["mtp"]["status"] == "no counterpart" and comps["final_norm"]["status"] == "direct"
    assert comps["attn_k"]["status"] == "after alignment"  # same shapes, but 48 vs 46 layers
    assert comps["attn_q"]["model"]["shapes"]["weight"] == [8192, 4096]
    assert comps["attn_q"]["base"]["shapes"]["weight"] == [12288, 4096]
    assert d["depth"] == {"model": {"layers": 48, "mtp_layers": 0}, "base": {"layers": 46, "mtp_layers": 1},
                          "text": "depth differs: 48 vs 46 decoder layers (+1 MTP in base)"}
    assert d["layer_kinds"] == {"dense": {"model": 0, "base": 1}, "moe": {"model": 48, "base": 45}}
    assert any("not evidence of independence" in n for n in d["notes"])


def test_arch_needs_a_config(capsys, tmp_path, minilm):
    shutil.copy(os.path.join(minilm, "model.safetensors"), tmp_path / "w.safetensors")
    code, out, err = run(capsys, "arch", tmp_path / "w.safetensors", minilm)
    assert code == 2
    assert one_line(err).startswith(f"hf-provenance: {tmp_path / 'w.safetensors'}: no config.json: ")


# ------------------------------------------------------------------------------------------------ compare

def test_compare_minilm_with_itself(capsys, tmp_path, minilm):
    target = tmp_path / "c.json"
    code, out, err = run(capsys, "compare", minilm, "--base", minilm, "--json", target, "--fail-on",
                         "independent,inconclusive")
    assert code == 0 and err == ""
    assert "IDENTICAL" in out
    d = strict_json(target.read_text())
    c = d["comparisons"][0]
    assert c["verdict"] == "identical" and c["rank"] == 1 and c["relation"] == ["copy"]
    assert d["run"]["command"] == (f"hf-provenance compare {minilm} --base {minilm} --json {target} --fail-on "
                                   "independent,inconclusive")
    assert d["run"]["seed"] == 0 and d["run"]["sample"] is None and d["run"]["device"] == "cpu"


def test_fail_on_matched_exits_1(capsys, tmp_path, minilm):
    target = tmp_path / "c.json"
    code, out, err = run(capsys, "compare", minilm, "--base", minilm, "--fail-on", "derived", "--fail-on",
                         "identical", "--json", target)
    assert code == 1
    assert one_line(err) == (f"hf-provenance: {minilm}: --fail-on matched: verdict identical against base {minilm} "
                             "(rank 1)")
    assert target.is_file()  # the run itself succeeded: its report is written


def test_fail_on_best_looks_only_at_rank_1(capsys, minilm, noisy):
    argv = ["compare", minilm, "--base", noisy, "--base", minilm, "--sample", "0.5", "--seed", "3"]
    code, out, err = run(capsys, *argv, "--fail-on-best", "derived")
    assert code == 0 and err == ""
    assert f"#1 base {minilm}: IDENTICAL" in flat(out) and f"#2 base {noisy}: DERIVED" in flat(out)
    code, out, err = run(capsys, *argv, "--fail-on", "derived")
    assert code == 1
    assert one_line(err) == f"hf-provenance: {minilm}: --fail-on matched: verdict derived against base {noisy} (rank 2)"


def test_failed_compare_writes_no_json_and_keeps_an_old_one(capsys, tmp_path, minilm):
    fresh, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("{}")
    for target in (fresh, old):
        code, out, err = run(capsys, "compare", minilm, "--base", tmp_path / "missing", "--json", target)
        assert code == 2
        assert one_line(err) == f"hf-provenance: {tmp_path / 'missing'}: no such file or folder"
    assert not fresh.exists()
    assert old.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_progress_bar_is_silent_off_a_terminal():
    stream = io.StringIO()
    bar = commands.ProgressBar(None, stream=stream)
    bar.delay_s = 0.0
    bar.total = 1000
    bar(None, 500)
    bar.close()
    assert stream.getvalue() == "" and bar.done == 500


def test_progress_bar_draws_on_a_terminal_after_the_delay():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = commands.ProgressBar(None, stream=stream)
    bar.delay_s = 3600.0
    bar(None, 10)
    assert bar._bar is None  # short runs stay silent
    bar.delay_s = 0.0
    bar.total = 1000
    bar(None, 500)
    bar.close()
    assert stream.getvalue() != ""


# ------------------------------------------------------------------------------------------------ subprocess

def test_every_command_preloads_modules_that_exist():
    """``main`` imports each command's heavy modules first (GC paused): a misspelt name would fail every run."""
    import importlib.util

    assert {c.name for c in commands.COMMANDS if c.preload} == {c.name for c in commands.COMMANDS}
    for c in commands.COMMANDS:
        for name in c.preload:
            assert importlib.util.find_spec(name) is not None, (c.name, name)


def test_in_process_main_leaves_the_garbage_collector_alone(capsys, minilm):
    """Only a whole process may freeze the GC's objects: a caller that runs ``main`` keeps collecting its cycles."""
    import gc

    frozen = gc.get_freeze_count()
    assert run(capsys, "inspect", minilm)[0] == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_process_main_freezes_after_loading_and_at_the_end(minilm):
    """As the whole process, ``main`` imports the command's modules with the GC paused, freezes them (torch's objects
    are never walked again) and freezes the rest before exit; the GC is running in between."""
    code = ("import gc, json, sys\n"
            "from hf_provenance.cli import main as m\n"
            "seen, real = [], m._preload\n"
            "def spy(modules, *, freeze):\n"
            "    real(modules, freeze=freeze)\n"
            "    seen.append([freeze, gc.isenabled(), gc.get_freeze_count(), 'torch' in sys.modules])\n"
            "m._preload = spy\n"
            f"rc = m.main(['compare', {str(minilm)!r}, '--base', {str(minilm)!r}], process=True)\n"
            "print(json.dumps([rc, seen, gc.isenabled(), gc.get_freeze_count()]), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=ROOT)
    rc, seen, enabled, frozen_at_end = json.loads(proc.stderr.splitlines()[-1])
    assert rc == 0 and len(seen) == 1
    freeze, enabled_after_load, frozen_after_load, torch_loaded = seen[0]
    assert freeze and enabled_after_load and torch_loaded
    assert frozen_after_load > 100_000  # torch's objects, moved out of the GC's way
    assert enabled and frozen_at_end > frozen_after_load  # and what the run made, before the interpreter's teardown


def test_subprocess_missing_model_exit_2():
    proc = cli_subprocess("inspect", "/nonexistent/model-folder")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "hf-provenance: /nonexistent/model-folder: no such file or folder\n"


def test_subprocess_lfs_pointer_exit_2(tmp_path):
    folder = _lfs(tmp_path)
    proc = cli_subprocess("compare", folder, "--base", folder, "--json", tmp_path / "r.json")
    assert proc.returncode == 2
    assert proc.stderr == f"hf-provenance: {folder}/model.safetensors: {LFS_HINT}\n"
    assert not (tmp_path / "r.json").exists()


def test_subprocess_sigterm_exits_130_and_writes_nothing(tmp_path, minilm):
    out = tmp_path / "report.json"
    script = (
        "import sys, time\n"
        "import hf_provenance.compare as C\n"
        "def slow(*args, **kwargs):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "C.compare = slow\n"
        "from hf_provenance.cli.main import main\n"
        f"sys.exit(main(['compare', {str(minilm)!r}, '--base', {str(minilm)!r}, '--json', {str(out)!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), cwd=ROOT)
    try:
        line = proc.stdout.readline().strip()
        assert line == "ready", proc.stderr.read() if not line else line
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert stderr == "hf-provenance: interrupted: terminated by SIGTERM\n"
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ demo

@pytest.mark.slow
def test_demo_runs_in_under_a_minute(capsys, tmp_path_factory):
    cache = tmp_path_factory.mktemp("factory-cache")
    t0 = time.perf_counter()
    code, out, err = run(capsys, "demo", "--cache-dir", cache)
    seconds = time.perf_counter() - t0
    assert code == 0
    assert seconds < 60, f"demo took {seconds:.1f} s"
    table = out[out.index("Verdicts against the base"):]
    expected = {"finetune": ("derived", "finetune"), "independent": ("independent", "—"),
                "bf16": ("derived", "cast"), "pruned": ("derived", "pruned"),
                "vocab_extended": ("derived", "vocab-extended")}
    for variant, (verdict, relation) in expected.items():
        row = next(line.split() for line in table.splitlines() if line.startswith(variant + " "))
        assert row[1:3] == [verdict, relation], row
    assert "inspect" in out and "Depth: 3 vs 4 decoder layers" in flat(out)


def test_allow_pickle_reads_weights_only_pickles(make, tmp_path, capsys):
    """--allow-pickle reads a .bin checkpoint through torch.load(weights_only=True); without it, refused (exit 2)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from hf_provenance.cli.main import main

    src = make("llama")
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(f"{src}/config.json", folder / "config.json")
    torch.save(load_file(f"{src}/model.safetensors"), folder / "pytorch_model.bin")
    assert main(["inspect", str(folder)]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert main(["compare", str(folder), "--base", src, "--allow-pickle"]) == 0
    assert "IDENTICAL" in capsys.readouterr().out


@pytest.mark.parametrize("fail_on, code", [(None, 0), ("identical", 1)])
def test_a_reader_that_goes_away_still_gets_the_files_and_the_usual_exit_code(tmp_path, minilm, fail_on, code):
    """`compare ... --json r.json | head -1`: the terminal report's reader leaves early. rich used to exit 1 there,
    which means "--fail-on matched", and the JSON was never written."""
    report = tmp_path / "r.json"
    argv = ["compare", minilm, "--base", minilm, "--json", report] + (["--fail-on", fail_on] if fail_on else [])
    proc = subprocess.Popen([sys.executable, "-m", "hf_provenance.cli.main", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), cwd=ROOT)
    proc.stdout.close()  # the reader is gone before the first line is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == code, err
    assert "Traceback" not in err and "Broken pipe" not in err and "BrokenPipe" not in err
    assert strict_json(report.read_text())["comparisons"][0]["verdict"] == "identical"
    assert ("--fail-on matched" in err) == (fail_on is not None)


def test_the_console_script_skips_teardown_but_runs_exit_handlers_and_flushes(tmp_path):
    """``entry`` ends the process with os._exit after main: the code is kept, buffered output is flushed, atexit
    handlers (temporary directories, thread joins) still run; a reader that went away changes nothing."""
    marker = tmp_path / "ran"
    prog = ("import atexit, sys\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
            "sys.stdout.write('buffered, no newline')\n"
            "from hf_provenance.cli.main import exit_now\n"
            "exit_now(5)\n"
            "raise SystemExit('not reached')\n")
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, env=env, cwd=ROOT)
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == b"buffered, no newline" and marker.read_text() == "ran"
    proc = subprocess.Popen([sys.executable, "-c", prog.replace("'buffered, no newline'", "'x' * 4000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 5 and "Traceback" not in err, err
