"""Vocabulary alignment across tokenizer families: normalised tokens, detection, row maps, and the factory's
other_tokenizer / vocab_pruned transforms compared end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hf_provenance.alignment import tokens as T
from hf_provenance.alignment.vocab import vocab_map
from hf_provenance.compare import compare
from hf_provenance.factory import TRANSFORMS
from hf_provenance.sources import open_model
from hf_provenance.sources.base import Vocabulary

FAMILIES = ["llama", "bert", "deepseek_v3"]


def verdict_of(model: str, base: str, **kw) -> dict:
    d = compare(model, [base], **kw).to_dict()
    json.dumps(d, allow_nan=False)
    return d["comparisons"][0]


def plan_of(folder: str) -> dict:
    return json.loads((Path(folder) / "factory.json").read_text())["transform"]["plan"]


# ---- normalise / spell ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("token, kind, expected", [
    ("Ġhello", "bytelevel", (b"hello", True)),
    ("hello", "bytelevel", (b"hello", False)),
    ("Ġ", "bytelevel", (b"", True)),
    ("Ċ", "bytelevel", (b"\n", False)),
    ("ĉ", "bytelevel", (b"\t", False)),
    ("ĠcafÃ©", "bytelevel", ("café".encode(), True)),
    ("<|im_start|>", "bytelevel", (b"<|im_start|>", False)),
    ("▁hello", "metaspace", (b"hello", True)),
    ("hello", "metaspace", (b"hello", False)),
    ("▁new▁york", "metaspace", (b"new york", True)),
    ("<0x0A>", "metaspace", (b"\n", False)),
    ("<0xC3>", "metaspace", (b"\xc3", False)),
    ("▁café", "metaspace", ("café".encode(), True)),
    ("hello", "wordpiece", (b"hello", True)),
    ("##lo", "wordpiece", (b"lo", False)),
    ("##", "wordpiece", (b"##", True)),
    ("hello", "unknown", (b"hello", False)),
])
def test_normalise_table(token, kind, expected):
    assert T.normalise(token, kind) == expected


def test_normalise_refuses_unknown_kind():
    with pytest.raises(ValueError, match="tokenizer kind 'bpe' is not one of"):
        T.normalise("x", "bpe")


def test_byte_table_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # test oracle only

    assert T.BYTE_TO_CHAR == bytes_to_unicode()
    assert len(set(T.BYTE_TO_CHAR.values())) == 256


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace", "wordpiece"])
def test_spell_inverts_normalise(kind):
    rng = np.random.default_rng(0)
    pieces = [b"hello", b"new york", "café".encode(), "日本".encode(), b"a", b""]
    if kind == "bytelevel":
        pieces += [bytes(rng.integers(0, 256, size=4).tolist()) for _ in range(50)] + [bytes([b]) for b in range(256)]
    if kind == "metaspace":
        pieces += [bytes([b]) for b in range(128, 256)]  # lone bytes: <0xNN> tokens (never starting a word)
    for data in pieces:
        for ws in (True, False):
            if not ws and data.startswith(b" "):
                continue  # a leading space *is* a word start: (b" x", False) is the token (b"x", True)
            try:
                tok = T.spell(data, ws, kind)
            except ValueError:
                # a byte token cannot start a word; '##' alone is not a continuation
                assert (kind == "metaspace" and ws and len(data) == 1) or (kind == "wordpiece" and not data)
                continue
            assert T.normalise(tok, kind) == (data, ws), (tok, data, ws)


def test_bytelevel_spelling_matches_the_tokenizers_library():
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in [" hello", "\nnew", " café", "tab\there"]:
        (piece, _), = pre.pre_tokenize_str(text)
        assert T.normalise(piece, "bytelevel") == ((text[1:].encode(), True) if text.startswith(" ")
                                                   else (text.encode(), False))


# ---- detection ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, kind", [("llama", "metaspace"), ("bert", "wordpiece"),
                                          ("deepseek_v3", "bytelevel"), ("qwen3_moe", "bytelevel")])
def test_detect_factory_tokenizers_from_structure_and_from_strings(make, family, kind):
    folder = Path(make(family))
    doc = json.loads((folder / "tokenizer.json").read_text())
    vocab = open_model(str(folder)).vocab
    found = T.detect(vocab, doc)
    assert found.kind == kind and found.how.startswith("tokenizer.json:")
    from_strings = T.detect(vocab)
    assert from_strings.kind == kind and from_strings.how.startswith("strings:")


@pytest.mark.parametrize("doc, kind, how", [
    # Llama-2 style sentencepiece converted to tokenizers: spaces replaced by ▁ in the normalizer
    ({"model": {"type": "BPE", "vocab": {}}, "pre_tokenizer": None,
      "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                         {"type": "Replace", "pattern": {"String": " "},
                                                          "content": "▁"}]},
      "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}},
     "metaspace", "normalizer"),
    # Llama-3 style: a Split then ByteLevel inside a Sequence pre-tokenizer
    ({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "x"}}, {"type": "ByteLevel", "add_prefix_space": False}]},
      "decoder": {"type": "ByteLevel"}}, "bytelevel", "pre_tokenizer ByteLevel"),
    ({"model": {"type": "WordPiece", "continuing_subword_prefix": "##"}}, "wordpiece", "WordPiece"),
    ({"model": {"type": "WordPiece", "continuing_subword_prefix": "@@"}}, "unknown", "'@@'"),
])
def test_detect_from_tokenizer_json(doc, kind, how):
    found = T.from_tokenizer_json(doc)
    assert found.kind == kind and how in found.how


def test_detect_from_file_kind_and_unmarked_strings():
    assert T.detect(Vocabulary("vocab.txt", {"a": 0})).kind == "wordpiece"
    assert T.detect(Vocabulary("tokenizer.model", {"a": 0})).kind == "metaspace"
    plain = T.detect(Vocabulary("tokenizer.json", {w: i for i, w in enumerate(["a", "b", "cd"])}))
    assert plain.kind == "unknown" and "no family mark" in plain.how
    assert T.from_tokenizer_json({"model": {"type": "WordLevel"}}) is None


# ---- vocab_map ------------------------------------------------------------------------------------------------

def _vocab(tokens: list[str], special=()) -> Vocabulary:
    return Vocabulary("tokenizer.json", {t: i for i, t in enumerate(tokens)}, frozenset(special))


def test_exact_strings_that_mean_different_tokens_are_rejected():
    # WordPiece "lo" starts a word; byte-level "lo" continues one: the same string, different tokens
    base = _vocab(["[PAD]", "hel", "##lo", "lo", "##hel", "x", "y", "z", "##w"], ["[PAD]"])
    model = _vocab(["[PAD]", "lo", "Ġlo", "Ġhel", "hel", "Ġx", "Ġy", "Ġz", "w"], ["[PAD]"])
    kb, km = T.TokenizerKind("wordpiece", "test"), T.TokenizerKind("bytelevel", "test")
    vm = vocab_map(base, model, 9, 9, base_kind=kb, model_kind=km)
    got = dict(zip(vm.base_rows.tolist(), vm.model_rows.tolist()))
    assert got == {0: 0, 1: 3, 2: 1, 3: 2, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8}
    assert vm.raw_shared == 3 and vm.exact_rejected == 2  # "hel" and "lo" exist on both sides, meaning differs
    assert vm.method == "normalised tokens (wordpiece ↔ bytelevel)"
    assert vm.to_dict()["normalised_shared"] == 9


def test_byte_tokens_yield_to_regular_tokens_and_ambiguity_is_counted():
    base = _vocab(["<unk>", "<0x41>", "A", "▁b", "<0x42>", "c", "▁c"], ["<unk>"])
    model = _vocab(["<unk>", "A", "Ġb", "B", "c"])
    vm = vocab_map(base, model, 7, 5, base_kind=T.TokenizerKind("metaspace", "t"),
                   model_kind=T.TokenizerKind("bytelevel", "t"))
    got = dict(zip(vm.base_rows.tolist(), vm.model_rows.tolist()))
    assert got == {0: 0, 2: 1, 3: 2, 4: 3, 5: 4}  # A↔A (not <0x41>), ▁b↔Ġb, <0x42>↔B, c↔c
    assert vm.base_only == 2 and vm.model_only == 0


def test_one_vocabulary_on_both_sides_maps_as_the_two_passes_do():
    # aliases (two strings for id 2), ids past the tensors' rows, a gap (id 5 unused): the shortcut taken when both
    # sides hold one vocabulary must give what the two passes give; an alias only on the model side (id 2 again)
    # makes the dictionaries differ without changing the answer, so that call runs the passes
    tokens = {"<unk>": 0, "▁a": 1, "▁b": 2, "b": 2, "▁c": 3, "c": 4, "▁d": 6, "▁e": 7, "▁far": 9}
    kind = T.TokenizerKind("metaspace", "t")
    same = Vocabulary("tokenizer.json", dict(tokens), frozenset({"<unk>"}))
    aliased = Vocabulary("tokenizer.json", {**tokens, "▁bb": 2}, frozenset({"<unk>"}))
    fast = vocab_map(same, same, 8, 8, base_kind=kind, model_kind=kind)
    slow = vocab_map(same, aliased, 8, 8, base_kind=kind, model_kind=kind)
    assert fast.base_rows.tolist() == fast.model_rows.tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert fast.to_dict() == slow.to_dict()
    assert fast.base_rows.tolist() == slow.base_rows.tolist() and fast.model_rows.tolist() == slow.model_rows.tolist()


def test_same_family_vocabularies_pair_by_exact_strings_only(make):
    base, ext = open_model(make("llama")), open_model(make("llama", "vocab_extended"))
    vm = vocab_map(base.vocab, ext.vocab, 1024, len(ext.vocab))
    assert vm.method == "token strings" and vm.normalised_added == 0 and vm.exact_rejected == 0
    assert vm.shared == vm.raw_shared == 1024 and vm.model_only == 32


# ---- factory transforms ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_other_tokenizer_rows_found_by_normalisation(make, family):
    base, other = make(family), make(family, "other_tokenizer")
    vb, vo = open_model(base).vocab, open_model(other).vocab
    plan = plan_of(other)
    p = TRANSFORMS["other_tokenizer"].defaults
    vm = vocab_map(vb, vo, len(vb), len(vo))
    assert vm.raw_shared < 0.4 * len(vb)                       # exact strings: specials and (some) continuations
    assert vm.normalised_shared == len(vb) - p["n_drop"]       # every kept token, dropped ones excepted
    assert vm.base_only == p["n_drop"] and vm.model_only == p["n_add"]
    order = np.array(plan["order"])
    assert np.array_equal(order[vm.model_rows], vm.base_rows)  # each pair is the token it was made from
    assert vm.model_tokenizer.kind == plan["target_kind"] != vm.base_tokenizer.kind


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_other_tokenizer_and_vocab_pruned_tokenizers_load(make, family):
    from transformers import AutoTokenizer

    for variant in ("other_tokenizer", "vocab_pruned"):
        folder = Path(make(family, variant))
        cfg = json.loads((folder / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(folder)
        assert len(tok) == cfg["vocab_size"] == plan_of(folder)["new_vocab_size"]
    folder = Path(make(family, "other_tokenizer"))
    assert not (folder / "vocab.txt").exists()
    doc = json.loads((folder / "tokenizer.json").read_text())
    assert T.from_tokenizer_json(doc).kind == plan_of(folder)["target_kind"]


def test_other_tokenizer_refuses_bad_parameters(make, tmp_path):
    from hf_provenance.factory import apply_transform

    with pytest.raises(ValueError, match="target='wordpiece'"):
        apply_transform(make("llama"), tmp_path / "a", "other_tokenizer", target="wordpiece")
    with pytest.raises(ValueError, match="n_drop=5000"):
        apply_transform(make("llama"), tmp_path / "b", "other_tokenizer", n_drop=5000)


@pytest.mark.parametrize("family", FAMILIES)
def test_other_tokenizer_compares_derived_with_embedding_rows_lined_up(make, family):
    base, other = make(family), make(family, "other_tokenizer")
    c = verdict_of(other, base)
    assert c["verdict"] == "derived", c["reasons"]
    voc = c["alignment"]["vocab"]
    assert voc["method"].startswith("normalised tokens")
    assert voc["raw_shared"] < 0.4 * voc["base_rows"] and voc["normalised_shared"] == voc["base_rows"] - 8
    emb = [t for t in c["tensors"] if t["key"] == "token_embd.weight"]
    assert emb and emb[0]["shape"][0] == voc["normalised_shared"]
    assert emb[0]["pearson"]["value"] > 0.999 and emb[0]["frac_equal"] == 1.0


def test_other_tokenizer_with_equal_sizes_is_not_identical(make):
    c = verdict_of(make("llama", "other_tokenizer", n_add=8), make("llama"))
    assert c["verdict"] == "derived", c["reasons"]


@pytest.mark.parametrize("family", FAMILIES)
def test_vocab_pruned_is_derived_and_vocab_pruned(make, family):
    base, pruned = make(family), make(family, "vocab_pruned")
    plan = plan_of(pruned)
    vm = vocab_map(open_model(base).vocab, open_model(pruned).vocab, 1024, plan["new_vocab_size"])
    assert vm.shared == plan["new_vocab_size"] and vm.base_only == len(plan["dropped"]) and vm.model_only == 0
    assert np.array_equal(np.array(plan["order"])[vm.model_rows], vm.base_rows)
    c = verdict_of(pruned, base)
    assert c["verdict"] == "derived" and "vocab-pruned" in c["relation"], c["reasons"]
    assert "subset of the base's" in c["direction"]


def test_vocab_extended_still_works(make):
    c = verdict_of(make("llama", "vocab_extended"), make("llama"))
    assert c["verdict"] == "derived" and "vocab-extended" in c["relation"]
    assert c["alignment"]["vocab"]["method"] == "token strings"
