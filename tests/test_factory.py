"""The factory: genuine HF checkpoints per family, real training, variants with known lineage, cache, random builds."""

from __future__ import annotations

import importlib
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from hf_provenance.factory import (
    FAMILIES,
    TRANSFORMS,
    apply_transform,
    build,
    build_family,
    build_random,
    build_stats,
    recipe,
)
from hf_provenance.factory import recipes, tokenizer
from hf_provenance.factory.data import Language, TokenStream
from hf_provenance.factory.transforms import shard_files

build_mod = importlib.import_module("hf_provenance.factory.build")  # the package attribute is the function
FAMILY_NAMES = sorted(FAMILIES)
VARIANTS = ["base", "finetune", "independent", "pruned", "vocab_extended", "copy", "bf16", "noise"]


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("factory-cache")


@pytest.fixture(scope="session")
def family(cache):
    @lru_cache(maxsize=None)
    def get(name: str) -> dict[str, Path]:
        return build_family(name, VARIANTS, cache_dir=cache)

    return get


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in shard_files(folder):
        out.update(load_file(str(f)))
    return out


def meta(folder: Path) -> dict:
    return json.loads((folder / "factory.json").read_text())


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = [k for k in a if a[k].dim() == 2]
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in keys)
    den = sum(float(a[k].double().norm() ** 2) for k in keys)
    return math.sqrt(num / den)


def load_model(folder: Path):
    import transformers

    cls = getattr(transformers, config(folder)["architectures"][0])
    return cls.from_pretrained(folder)


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.arange(3, 19).remainder(vocab - 5).add(5).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits


def card(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# ---- every family ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_base_loads_with_transformers_and_gives_finite_logits(family, name):
    from transformers import AutoTokenizer

    base = family(name)["base"]
    cfg = config(base)
    assert cfg["model_type"] == FAMILIES[name]["model_type"]
    assert cfg["architectures"] == [FAMILIES[name]["architecture"]]
    model = load_model(base)
    out = logits(model, cfg["vocab_size"])
    assert out.shape[-1] == cfg["vocab_size"]
    assert torch.isfinite(out).all()
    tok = AutoTokenizer.from_pretrained(base)
    assert len(tok) == cfg["vocab_size"]
    style = FAMILIES[name]["tokenizer"]
    assert tok.convert_ids_to_tokens(list(range(8))) == tokenizer.vocabulary(style, 8)
    if name == "bert":
        assert (base / "vocab.txt").read_text().splitlines() == tokenizer.vocabulary(style, cfg["vocab_size"])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tensor_table_matches_what_transformers_saves(family, name):
    base = family(name)["base"]
    with safe_open(str(shard_files(base)[0]), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    table = recipes.tensor_shapes(name, config(base))
    assert {k: shape for k, (shape, _) in table.items()} == saved


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_training_moved_norms_and_lowered_the_loss(family, name):
    base = family(name)["base"]
    weights = tensors(base)
    norms = [k for k in weights if "norm" in k.lower() and k.endswith("weight")]
    assert norms
    for k in norms:
        assert float(weights[k].std()) > 1e-3, k
    log = meta(base)["train"]
    assert log["steps"] == FAMILIES[name]["train"]["steps"]
    assert log["loss_last"] < log["loss_first"] - 0.5


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_finetune_is_close_and_independent_is_far(family, name):
    paths = family(name)
    base, ft, ind = (tensors(paths[v]) for v in ("base", "finetune", "independent"))
    assert ft.keys() == base.keys() == ind.keys()
    assert any(not torch.equal(base[k], ft[k]) for k in base)
    assert 0.005 < rel_l2(base, ft) < 0.2
    assert rel_l2(base, ind) > 1.0
    assert meta(paths["finetune"])["train"]["steps"] == 30
    assert meta(paths["finetune"])["truth"]["verdict"] == "derived"
    assert meta(paths["independent"])["truth"] == {"verdict": "independent", "relation": [],
                                                   "direction_evident": False, "against": f"factory/{name}-base"}
    assert meta(paths["independent"])["recipe"]["init_seed"] != meta(paths["base"])["recipe"]["init_seed"]
    assert meta(paths["independent"])["recipe"]["data_seed"] != meta(paths["base"])["recipe"]["data_seed"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_pruned_drops_a_layer_and_renumbers(family, name):
    paths = family(name)
    base_cfg, cfg = config(paths["base"]), config(paths["pruned"])
    plan = meta(paths["pruned"])["transform"]["plan"]
    n = base_cfg["num_hidden_layers"]
    assert plan["dropped_layers"] == [n // 2]
    assert cfg["num_hidden_layers"] == n - 1
    base, pruned = tensors(paths["base"]), tensors(paths["pruned"])
    prefix = FAMILIES[name]["layer_prefix"]
    for new, old in plan["layer_map"].items():
        for key in base:
            if key.startswith(prefix.format(L=old)):
                renamed = prefix.format(L=new) + key[len(prefix.format(L=old)):]
                assert torch.equal(pruned[renamed], base[key])
    assert not any(k.startswith(prefix.format(L=n - 1)) for k in pruned)
    assert recipes.tensor_shapes(name, cfg).keys() == pruned.keys()
    assert torch.isfinite(logits(load_model(paths["pruned"]), cfg["vocab_size"])).all()


def test_pruning_the_dense_layer_of_deepseek_updates_first_k_dense_replace(family, tmp_path):
    out = apply_transform(family("deepseek_v3")["base"], tmp_path / "p", "pruned", drop=[0])
    cfg = config(out)
    assert cfg["first_k_dense_replace"] == 0 and cfg["num_hidden_layers"] == 2
    assert recipes.tensor_shapes("deepseek_v3", cfg).keys() == tensors(out).keys()
    assert torch.isfinite(logits(load_model(out), cfg["vocab_size"])).all()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_vocab_extended_keeps_old_rows_and_adds_tokens(family, name):
    from transformers import AutoTokenizer

    paths = family(name)
    plan = meta(paths["vocab_extended"])["transform"]["plan"]
    old, new = plan["old_vocab_size"], plan["new_vocab_size"]
    assert new == old + TRANSFORMS["vocab_extended"].defaults["n_new"]
    assert config(paths["vocab_extended"])["vocab_size"] == new
    base, ext = tensors(paths["base"]), tensors(paths["vocab_extended"])
    for key in FAMILIES[name]["vocab_tensors"]:
        assert ext[key].shape[0] == new
        assert ext[key][:old].numpy().tobytes() == base[key].numpy().tobytes()
        assert torch.isfinite(ext[key][old:]).all()
    for key in base.keys() - set(FAMILIES[name]["vocab_tensors"]):
        assert torch.equal(base[key], ext[key])
    tok = AutoTokenizer.from_pretrained(paths["vocab_extended"])
    assert len(tok) == new
    assert tok.convert_tokens_to_ids(plan["new_tokens"]) == list(range(old, new))
    assert tok.convert_ids_to_tokens(list(range(old))) == AutoTokenizer.from_pretrained(
        paths["base"]).convert_ids_to_tokens(list(range(old)))
    assert logits(load_model(paths["vocab_extended"]), new).shape[-1] == new


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_copy_bf16_noise(family, name):
    paths = family(name)
    base = tensors(paths["base"])
    copy_dir = paths["copy"]
    index = json.loads((copy_dir / "model.safetensors.index.json").read_text())
    assert len(shard_files(copy_dir)) == 2
    assert set(index["weight_map"]) == set(base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    copy = tensors(copy_dir)
    assert all(copy[k].numpy().tobytes() == base[k].numpy().tobytes() for k in base)
    assert torch.isfinite(logits(load_model(copy_dir), config(copy_dir)["vocab_size"])).all()

    bf16 = tensors(paths["bf16"])
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(bf16[k], base[k].to(torch.bfloat16)) for k in base)
    assert config(paths["bf16"])["dtype"] == "bfloat16"
    for variant in ("finetune", "independent", "bf16", "noise"):
        assert torch.isfinite(logits(load_model(paths[variant]).float(), config(paths[variant])["vocab_size"])).all()

    noisy = tensors(paths["noise"])
    k = next(k for k in base if base[k].dim() == 2)
    ratio = float((noisy[k] - base[k]).std() / base[k].std())
    assert 0.005 < ratio < 0.02
    assert meta(paths["noise"])["truth"]["verdict"] == "derived"
    assert meta(paths["copy"])["truth"]["verdict"] == "identical"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_cards_name_the_base_for_derived_variants(family, name):
    paths = family(name)
    assert "base_model" not in card(paths["base"])
    assert "base_model" not in card(paths["independent"])
    expected = {"finetune": "finetune", "pruned": "finetune", "vocab_extended": "finetune", "copy": "finetune",
                "bf16": "quantized", "noise": "finetune"}
    for variant, relation in expected.items():
        meta_card = card(paths[variant])
        assert meta_card["base_model"] == f"factory/{name}-base", variant
        assert meta_card["base_model_relation"] == relation, variant
        assert meta(paths[variant])["name"] == f"factory/{name}-{variant}"
        assert meta(paths[variant])["base"]["dir"] == str(paths["base"].resolve())


# ---- cache, determinism, atomicity --------------------------------------------------------------------------

def test_cache_hit_returns_the_same_folder_without_rebuilding(family, cache):
    first = family("llama")["finetune"]
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    before = build_stats()
    again = build("llama", "finetune", cache_dir=cache, steps=30)  # the default, spelled out
    assert again == first
    after = build_stats()
    assert after["built"] == before["built"] and after["hits"] == before["hits"] + 1
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    longer = build("llama", "finetune", cache_dir=cache, steps=40)
    assert longer != first and build_stats()["built"] == before["built"] + 1
    assert meta(longer)["train"]["steps"] == 40
    assert meta(longer)["name"].startswith("factory/llama-finetune-")
    assert card(longer)["base_model"] == "factory/llama-base"
    assert rel_l2(tensors(family("llama")["base"]), tensors(longer)) > rel_l2(
        tensors(family("llama")["base"]), tensors(first))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_PROVENANCE_FACTORY_CACHE", str(tmp_path / "env-cache"))
    assert build_mod.cache_root() == tmp_path / "env-cache"
    assert build_mod.cache_root(tmp_path / "x") == tmp_path / "x"


def test_recipe_keys_differ_by_seed_size_steps_and_variant():
    keys = {recipe("llama")["key"], recipe("llama", seed=1)["key"], recipe("llama", hidden=32)["key"],
            recipe("llama", train_steps=50)["key"], recipe("llama", "independent")["key"],
            recipe("llama", "noise")["key"], recipe("llama", "noise", scale=0.02)["key"]}
    assert len(keys) == 7
    assert recipe("llama", "noise", scale=0.01)["key"] == recipe("llama", "noise")["key"]
    assert recipe("llama", "noise", hidden=32)["base"]["key"] == recipe("llama", hidden=32)["key"]


@pytest.mark.parametrize("name", ["qwen3_moe", "bert"])
def test_builds_are_deterministic_and_sizes_are_knobs(name, tmp_path):
    small = {"hidden": 32, "layers": 1, "vocab": 256, "train_steps": 15, "steps": 5}
    a = build(name, "finetune", cache_dir=tmp_path / "a", **small)
    torch.manual_seed(1234)  # the caller's RNG state must not matter (BERT's dropout draws from it)
    before = torch.random.get_rng_state()
    b = build(name, "finetune", cache_dir=tmp_path / "b", **small)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    cfg = config(a)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (32, 1, 256)
    assert meta(a)["train"]["steps"] == 5
    assert meta(Path(meta(a)["base"]["dir"]))["train"]["steps"] == 15


@pytest.mark.parametrize("params, message", [
    ({"steps": 3}, "unknown parameter(s) ['steps']"),
    ({"hiden": 3}, "unknown parameter(s) ['hiden']"),
])
def test_unknown_parameters_are_refused(params, message, tmp_path):
    with pytest.raises(ValueError) as err:
        build("llama", "base", cache_dir=tmp_path, **params)
    assert message in str(err.value)


def test_unknown_family_and_variant_are_refused(tmp_path):
    with pytest.raises(ValueError, match="family 'gpt9' is not one of"):
        build("gpt9", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="variant 'distilled' is not one of"):
        build("llama", "distilled", cache_dir=tmp_path)


def test_expression_knobs_overridden_to_their_default_value_keep_the_default_name():
    assert recipe("llama", heads=4, hidden=64)["name"] == "factory/llama-base"
    assert recipe("llama", "finetune", steps=30)["name"] == "factory/llama-finetune"
    assert recipe("llama", "finetune", steps=31)["name"].startswith("factory/llama-finetune-")
    assert recipe("llama", seed=2)["name"] == "factory/llama-base-s2"


def test_a_failed_build_leaves_nothing_behind(monkeypatch, tmp_path):
    def boom(rec, out, base_dir):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(build_mod._BUILDERS, "pretrain", boom)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build("llama", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_apply_transform_refuses_a_non_empty_destination(family, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("")
    with pytest.raises(FileExistsError):
        apply_transform(family("llama")["base"], tmp_path / "x", "copy")
    with pytest.raises(ValueError, match="takes no parameter"):
        apply_transform(family("llama")["base"], tmp_path / "y", "noise", sigma=1)


def test_recipe_expressions_are_data_not_code():
    assert recipes.evaluate("max(4, hidden // 128) * 2", {"hidden": 1024}) == 16
    for bad in ["__import__('os')", "hidden.real", "hidden ** 2", "[1][0]"]:
        with pytest.raises(ValueError):
            recipes.evaluate(bad, {"hidden": 64})


# ---- data and tokenizer -------------------------------------------------------------------------------------

def test_token_stream_follows_frequency_rank_and_seeds():
    from scipy.stats import spearmanr

    lang = Language(1024, 3)
    stream = TokenStream(lang, data_seed=0, bos_id=1)
    ids = np.concatenate([stream.batch(32, 64) for _ in range(40)])
    counts = np.bincount(ids[:, 1:].ravel(), minlength=1024)[3:]
    assert spearmanr(counts, -np.arange(counts.size)).statistic > 0.9
    assert (ids[:, 0] == 1).all() and ids[:, 1:].min() >= 3
    again = TokenStream(Language(1024, 3), data_seed=0, bos_id=1).batch(32, 64)
    assert np.array_equal(again, ids[:32])
    assert not np.array_equal(TokenStream(lang, data_seed=1, bos_id=1).batch(32, 64), ids[:32])
    other = np.concatenate([TokenStream(Language(1024, 3, domain=1), 0).batch(32, 64) for _ in range(40)])
    other_counts = np.bincount(other.ravel(), minlength=1024)[3:]
    assert 0.5 < spearmanr(counts, other_counts).statistic < 0.97


def test_vocabulary_is_prefix_stable_and_unique():
    for style in tokenizer.STYLES:
        vocab = tokenizer.vocabulary(style, 3000)
        assert len(set(vocab)) == 3000
        assert vocab[: len(tokenizer.special_tokens(style))] == tokenizer.special_tokens(style)
        assert tokenizer.vocabulary(style, 3050, start=3000) == tokenizer.vocabulary(style, 3050)[3000:]
    lengths = [len(w) for w in tokenizer.words(2000)]
    assert np.mean(lengths[:200]) < np.mean(lengths[-200:])


# ---- random checkpoints for benchmarks ---------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_build_random_writes_a_sharded_loadable_checkpoint(name, tmp_path):
    out = build_random(name, tmp_path / "rand", hidden=64, layers=3, intermediate=128, vocab=512,
                       dtype="bfloat16", seed=3, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    cfg = config(out)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]) == (
        64, 3, 128, 512)
    table = recipes.tensor_shapes(name, cfg)
    seen = {}
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == shard
                seen[k] = (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
    assert {k: s for k, (s, _) in seen.items()} == {k: s for k, (s, _) in table.items()}
    assert {d for _, d in seen.values()} == {"BF16"}
    assert index["metadata"]["total_size"] == 2 * recipes.parameter_count(name, cfg)
    model = load_model(out)
    assert torch.isfinite(logits(model.float(), 512)).all()
    again = build_random(name, tmp_path / "again", hidden=64, layers=3, intermediate=128, vocab=512,
                         dtype="bfloat16", seed=3, max_shard_bytes=100_000)
    assert all((out / s).read_bytes() == (again / s).read_bytes() for s in shards)
    other = build_random(name, tmp_path / "other", hidden=64, layers=3, intermediate=128, vocab=512, seed=4)
    emb = next(k for k in table if "emb" in k and "word" in k or k == "model.embed_tokens.weight")
    assert not torch.equal(tensors(out)[emb].float(), tensors(other)[emb].float())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_build_random_refuses_a_non_empty_destination(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    with pytest.raises(FileExistsError):
        build_random("llama", tmp_path / "d", hidden=32, layers=1, intermediate=64, vocab=128)


def test_build_random_parameter_count_matches_transformers():
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = FAMILIES["deepseek_v3"]
    sizes = recipes.resolve_sizes("deepseek_v3", {"hidden": 256, "layers": 4, "experts": 8})
    cfg = AutoConfig.for_model(spec["model_type"], **recipes.config_fields("deepseek_v3", sizes))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    expected = sum(p.numel() for p in model.state_dict().values())
    assert recipes.parameter_count("deepseek_v3", cfg.to_dict()) == expected



def test_atomic_writes_get_a_new_file_s_mode_or_keep_the_replaced_file_s(tmp_path):
    """Reports and cards are written through a 0600 temporary file: the result must not stay private."""
    import os
    import stat

    from hf_provenance.atomic import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "report.json", "{}")
        assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
        card = tmp_path / "README.md"
        card.write_text("# model\n")
        card.chmod(0o640)
        write_text(card, "# model\n\nprovenance\n")
        assert stat.S_IMODE(card.stat().st_mode) == 0o640 and card.read_text().endswith("provenance\n")
        os.umask(0o077)
        write_text(tmp_path / "private.json", "{}")
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_factory_folders_are_not_left_private(tmp_path):
    """Built through a 0700 temporary directory, a model folder gets a new directory's mode (shared caches)."""
    import os
    import stat

    from hf_provenance.factory.build import build_random

    old = os.umask(0o022)
    try:
        out = build_random("llama", tmp_path / "m", hidden=64, layers=1, intermediate=128, vocab=256)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044 for f in out.iterdir())
