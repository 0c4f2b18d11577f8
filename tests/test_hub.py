"""Hub sources against a fake Hub on 127.0.0.1 (tests/hub_server.py): same answers as the local folder, only the
bytes compared cross the network, retries and errors are bounded and one line, and the token never leaks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_provenance.errors import (InputError, ModelNotFoundError, ProvenanceError, RemoteError, UnsafeFormatError,
                                  UsageError)
from hf_provenance.sources import LocalSource, RowReader, open_model
from hf_provenance.sources.hub import HubSource
from hf_provenance.sources.refs import HubRef, parse_hub_ref
from hf_provenance.sources.remote import RangeCache, RemoteSettings, RepoAccessError
from tests.hub_server import FakeHub

TOKEN = "hf_secret_test_token"
BIG_EMBED = "model.embed_tokens.weight"  # (32768, 128) float32: 64 blocks of 512 rows (256 KiB)


# --- models and the server ---------------------------------------------------------------------------------------
def _card(folder: Path, base: str | None, license_: str = "apache-2.0") -> None:
    front = [f"license: {license_}"] + ([f"base_model: {base}"] if base else [])
    (folder / "README.md").write_text("---\n" + "\n".join(front) + "\n---\n\n# test model\n")


def _noised(src: Path, dst: Path, scale: float, seed: int = 1) -> Path:
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for path in sorted(dst.glob("*.safetensors")):
        tensors = load_file(str(path))
        tensors = {k: v + scale * v.float().std() * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from hf_provenance.factory.build import build_random

    root = tmp_path_factory.mktemp("hub_models")
    small = dict(layers=2, intermediate=128, vocab=512, heads=2, kv_heads=2)
    tiny = build_random("llama", root / "tiny", hidden=64, dtype="float32", **small)
    _card(tiny, "org/ancestor")
    tiny_dev = root / "tiny-dev"
    shutil.copytree(tiny, tiny_dev)
    _card(tiny_dev, "org/other", license_="mit")
    sharded = build_random("llama", root / "sharded", hidden=64, dtype="bfloat16", max_shard_bytes=120_000, seed=3,
                           **small)
    big = build_random("llama", root / "big", hidden=128, layers=1, intermediate=128, vocab=32768,
                       dtype="float32", heads=2, kv_heads=2)
    big_ft = _noised(big, root / "big-ft", 0.5)

    quant = root / "quant"
    shutil.copytree(tiny, quant)
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (quant / "config.json").write_text(json.dumps(config))

    adapter = root / "adapter"
    adapter.mkdir()
    gen = torch.Generator().manual_seed(5)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 64, generator=gen),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 8)},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "base_model_name_or_path": "org/tiny", "target_modules": ["q_proj"]}))
    _card(adapter, "org/tiny")

    pickle = root / "pickle"
    pickle.mkdir()
    shutil.copy(tiny / "config.json", pickle / "config.json")
    (pickle / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return {"tiny": tiny, "tiny_dev": tiny_dev, "sharded": sharded, "big": big, "big_ft": big_ft, "quant": quant,
            "adapter": adapter, "pickle": pickle}


@pytest.fixture(scope="module")
def server(models):
    with FakeHub() as hub:
        hub.commits = {
            "tiny": hub.add_repo("org/tiny", models["tiny"]),
            "tiny_dev": hub.add_repo("org/tiny", models["tiny_dev"], branch="dev", tags=("v1",)),
            "sharded": hub.add_repo("org/sharded", models["sharded"]),
            "base": hub.add_repo("org/base", models["big"]),
            "ft": hub.add_repo("org/ft", models["big_ft"]),
            "quant": hub.add_repo("org/quant", models["quant"]),
            "adapter": hub.add_repo("org/adapter", models["adapter"]),
            "pickle": hub.add_repo("org/pickle", models["pickle"]),
            "private": hub.add_repo("org/private", models["tiny"], token=TOKEN),
            "gated": hub.add_repo("org/gated", models["tiny"], gated=True),
            "redirect": hub.add_repo("org/redirect", models["tiny"], redirect=True),
        }
        yield hub


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    """Online against the fake Hub, a fresh range cache, fast retries; counters and faults reset."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_PROVENANCE_RANGE_CACHE", str(tmp_path / "ranges"))
    monkeypatch.setenv("HF_PROVENANCE_HTTP_BACKOFF", "0")
    monkeypatch.setenv("HF_PROVENANCE_HTTP_RETRIES", "3")
    monkeypatch.setenv("HF_PROVENANCE_HTTP_TIMEOUT", "5")
    server.clear_faults()
    server.reset_counts()
    yield server
    server.clear_faults()


def _header_len(path: Path) -> int:
    with open(path, "rb") as handle:
        return int.from_bytes(handle.read(8), "little")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _layout(inventory) -> dict:
    return {n: (t.dtype, t.shape, os.path.basename(t.file), t.start, t.end) for n, t in inventory.items()}


def _weights_served(hub: FakeHub, repo: str | None = None) -> int:
    return hub.served(repo, ".safetensors")


# --- refs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref, expected", [
    ("org/name", HubRef("org/name", None)),
    ("org/name@main", HubRef("org/name", "main")),
    ("Org-1/Model_2.5@v1.0", HubRef("Org-1/Model_2.5", "v1.0")),
    ("org/name@refs/pr/12", HubRef("org/name", "refs/pr/12")),
    ("org/name@" + "a" * 40, HubRef("org/name", "a" * 40)),
    ("./org/name", None), ("/abs/path", None), ("model.safetensors", None), ("a/b/c", None), ("org", None),
])
def test_parse_hub_ref(ref, expected):
    assert parse_hub_ref(ref) == expected


@pytest.mark.parametrize("ref, says", [
    ("org/name@", "empty revision"), ("org--x/name", "'--'"), ("org/na..me", "'..'"),
    ("org/name@a b", "characters"), ("org/name@x/../y", "not a valid git ref"), ("org/" + "n" * 97, "96"),
])
def test_parse_hub_ref_rejects(ref, says):
    with pytest.raises(UsageError, match=None) as info:
        parse_hub_ref(ref)
    assert says in str(info.value) and info.value.exit_code == 2


def test_commit_ref_pins():
    ref = parse_hub_ref("org/name@" + "0" * 40)
    assert ref.is_commit and ref.pinned("f" * 40) == "org/name@" + "f" * 40 and str(ref) == "org/name@" + "0" * 40


# --- metadata without weights ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, commit", [("", "tiny"), ("@main", "tiny"), ("@dev", "tiny_dev"), ("@v1", "tiny_dev"),
                                            ("@SHA", "tiny_dev")])
def test_open_matches_local_folder(hub, models, suffix, commit):
    sha = hub.commits[commit]
    ref = "org/tiny" + suffix.replace("SHA", sha)
    folder = models["tiny" if commit == "tiny" else "tiny_dev"]
    src = open_model(ref)
    local = open_model(str(folder))
    assert isinstance(src, HubSource) and src.kind == "hub" and src.path is None and src.ref == ref
    assert src.revision == sha
    assert _layout(src.inventory) == _layout(local.inventory)
    assert src.config == local.config and src.vocab == local.vocab and src.card == local.card
    assert src.quantization is None and src.adapter is None
    assert src.header_metadata == {"model.safetensors": local.header_metadata["model.safetensors"]}
    weights = folder / "model.safetensors"
    assert src.content_id.to_dict() == {"kind": "hub", "value": sha, "revision": sha,
                                        "files": {"model.safetensors": _sha256(weights)}}
    # inspect-level access transfers headers only: exactly 8 + header length bytes of the weight file
    assert _weights_served(hub) == 8 + _header_len(weights) == src.header_bytes
    assert src.bytes_fetched == 0 and src.bytes_read == 0
    if suffix in ("", "@main", "@dev"):
        assert any(f"is commit {sha}" in n for n in src.notes)


def test_sharded_repo_headers_only(hub, models):
    src = open_model("org/sharded")
    local = open_model(str(models["sharded"]))
    shards = sorted(p.name for p in models["sharded"].glob("*.safetensors"))
    assert len(shards) > 1 and src.files == shards
    assert _layout(src.inventory) == _layout(local.inventory)
    assert src.content_id.files == {s: _sha256(models["sharded"] / s) for s in shards}
    for shard in shards:
        assert hub.served("org/sharded", shard) == 8 + _header_len(models["sharded"] / shard)


def test_quantized_and_adapter_repos_open(hub, models):
    quant = open_model("org/quant")
    assert quant.quantization == "gptq" and quant.config["quantization_config"]["bits"] == 4
    adapter = open_model("org/adapter")
    assert adapter.adapter["peft_type"] == "LORA" and adapter.card.base_model == ("org/tiny",)
    assert adapter.files == ["adapter_model.safetensors"] and len(adapter.inventory) == 2
    assert _weights_served(hub, "org/quant") == 8 + _header_len(models["quant"] / "model.safetensors")


def test_redirected_downloads(hub, models):
    src = open_model("org/redirect")
    local = open_model(str(models["tiny"]))
    assert src.config == local.config
    rows = src.reader.read_rows("model.embed_tokens.weight", 10, 20)
    assert torch.equal(rows, local.reader.read_rows("model.embed_tokens.weight", 10, 20))
    assert any(r.status == 302 for r in hub.requests)


def test_token_is_not_sent_to_another_origin(server, hub, models, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub() as cdn:
        cdn.add_repo("cdn/files", models["tiny"])
        server.add_repo("org/cdn", models["tiny"], token=TOKEN, redirect=cdn.url)
        src = open_model("org/cdn")
        local = open_model(str(models["tiny"]))
        assert torch.equal(src.reader.read_rows("lm_head.weight"), local.reader.read_rows("lm_head.weight"))
        assert cdn.served(suffix=".safetensors") > 0 and set(cdn.authorizations) == {None}
        assert set(hub.authorizations) == {f"Bearer {TOKEN}"}


def test_existing_local_path_wins(hub, models, tmp_path, monkeypatch):
    shutil.copytree(models["tiny"], tmp_path / "work" / "org" / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    src = open_model("org/tiny")
    assert isinstance(src, LocalSource) and src.kind == "folder" and not hub.requests


# --- rows by range -----------------------------------------------------------------------------------------------
def test_rows_equal_local_and_bytes_match_requests(hub, models):
    src = open_model("org/base")
    local = open_model(str(models["big"]))
    hub.reset_counts()
    blocks = [(0, 512), (5120, 5632), (20000, 20100), (32000, 32768)]
    for start, stop in blocks:
        assert torch.equal(src.reader.read_rows(BIG_EMBED, start, stop), local.reader.read_rows(BIG_EMBED, start, stop))
    wanted = sum(stop - start for start, stop in blocks) * 128 * 4
    assert src.bytes_read == wanted
    assert _weights_served(hub) == wanted == src.bytes_fetched  # non-adjacent reads: no read-ahead, no waste
    assert len(hub.range_requests()) == len(blocks)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(src.reader.read_rows(norm), local.reader.read_rows(norm))


def test_adjacent_blocks_coalesce_into_one_request(hub, models):
    src = open_model("org/base")
    local = open_model(str(models["big"]))
    hub.reset_counts()
    blocks = [(BIG_EMBED, 512 * i, 512 * (i + 1)) for i in range(4, 8)]
    assert src.prefetch(blocks) == 1
    for name, start, stop in blocks:
        assert torch.equal(src.reader.read_rows(name, start, stop), local.reader.read_rows(name, start, stop))
    assert len(hub.range_requests()) == 1
    assert _weights_served(hub) == 4 * 512 * 512


def test_sequential_reads_read_ahead_within_the_tensor(hub, models):
    src = open_model("org/base")
    local = open_model(str(models["big"]))
    hub.reset_counts()
    n = 16
    for i in range(n):
        start, stop = 512 * i, 512 * (i + 1)
        assert torch.equal(src.reader.read_rows(BIG_EMBED, start, stop), local.reader.read_rows(BIG_EMBED, start, stop))
    src.reader.transport.wait()
    wanted = n * 512 * 512
    # blocks 0 and 1 are read on demand, then windows of 1, 2, 4, 8, 16 blocks are read ahead: 7 requests
    assert len(hub.range_requests()) == 7, [r.range for r in hub.range_requests()]
    assert _weights_served(hub) == 33 * 512 * 512 <= wanted * 2.1  # read-ahead is at most the run read so far
    # read-ahead never crosses into the next tensor
    src2 = open_model("org/base")
    info = src2.inventory[BIG_EMBED]
    hub.reset_counts()
    for start in range(info.n_rows - 4 * 512, info.n_rows, 512):
        src2.reader.read_rows(BIG_EMBED, start, start + 512)
    assert _weights_served(hub) == 4 * 512 * 512


def test_large_read_is_split_into_parts_in_flight(hub, models, tmp_path):
    settings = RemoteSettings(retries=1, backoff=0.0, part_bytes=1 << 20, workers=4, cache_dir=str(tmp_path / "c"))
    src = HubSource("org/base", settings=settings)
    local = open_model(str(models["big"]))
    hub.reset_counts()
    assert torch.equal(src.reader.read_rows(BIG_EMBED, 0, 16384), local.reader.read_rows(BIG_EMBED, 0, 16384))
    assert len(hub.range_requests()) == 8 and _weights_served(hub) == 8 << 20
    src.close()


def test_rerun_reads_rows_from_the_disk_cache(hub, models):
    first = open_model("org/base")
    rows = first.reader.read_rows(BIG_EMBED, 1000, 3000)
    first.close()
    hub.reset_counts()
    again = open_model("org/base")  # a new source object, the same cache folder
    assert torch.equal(again.reader.read_rows(BIG_EMBED, 1000, 3000), rows)
    assert torch.equal(again.reader.read_rows(BIG_EMBED, 1500, 2000), rows[500:1000])
    assert _weights_served(hub) == 0 and again.bytes_fetched == 0 and again.bytes_read == 2500 * 512
    # metadata files and headers came from the cache too: the model-info call is the only request
    assert [r.path for r in hub.requests] == [None] and again.config == first.config


def test_local_hf_cache_blobs_are_used_online(hub, models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    weights = models["tiny"] / "model.safetensors"
    blobs = tmp_path / "home" / "hub" / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    shutil.copy(weights, blobs / _sha256(weights))
    src = open_model("org/tiny")
    local = open_model(str(models["tiny"]))
    assert torch.equal(src.reader.read_rows("lm_head.weight"), local.reader.read_rows("lm_head.weight"))
    assert _weights_served(hub) == 0 and any("local HF cache" in n for n in src.notes)


def test_range_cache_cover_and_store(tmp_path):
    cache = RangeCache(str(tmp_path))
    key = "ab" * 32
    assert cache.store(key, 10, b"0123456789") and cache.store(key, 30, b"abcde")
    cached, gaps = cache.cover(key, 5, 40)
    assert [(s, e) for s, e, _ in cached] == [(10, 20), (30, 35)] and gaps == [(5, 10), (20, 30), (35, 40)]
    out = bytearray(4)
    assert cache.read_into(key, cached[0][2], 12, memoryview(out)) and bytes(out) == b"2345"
    (tmp_path / key[:2] / key / "30-35").write_bytes(b"abc")  # truncated entry: ignored by a new index
    assert [(s, e) for s, e, _ in RangeCache(str(tmp_path)).cover(key, 0, 40)[0]] == [(10, 20)]
    with pytest.raises(ValueError):
        cache.store("../../etc", 0, b"x")


# --- a comparison over the Hub -----------------------------------------------------------------------------------
def test_sampled_compare_reads_a_fraction_and_agrees_with_local(hub, models):
    from hf_provenance.compare import compare

    local = compare(str(models["big_ft"]), [str(models["big"])])
    total = sum(p.stat().st_size for m in ("big", "big_ft") for p in models[m].glob("*.safetensors"))
    remote = compare("org/ft", ["org/base"], sample=0.1)
    served = _weights_served(hub)
    assert remote.comparisons[0].verdict.verdict == local.comparisons[0].verdict.verdict == "derived"
    assert served <= 0.15 * total, served / total
    assert remote.model.revision == hub.commits["ft"]
    assert remote.comparisons[0].base.content_id["kind"] == "hub"
    hub.reset_counts()
    rerun = compare("org/ft", ["org/base"], sample=0.1)
    assert _weights_served(hub) == 0
    assert rerun.comparisons[0].verdict.verdict == "derived"


def test_identical_repos_share_lfs_sha256(hub):
    a, b = open_model("org/tiny"), open_model("org/redirect")  # same files, another repo and commit
    assert a.content_id.files == b.content_id.files and a.content_id.value != b.content_id.value


# --- faults ------------------------------------------------------------------------------------------------------
def test_transient_500s_are_retried(hub, models):
    local = open_model(str(models["big"]))
    hub.fault("status", match="/api/models/", times=2, status=503)
    hub.fault("status", match="model.safetensors", times=2, status=500)
    src = open_model("org/base")
    assert _layout(src.inventory) == _layout(local.inventory)
    hub.fault("status", match="model.safetensors", times=2, status=500)
    assert torch.equal(src.reader.read_rows(BIG_EMBED, 0, 700), local.reader.read_rows(BIG_EMBED, 0, 700))


@pytest.mark.parametrize("kind", ["drop", "wrong_range"])
def test_one_bad_response_is_retried(hub, models, kind):
    src = open_model("org/base")
    local = open_model(str(models["big"]))
    hub.fault(kind, match="model.safetensors", times=1)
    assert torch.equal(src.reader.read_rows(BIG_EMBED, 100, 1100), local.reader.read_rows(BIG_EMBED, 100, 1100))


def test_a_slow_response_times_out_and_is_retried(hub, models, monkeypatch):
    monkeypatch.setenv("HF_PROVENANCE_HTTP_TIMEOUT", "0.5")
    src = open_model("org/tiny")
    hub.fault("slow", match="model.safetensors", times=1, delay=1.5)
    local = open_model(str(models["tiny"]))
    assert torch.equal(src.reader.read_rows("lm_head.weight"), local.reader.read_rows("lm_head.weight"))


@pytest.mark.parametrize("kind", ["status", "drop", "wrong_range"])
def test_persistent_faults_raise_remote_error(hub, kind):
    src = open_model("org/base")
    hub.reset_counts()
    hub.fault(kind, match="model.safetensors", times=None)
    with pytest.raises(RemoteError) as info:
        src.reader.read_rows(BIG_EMBED, 0, 512)
    err = info.value
    assert err.exit_code == 3 and "org/base" in err.where and "after 4 attempts" in err.problem
    assert "\n" not in str(err)
    assert len(hub.range_requests()) == 4


def test_server_ignoring_range_is_refused(hub):
    src = open_model("org/base")
    hub.fault("ignore_range", match="model.safetensors", times=None)
    with pytest.raises(RemoteError, match="ignored the Range header"):
        src.reader.read_rows(BIG_EMBED, 0, 512)


def test_compare_never_returns_a_partial_result(hub):
    from hf_provenance.compare import compare

    hub.fault("drop", match="org/base/resolve/", times=None)
    with pytest.raises(RemoteError):
        compare("org/ft", ["org/base"], sample=0.1)


def _cli_main():
    from hf_provenance.cli.main import main

    return main


def test_cli_inspect_transfers_no_weight_bytes(hub, models, capsys):
    main = _cli_main()
    assert main(["inspect", "org/base"]) == 0
    assert "org/base" in capsys.readouterr().out
    assert _weights_served(hub) == 8 + _header_len(models["big"] / "model.safetensors")


def test_cli_reports_network_failure_in_one_line(hub, capsys):
    main = _cli_main()
    hub.fault("status", match="/api/models/", times=None, status=502)
    assert main(["inspect", "org/tiny"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and "org/tiny" in err and "HTTP 502" in err


# --- offline: the HF cache ---------------------------------------------------------------------------------------
def _populate_cache(home: Path, repo: str, folder: Path, sha: str, branch: str = "main") -> Path:
    repo_dir = home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / branch).write_text(sha)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors" else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        (snap / path.name).symlink_to(os.path.join("..", "..", "blobs", blob))
    return snap


def test_offline_resolves_from_the_hf_cache(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    sha = "1234567890abcdef1234567890abcdef12345678"
    _populate_cache(tmp_path / "home", "org/tiny", models["tiny"], sha)
    local = open_model(str(models["tiny"]))
    for ref in ("org/tiny", "org/tiny@main", f"org/tiny@{sha}"):
        src = open_model(ref)
        assert src.kind == "hf-cache" and src.revision == sha and src.ref == ref
        assert "HF_HUB_OFFLINE=1" in src.notes[0] and "local HF cache" in src.notes[0]
        assert _layout(src.inventory) == _layout(local.inventory) and src.config == local.config
        assert src.content_id.kind == "hub" and src.content_id.value == sha
        assert src.content_id.files == {"model.safetensors": _sha256(models["tiny"] / "model.safetensors")}
    with pytest.raises(ModelNotFoundError) as info:
        open_model("org/tiny@dev")
    assert info.value.exit_code == 2 and "'dev'" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="not in the local HF cache") as info:
        open_model("org/absent")
    assert info.value.where == "org/absent" and "hf download org/absent" in str(info.value)


def test_offline_cli_missing_cache_exit_2(tmp_path, monkeypatch, capsys):
    main = _cli_main()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert main(["inspect", "org/absent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "org/absent" in err and "HF_HUB_OFFLINE" in err


# --- access errors and the token ---------------------------------------------------------------------------------
def test_gated_repo_without_token(hub):
    with pytest.raises(RepoAccessError) as info:
        open_model("org/gated")
    err = info.value
    assert "org/gated" in str(err) and "gated" in err.problem and "HF_TOKEN" in err.problem
    assert err.exit_code == 2 and isinstance(err, PermissionError) and "\n" not in str(err)


def test_gated_repo_terms_not_accepted_then_accepted(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(RepoAccessError, match="accept its terms") as info:
        open_model("org/gated")
    assert info.value.where == "org/gated"
    assert TOKEN not in str(info.value)  # the server echoed it in X-Error-Message
    hub.accepted.add(TOKEN)
    try:
        assert open_model("org/gated").revision == hub.commits["gated"]
    finally:
        hub.accepted.discard(TOKEN)


def test_private_repo_needs_the_token(hub, monkeypatch):
    with pytest.raises(RepoAccessError, match="HF_TOKEN"):
        open_model("org/private")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    with pytest.raises(RepoAccessError) as info:
        open_model("org/private")
    assert "hf_wrong_token_value" not in str(info.value) and "***" in str(info.value)


@pytest.mark.parametrize("ref, says", [("org/nope", "no such repo org/nope"),
                                       ("org/tiny@nope", "no such revision 'nope' in org/tiny")])
def test_missing_repo_or_revision(hub, ref, says):
    with pytest.raises(ModelNotFoundError) as info:
        open_model(ref)
    assert info.value.where == ref and says in info.value.problem and info.value.exit_code == 2
    assert "check the repo id" in info.value.problem and "\n" not in str(info.value)


def test_pickle_only_repo_is_refused(hub):
    with pytest.raises(UnsafeFormatError) as info:
        open_model("org/pickle")
    assert info.value.where == "org/pickle" and "pytorch_model.bin" in str(info.value)
    assert "safetensors" in str(info.value)
    assert not hub.served("org/pickle", ".bin")


def test_token_is_sent_and_never_leaks(hub, monkeypatch, caplog):
    from hf_provenance.compare import compare

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    src = open_model("org/private")
    rows = src.reader.read_rows("lm_head.weight", 0, 8)
    assert rows.shape == (8, 64)
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}
    report = compare("org/private", ["org/tiny"])
    text = json.dumps(report.to_dict()) + json.dumps(src.content_id.to_dict()) + " ".join(src.notes) + repr(src)
    hub.fault("status", match="/api/models/", times=None, status=500, message=f"boom {TOKEN}")
    with pytest.raises(ProvenanceError) as info:
        open_model("org/private")
    text += str(info.value) + repr(info.value)
    text += "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("hf_provenance", "httpx")))
    assert TOKEN not in text
    assert not any("Bearer" in r.getMessage() for r in caplog.records)  # no logger prints the request headers
    assert "***" in str(info.value)


def test_stored_login_token_is_used(hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    assert open_model("org/private").revision == hub.commits["private"]
    assert set(hub.authorizations) == {f"Bearer {TOKEN}"}


def test_bad_settings_are_usage_errors(hub, monkeypatch):
    monkeypatch.setenv("HF_PROVENANCE_HTTP_RETRIES", "many")
    with pytest.raises(UsageError, match="HF_PROVENANCE_HTTP_RETRIES"):
        open_model("org/tiny")
    monkeypatch.setenv("HF_PROVENANCE_HTTP_RETRIES", "1")
    monkeypatch.setenv("HF_ENDPOINT", "ftp://example")
    with pytest.raises(UsageError, match="HF_ENDPOINT"):
        open_model("org/tiny")


def test_reader_protocol(hub):
    src = open_model("org/tiny")
    assert isinstance(src.reader, RowReader)
    src.close()
    assert src.reader.read_rows("lm_head.weight", 0, 2).shape == (2, 64)  # reopens after close
    assert isinstance(RemoteError("x", "y"), ConnectionError) and issubclass(RepoAccessError, InputError)


# --- verdicts that need the Hub's metadata ------------------------------------------------------------------------
def test_equal_lfs_sha256_is_identical_without_reading_weights(hub, models):
    from hf_provenance.compare import compare

    c = compare("org/redirect", ["org/tiny"]).comparisons[0]
    assert c.verdict.verdict == "identical" and "LFS sha256" in c.verdict.reasons[0]
    headers = sum(8 + _header_len(p) for p in models["tiny"].glob("*.safetensors"))
    assert _weights_served(hub) <= 2 * headers  # headers only, no tensor bytes
    assert c.io["bytes_read"] == {"model": 0, "base": 0}


def test_declared_base_is_used_and_checked(hub):
    from hf_provenance.compare import compare

    # org/ft's card declares no base; org/tiny's card declares org/ancestor, which is not served
    report = compare("org/adapter")  # the adapter's card declares org/tiny
    c = report.comparisons[0]
    assert "base_model" in report.notes[0] and c.base.ref == "org/tiny"
    assert c.verdict.verdict == "derived" and c.verdict.relation == ("adapter",)
    assert "by construction, not weight evidence" in c.verdict.reasons[0]
    assert c.declared["is_declared_base"] and "confirmed" in c.declared["message"]


def test_gptq_repo_declared_quantized_is_never_independent(hub):
    from hf_provenance.compare import compare

    c = compare("org/quant", ["org/base"]).comparisons[0]
    assert c.verdict.verdict == "inconclusive"
    assert any("not comparable (format gptq)" in x for x in c.verdict.not_compared)


def test_adapter_that_does_not_fit_is_not_derived(hub):
    from hf_provenance.compare import compare

    c = compare("org/adapter", ["org/base"]).comparisons[0]  # hidden 128 base: q_proj shapes do not fit
    assert c.verdict.verdict == "inconclusive" and "does not fit" in c.verdict.reasons[0]


def test_no_declared_base_is_a_usage_error(hub):
    from hf_provenance.compare import compare
    from hf_provenance.errors import UsageError

    with pytest.raises(UsageError, match="declares no base_model"):
        compare("org/ft")


def test_cli_arch_transfers_no_weight_bytes(hub, models, capsys):
    main = _cli_main()
    assert main(["arch", "org/ft", "org/base"]) == 0
    assert "org/ft" in capsys.readouterr().out
    headers = 8 + _header_len(models["big"] / "model.safetensors")
    assert _weights_served(hub) == 2 * headers  # the two headers, no tensor bytes


def test_contradicted_declaration_is_reported_plainly(hub, models, tmp_path):
    """A card declaring a base its weights do not come from: the report says so in words."""
    from hf_provenance.compare import compare
    from hf_provenance.factory.build import build_random

    liar = build_random("llama", tmp_path / "liar", hidden=128, layers=1, intermediate=128, vocab=32768,
                        dtype="float32", heads=2, kv_heads=2, seed=9)
    _card(liar, "org/base")
    hub.add_repo("org/liar", liar)
    report = compare("org/liar")
    c = report.comparisons[0]
    assert c.base.ref == "org/base" and c.verdict.verdict == "independent"
    assert c.declared["message"] == "the card declares org/base as base_model, but the weights show no shared lineage"
