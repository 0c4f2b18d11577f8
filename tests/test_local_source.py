"""open_model on local layouts: the real MiniLM, sharded folders, single files, HF cache snapshots, metadata files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_provenance.errors import InputError, ModelNotFoundError, UnsafeFormatError
from hf_provenance.sources import RESOLVERS, open_model
from hf_provenance.sources.base import CardMetadata
from hf_provenance.sources.metadata import parse_card

CONFIG = {"model_type": "llama", "hidden_size": 8}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(16, 8, generator=gen),
            "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=gen).to(torch.bfloat16),
            "model.layers.0.mlp.down_proj.weight": torch.randn(8, 12, generator=gen).to(torch.float16),
            "model.norm.weight": torch.ones(8)}


def _write_folder(folder, tensors, *, shards: int = 1, config=CONFIG):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _hf_cache(root, folder, repo="models--org--name", sha="0123456789abcdef0123456789abcdef01234567"):
    """Move ``folder``'s files into an HF cache layout: blobs/<sha256>, snapshots/<sha>/<name> -> ../../blobs/..."""
    repo_dir = root / repo
    (repo_dir / "blobs").mkdir(parents=True)
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    for name in sorted(os.listdir(folder)):
        data = (folder / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / name)
    return repo_dir, snap


def _assert_reads_like_safetensors(source, files):
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                expected = f.get_tensor(name)
                got = source.reader.read_rows(name)
                assert torch.equal(got, expected.to(torch.float32).reshape(got.shape)), name


# --- the real model -------------------------------------------------------------------------------------------
def test_minilm(minilm):
    src = open_model(minilm)
    assert src.kind == "folder" and src.path == os.path.abspath(minilm) and src.revision is None
    assert len(src.inventory) == 104
    assert src.config["model_type"] == "bert"
    assert len(src.vocab) == 30522 and src.vocab.kind == "tokenizer.json"
    assert src.vocab.tokens["[CLS]"] == 101 and "[MASK]" in src.vocab.special
    assert src.card.license == "apache-2.0" and src.card.base_model == ()
    assert src.quantization is None and src.adapter is None
    assert src.content_id.kind == "layout_id" and src.content_id == open_model(minilm).content_id
    assert src.bytes_read == 0, "opening reads headers only"
    emb = src.inventory["embeddings.word_embeddings.weight"]
    assert emb.shape == (30522, 384)
    rows = src.reader.read_rows(emb.name, 1000, 1064)
    assert src.bytes_read == 64 * 384 * 4
    with safe_open(os.path.join(minilm, "model.safetensors"), "pt") as f:
        assert torch.equal(rows, f.get_slice(emb.name)[1000:1064])
    src.close()


def test_package_level_open_model(minilm):
    import hf_provenance

    assert len(hf_provenance.open_model(minilm).inventory) == 104


# --- layouts --------------------------------------------------------------------------------------------------
def test_sharded_folder(tmp_path):
    tensors = _tensors()
    folder = _write_folder(tmp_path / "sharded", tensors, shards=3)
    src = open_model(str(folder))
    assert src.kind == "folder" and set(src.inventory) == set(tensors)
    assert len(src.files) == 3 and len({i.file for i in src.inventory.values()}) == 3
    assert set(src.content_id.files) == set(src.files)
    _assert_reads_like_safetensors(src, sorted(folder.glob("*.safetensors")))
    single = open_model(str(_write_folder(tmp_path / "single", tensors)))
    assert single.inventory.keys() == src.inventory.keys()
    assert single.content_id != src.content_id, "the layout differs, so the layout id differs"


def test_folder_without_index_uses_every_safetensors_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "part-a.safetensors"))
    save_file({"b": torch.zeros(3)}, str(folder / "part-b.safetensors"))
    src = open_model(str(folder))
    assert src.config is None and set(src.inventory) == {"a", "b"}
    assert torch.equal(src.reader.read_rows("b"), torch.zeros(1, 3))


def test_single_file_uses_config_beside_it(tmp_path):
    folder = _write_folder(tmp_path / "m", _tensors())
    path = str(folder / "model.safetensors")
    src = open_model(path)
    assert src.kind == "file" and src.path == path and src.config == CONFIG
    assert src.content_id == open_model(str(folder)).content_id
    _assert_reads_like_safetensors(src, [path])
    os.remove(folder / "config.json")
    assert open_model(path).config is None


def test_hf_cache_snapshot(tmp_path):
    tensors = _tensors(1)
    plain = _write_folder(tmp_path / "plain", tensors, shards=2)
    (plain / "README.md").write_text("---\nbase_model: org/base\n---\n# card\n")
    repo, snap = _hf_cache(tmp_path / "hub", plain)
    src = open_model(str(snap))
    assert src.kind == "hf-cache" and src.revision == snap.name and src.content_id.revision == snap.name
    assert set(src.inventory) == set(tensors) and src.config == CONFIG
    assert src.card.base_model == ("org/base",)
    assert {i.file for i in src.inventory.values()} <= {str(snap / f) for f in os.listdir(snap)}
    _assert_reads_like_safetensors(src, sorted(plain.glob("*.safetensors")))
    assert src.content_id.value == open_model(str(plain)).content_id.value
    by_repo = open_model(str(repo))  # the repo folder resolves through refs/main
    assert by_repo.kind == "hf-cache" and by_repo.revision == snap.name
    single = open_model(str(snap / "model-00001-of-00002.safetensors"))
    assert single.kind == "file" and single.revision == snap.name


def test_config_only_folder(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    src = open_model(str(folder))
    assert src.inventory == {} and src.config == CONFIG
    assert any("no weight files; config only" in n for n in src.notes)
    other = tmp_path / "cfg2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(CONFIG, hidden_size=16)))
    assert open_model(str(other)).content_id != src.content_id, "config-only ids still tell configs apart"


def test_content_id_reads_no_weight_bytes(tmp_path):
    folder = _write_folder(tmp_path / "m", {"w": torch.zeros(4, 4)})
    before = open_model(str(folder)).content_id
    save_file({"w": torch.ones(4, 4)}, str(folder / "model.safetensors"))  # same header, other bytes
    assert open_model(str(folder)).content_id == before
    save_file({"w": torch.ones(4, 5)}, str(folder / "model.safetensors"))
    assert open_model(str(folder)).content_id != before


def test_nonexistent_refs():
    with pytest.raises(ModelNotFoundError) as err:
        open_model("/no/such/path")
    assert str(err.value) == "/no/such/path: no such file or folder"


def test_resolvers_are_a_list_tried_in_order(tmp_path, monkeypatch):
    seen = []

    def fake(ref, **options):
        seen.append((ref, options))
        return "fake-source" if ref == "org/x" else None

    # a resolver placed before the Hub resolver (which would claim "org/x") is tried first
    monkeypatch.setattr("hf_provenance.sources.RESOLVERS", [RESOLVERS[0], fake, *RESOLVERS[1:]])
    assert open_model("org/x") == "fake-source"
    assert seen == [("org/x", {"allow_pickle": False})]


# --- pickles ----------------------------------------------------------------------------------------------------
def test_pickle_refused_unless_allowed(tmp_path):
    folder = tmp_path / "pk"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    tensors = _tensors(2)
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "training_args.bin").write_bytes(b"not weights")
    with pytest.raises(UnsafeFormatError):
        open_model(str(folder))
    src = open_model(str(folder), allow_pickle=True)
    assert set(src.inventory) == set(tensors)
    assert src.inventory["model.layers.0.mlp.up_proj.weight"].dtype == "BF16"
    for name, t in tensors.items():
        assert torch.equal(src.reader.read_raw(name), t.reshape(src.reader.read_raw(name).shape))
    assert any("weights_only=True" in n for n in src.notes)


def test_pickle_loader_rejects_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(InputError) as err:
        open_model(str(folder), allow_pickle=True)
    assert str(err.value).startswith(f"{folder / 'pytorch_model.bin'}: torch.load(weights_only=True) failed: ")
    assert not (tmp_path / "pwned").exists()


# --- metadata files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected,has_note", [
    ("---\nbase_model: org/a\nlicense: mit\n---\nbody", CardMetadata(("org/a",), None, "mit"), False),
    ("---\r\nbase_model:\r\n- org/a\r\n- org/b\r\nbase_model_relation: merge\r\n---\r\n",
     CardMetadata(("org/a", "org/b"), "merge", None), False),
    ("\ufeff---\nbase_model: [org/a, 3]\n---\n", CardMetadata(("org/a",)), True),
    ("---\nbase_model: [unclosed\n---\n", CardMetadata(), True),
    ("---\nbase_model: org/a\n", CardMetadata(), True),
    ("---\n- a list\n---\n", CardMetadata(), True),
    ("no front matter\n---\nbase_model: x\n---\n", CardMetadata(), False),
    ("---\n---\n", CardMetadata(), False),
    ("---\nbase_model: {a: 1}\nlicense: [x]\n---\n", CardMetadata(), True),
])
def test_card_front_matter(text, expected, has_note):
    card, notes = parse_card(text, "README.md")
    assert card == expected
    assert bool(notes) == has_note and all(n.startswith("README.md: ") for n in notes)


def test_malformed_card_is_a_note_not_a_crash(tmp_path):
    folder = _write_folder(tmp_path / "m", {"w": torch.zeros(2)})
    (folder / "README.md").write_text("---\nbase_model: [unclosed\n---\n")
    src = open_model(str(folder))
    assert src.card == CardMetadata()
    assert any(n.startswith(f"{folder / 'README.md'}: YAML front matter is not valid YAML") for n in src.notes)


def test_vocab_sources(tmp_path):
    folder = _write_folder(tmp_path / "m", {"w": torch.zeros(2)})
    (folder / "vocab.txt").write_text("[PAD]\nhello\nworld\n")
    assert open_model(str(folder)).vocab.tokens == {"[PAD]": 0, "hello": 1, "world": 2}
    tok = {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["▁a", -1.0]]},
           "added_tokens": [{"id": 2, "content": "<extra>", "special": True},
                            {"id": 3, "content": "plain", "special": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    vocab = open_model(str(folder)).vocab
    assert vocab.kind == "tokenizer.json" and vocab.tokens == {"<unk>": 0, "▁a": 1, "<extra>": 2, "plain": 3}
    assert vocab.special == frozenset({"<extra>"})
    (folder / "tokenizer.json").write_text("{not json")
    src = open_model(str(folder))
    assert src.vocab.kind == "vocab.txt" and any("tokenizer.json: not valid JSON" in n for n in src.notes)


def test_sentencepiece_missing_is_a_note(tmp_path):
    folder = _write_folder(tmp_path / "m", {"w": torch.zeros(2)})
    (folder / "tokenizer.model").write_bytes(b"\x0a\x05hello")
    src = open_model(str(folder))
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        assert src.vocab is None and any("sentencepiece is not installed" in n for n in src.notes)
    else:
        assert src.vocab is None or src.vocab.kind == "tokenizer.model"


def test_quantization_and_adapter(tmp_path):
    config = dict(CONFIG, quantization_config={"quant_method": "fp8", "weight_block_size": [2, 2]})
    folder = _write_folder(tmp_path / "q", {"l.weight": torch.ones(4, 4).to(torch.float8_e4m3fn),
                                             "l.weight_scale_inv": torch.tensor([[1.0, 2.0], [3.0, 4.0]])},
                           config=config)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    src = open_model(str(folder))
    assert src.quantization == "fp8" and src.adapter == {"peft_type": "LORA", "r": 8}
    assert src.scale_names == frozenset({"l.weight_scale_inv"})
    expected = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    assert torch.equal(src.reader.read_rows("l.weight"), expected)


def test_model_folder_code_is_never_imported(tmp_path):
    folder = _write_folder(tmp_path / "m", {"w": torch.zeros(2)},
                           config=dict(CONFIG, auto_map={"AutoModel": "modeling_evil.Evil"}))
    (folder / "modeling_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    open_model(str(folder))
    assert not (tmp_path / "ran").exists()
    shutil.rmtree(folder)
