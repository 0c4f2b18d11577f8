"""Build factory checkpoints: cached by recipe hash, written atomically, lineage recorded in ``factory.json``.

``build(family, variant)`` returns a folder in Hugging Face layout (``config.json``, ``model.safetensors`` or
shards with an index, tokenizer files, ``README.md`` card, ``factory.json``). Variants:

- ``base``: pre-trained from ``init_seed = seed`` on ``data_seed = seed`` (domain 0).
- ``independent``: the same recipe and config, pre-trained from ``seed + seed_offset`` for both the init and the
  data, so it shares nothing with ``base`` but the recipe and the language its data come from.
- ``finetune``: ``base`` trained ``steps`` more AdamW steps at ``lr`` on shifted data (``domain`` 1).
- every row of :data:`hf_provenance.factory.transforms.TRANSFORMS` (``copy``, ``bf16``, ``fp16``, ``noise``,
  ``pruned``, ``vocab_extended``...), applied to ``base``.

The cache key is the sha256 of the full recipe: family config, sizes, seeds, training settings, variant params,
the base's key for derived variants, :data:`FACTORY_VERSION`, and the torch/transformers versions (init and
training bytes depend on them). The folder is built under a temporary name next to its final one and renamed in
one step, so a concurrent or aborted build never leaves a half-written folder under the final name.

``build_random`` writes a large random-init checkpoint shard by shard without instantiating the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from hf_provenance.atomic import publish_dir
from hf_provenance.factory import recipes
from hf_provenance.factory import tokenizer as tokenizers_
from hf_provenance.factory import transforms as transforms_
from hf_provenance.factory.recipes import FACTORY_VERSION

CACHE_ENV = "HF_PROVENANCE_FACTORY_CACHE"
DEFAULT_CACHE = Path("~/.cache/hf-provenance/factory")
DEFAULT_VARIANTS = ("base", "finetune", "independent", "pruned", "vocab_extended", "copy", "bf16", "noise")
BASE_KNOBS = ("train_steps",)  # parameters of the pre-training run that every variant inherits from its base
# Variants that train; transforms come from transforms.TRANSFORMS. `truth` is what a comparison with `base`
# should find (DESIGN vocabulary).
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"kind": "pretrain", "defaults": {}, "truth": None},
    "independent": {"kind": "pretrain", "defaults": {"seed_offset": 10_000},
                    "truth": {"verdict": "independent", "relation": [], "direction_evident": False}},
    "finetune": {"kind": "finetune", "defaults": {"steps": 30, "lr": 3e-4, "domain": 1, "data_offset": 20_000},
                 "truth": {"verdict": "derived", "relation": ["finetune"], "direction_evident": False},
                 "hub_relation": "finetune"},
}
_STATS = {"built": 0, "hits": 0}


def build(family: str, variant: str = "base", *, seed: int = 0, cache_dir: str | Path | None = None,
          **params: Any) -> Path:
    """Build (or fetch from the cache) one factory checkpoint and return its folder.

    Args:
        family: a key of :data:`hf_provenance.factory.recipes.FAMILIES` (``llama``, ``qwen3_moe``,
            ``deepseek_v3``, ``bert``).
        variant: ``base``, ``independent``, ``finetune`` or a transform name (see the module docstring).
        seed: the model's seed; derived variants start from ``build(family, "base", seed=seed)``.
        cache_dir: where folders live; default ``$HF_PROVENANCE_FACTORY_CACHE`` or
            ``~/.cache/hf-provenance/factory``.
        **params: size knobs of the family (``hidden``, ``layers``, ``intermediate``, ``vocab``, ``heads``...),
            ``train_steps`` (pre-training steps), and the variant's own parameters (``steps``, ``lr`` for
            ``finetune``; ``drop`` for ``pruned``; ``scale`` for ``noise``...). Unknown names raise ``ValueError``.

    Returns:
        The folder (``<cache>/<family>-<variant>-<hash16>``).

    Example:
        >>> folder = build("llama", "finetune", steps=200, cache_dir=tmp)  # doctest: +SKIP
    """
    rec = recipe(family, variant, seed=seed, **params)
    root = cache_root(cache_dir)
    final = root / f"{family}-{variant}-{rec['key'][:16]}"
    if (final / transforms_.META_NAME).is_file():
        _STATS["hits"] += 1
        return final
    base_dir = None
    if rec["base"] is not None:
        base_params = {k: v for k, v in params.items() if k in rec["sizes"] or k in BASE_KNOBS}
        base_dir = build(family, "base", seed=seed, cache_dir=root, **base_params)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        start = time.perf_counter()
        meta = _BUILDERS[rec["kind"]](rec, tmp, base_dir)
        meta.update({"name": rec["name"], "family": family, "variant": variant, "seed": seed,
                     "recipe": rec["recipe"], "recipe_sha256": rec["key"],
                     "tokenizer_style": rec["recipe"]["tokenizer"],
                     "build_seconds": round(time.perf_counter() - start, 3)})
        transforms_._write_meta(tmp, meta)
        publish_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / transforms_.META_NAME).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same recipe first
            _STATS["hits"] += 1
            return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _STATS["built"] += 1
    return final


def build_family(family: str, variants: tuple[str, ...] | list[str] = DEFAULT_VARIANTS, *, seed: int = 0,
                 cache_dir: str | Path | None = None, variant_params: dict[str, dict[str, Any]] | None = None,
                 **params: Any) -> dict[str, Path]:
    """Build several variants of one family: ``{variant: folder}``.

    ``params`` (size knobs, ``train_steps``) apply to every variant; ``variant_params[v]`` only to variant ``v``.

    Example:
        >>> paths = build_family("llama", ["base", "finetune", "independent"], cache_dir=tmp)  # doctest: +SKIP
    """
    variant_params = variant_params or {}
    return {v: build(family, v, seed=seed, cache_dir=cache_dir, **params, **variant_params.get(v, {}))
            for v in variants}


def build_stats() -> dict[str, int]:
    """How many folders this process built and how many it found in the cache (for tests)."""
    return dict(_STATS)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$HF_PROVENANCE_FACTORY_CACHE``, else ``~/.cache/...``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(cache_dir).expanduser()


def variants() -> list[str]:
    """Every variant name ``build`` accepts."""
    return list(VARIANTS) + [t for t in transforms_.TRANSFORMS if t not in VARIANTS]


def recipe(family: str, variant: str = "base", *, seed: int = 0, **params: Any) -> dict[str, Any]:
    """The full resolved recipe of a build, its sha256 ``key``, its ``name`` and the ``base`` recipe's key.

    Raises ``ValueError`` naming any unknown family, variant or parameter and the allowed values.
    """
    spec = recipes.family(family)
    if variant in VARIANTS:
        vspec = VARIANTS[variant]
        kind, defaults = vspec["kind"], vspec["defaults"]
    elif variant in transforms_.TRANSFORMS:
        kind, defaults = "transform", transforms_.TRANSFORMS[variant].defaults
    else:
        raise ValueError(f"variant {variant!r} is not one of {variants()}")
    knobs = {k: v for k, v in params.items() if k in spec["sizes"]}
    base_knobs = {k: params[k] for k in BASE_KNOBS if k in params}
    own = {k: v for k, v in params.items() if k not in knobs and k not in base_knobs}
    unknown = sorted(set(own) - set(defaults))
    if unknown:
        allowed = sorted(set(spec["sizes"]) | set(BASE_KNOBS) | set(defaults))
        raise ValueError(f"build({family!r}, {variant!r}): unknown parameter(s) {unknown}; allowed: {allowed}")
    sizes = recipes.resolve_sizes(family, knobs)
    vparams = {**defaults, **own}
    train = dict(spec["train"])
    if "train_steps" in base_knobs:
        train["steps"] = int(base_knobs["train_steps"])
    common = {
        "factory_version": FACTORY_VERSION,
        "versions": {"torch": _minor(torch.__version__), "transformers": _minor(_transformers_version())},
        "family": family, "architecture": spec["architecture"], "model_type": spec["model_type"],
        "objective": spec["objective"], "tokenizer": spec["tokenizer"], "sizes": sizes,
        "config": recipes.config_fields(family, sizes), "train": train,
    }
    base = None
    if kind == "pretrain":
        offset = int(vparams.get("seed_offset", 0))
        rec = {**common, "variant": variant, "seed": seed, "init_seed": seed + offset, "data_seed": seed + offset,
               "params": vparams}
    else:
        base = recipe(family, "base", seed=seed, **knobs, **base_knobs)
        rec = {"variant": variant, "seed": seed, "params": vparams, "base": base["key"], **common}
    key = _sha256(rec)
    is_default = sizes == recipes.resolve_sizes(family) and train == spec["train"] and vparams == defaults
    name = f"factory/{family}-{variant}" + (f"-s{seed}" if seed else "") + ("" if is_default else f"-{key[:8]}")
    return {"recipe": rec, "key": key, "name": name, "kind": kind, "sizes": sizes,
            "base": None if base is None else {"key": base["key"], "name": base["name"]}}


# ---- the three builders -------------------------------------------------------------------------------------

def _pretrain(rec: dict[str, Any], out: Path, base_dir: Path | None) -> dict[str, Any]:
    r = rec["recipe"]
    model_cls, config = _model_class(r), _config(r)
    from hf_provenance.factory.train import deterministic, train

    with deterministic(1), torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(r["init_seed"])  # init, then dropout during training
        model = model_cls(config)
        log = train(model, _stream(r, domain=0, data_seed=r["data_seed"]), objective=r["objective"],
                    mlm=_mlm(r), **r["train"])
    _save(model, out)
    del model
    style = r["tokenizer"]
    tokenizers_.write(out, style, tokenizers_.vocabulary(style, r["sizes"]["vocab"]),
                      model_max_length=r["config"]["max_position_embeddings"])
    truth = VARIANTS[r["variant"]]["truth"]
    against = recipe(r["family"], "base", seed=r["seed"], **_size_overrides(r))["name"] if truth else None
    transforms_.write_card(out, name=rec["name"], base_name=None, hub_relation=None,
                           summary=f"Pre-trained {r['train']['steps']} AdamW steps from init seed {r['init_seed']} "
                                   f"on synthetic data seed {r['data_seed']}."
                                   + (f" Independent of `{against}`." if against else ""))
    return {"train": log.to_dict(), "base": None,
            "truth": None if truth is None else {**truth, "against": against}}


def _finetune(rec: dict[str, Any], out: Path, base_dir: Path) -> dict[str, Any]:
    r, p = rec["recipe"], rec["recipe"]["params"]
    from hf_provenance.factory.train import deterministic, train

    with deterministic(1), _quiet_progress(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"] + int(p["data_offset"]))  # dropout (BERT) during fine-tuning
        model = _model_class(r).from_pretrained(base_dir, dtype=torch.float32)
        settings = {**r["train"], "steps": int(p["steps"]), "lr": float(p["lr"]), "warmup": min(5, int(p["steps"]))}
        log = train(model, _stream(r, domain=int(p["domain"]), data_seed=r["seed"] + int(p["data_offset"])),
                    objective=r["objective"], mlm=_mlm(r), **settings)
    _save(model, out)
    del model
    for item in base_dir.iterdir():
        if item.name.startswith("tokenizer") or item.name in ("vocab.txt", "special_tokens_map.json"):
            shutil.copy2(item, out / item.name)
    base_name, relation = rec["base"]["name"], VARIANTS["finetune"]["hub_relation"]
    transforms_.write_card(out, name=rec["name"], base_name=base_name, hub_relation=relation,
                           summary=f"`{base_name}` fine-tuned {p['steps']} AdamW steps at lr {p['lr']} on shifted "
                                   f"synthetic data (domain {p['domain']}).")
    return {"train": log.to_dict(), "base": {"name": base_name, "dir": str(base_dir.resolve())},
            "truth": dict(VARIANTS["finetune"]["truth"])}


def _transform(rec: dict[str, Any], out: Path, base_dir: Path) -> dict[str, Any]:
    r = rec["recipe"]
    transforms_.apply_transform(base_dir, out, r["variant"], seed=r["seed"], base_name=rec["base"]["name"],
                                **r["params"])
    meta = json.loads((out / transforms_.META_NAME).read_text(encoding="utf-8"))
    transforms_.write_card(out, name=rec["name"], base_name=rec["base"]["name"],
                           hub_relation=transforms_.TRANSFORMS[r["variant"]].hub_relation,
                           summary=f"`{r['variant']}` transform of `{rec['base']['name']}`: "
                                   f"{transforms_.TRANSFORMS[r['variant']].doc}")
    return meta


_BUILDERS = {"pretrain": _pretrain, "finetune": _finetune, "transform": _transform}


# ---- random checkpoints for benchmarks ------------------------------------------------------------------------

def build_random(family: str, out_dir: str | Path, *, hidden: int, layers: int, intermediate: int, vocab: int,
                 dtype: str = "bfloat16", seed: int = 0, max_shard_bytes: int = 1 << 30, norm_std: float = 0.05,
                 tokenizer: bool = True, **sizes: int) -> Path:
    """Write a random-init checkpoint of ``family`` with the given sizes, one tensor at a time.

    Nothing is trained and the model is never instantiated: tensor names and shapes come from the family's
    tensor table (checked against ``save_pretrained`` by the tests), values are drawn per tensor from a generator
    seeded by ``(seed, family, name)``, and tensors go to shards of about ``max_shard_bytes`` (peak memory is about
    two shards: the shard's tensors plus safetensors' serialised copy while it is written; 1.0 GB for a 1.1B
    bfloat16 Llama with 512 MiB shards). Matrices are N(0, initializer_range); norm weights are
    ``1 + norm_std * N(0, 1)`` so that two seeds differ there too (``norm_std=0`` gives the exact init: ones);
    biases are zero.

    Args:
        family: a family of :data:`recipes.FAMILIES`.
        out_dir: the folder to create (must not exist, or be empty); written under a temporary name and renamed.
        hidden, layers, intermediate, vocab: the size knobs; ``**sizes`` sets the family's others (``heads``,
            ``kv_heads``, ``experts``, ``moe_intermediate``...).
        dtype: ``bfloat16``, ``float16`` or ``float32``.

    Returns:
        ``out_dir`` as a Path, holding ``config.json``, ``model-0000k-of-0000n.safetensors`` (or
        ``model.safetensors``) with ``model.safetensors.index.json``, tokenizer files, README and factory.json.
    """
    from transformers import AutoConfig

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: destination is not empty")
    spec = recipes.family(family)
    torch_dtype = transforms_._dtype(dtype)
    knobs = recipes.resolve_sizes(family, {"hidden": hidden, "layers": layers, "intermediate": intermediate,
                                           "vocab": vocab, **sizes})
    config = AutoConfig.for_model(spec["model_type"], **recipes.config_fields(family, knobs), dtype=dtype)
    config.architectures = [spec["architecture"]]
    fields = config.to_dict()
    table = recipes.tensor_shapes(family, fields)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        writer = transforms_._ShardWriter(tmp, max_shard_bytes)
        std = float(fields.get("initializer_range", 0.02))
        for name, (shape, init) in table.items():
            gen = torch.Generator().manual_seed(_seed64(seed, family, name))
            writer.add(name, _random_tensor(shape, init, torch_dtype, gen, std, norm_std))
        writer.close()
        config.to_json_file(str(tmp / "config.json"))
        if tokenizer:
            style = spec["tokenizer"]
            tokenizers_.write(tmp, style, tokenizers_.vocabulary(style, knobs["vocab"]),
                              model_max_length=fields.get("max_position_embeddings", 2048))
        params = recipes.parameter_count(family, fields)
        name = f"factory/{family}-random-{params / 1e9:.2f}B-s{seed}"
        transforms_.write_card(tmp, name=name, base_name=None, hub_relation=None,
                               summary=f"Random init ({params:,} parameters, {dtype}), seed {seed}; not trained.")
        transforms_._write_meta(tmp, {"name": name, "family": family, "variant": "random", "seed": seed,
                                      "factory_version": FACTORY_VERSION, "sizes": knobs, "dtype": dtype,
                                      "parameters": params, "tokenizer_style": spec["tokenizer"], "truth": None})
        if out.exists():
            out.rmdir()
        publish_dir(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _remove_stale_temporaries(root: Path, max_age_s: float = 3600.0) -> None:
    """Remove ``.tmp-*`` folders left by builds killed more than ``max_age_s`` ago (builds take seconds)."""
    now = time.time()
    for item in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - item.stat().st_mtime > max_age_s:
                shutil.rmtree(item, ignore_errors=True)


def _random_tensor(shape: tuple[int, ...], init: str, dtype: torch.dtype, gen: torch.Generator, std: float,
                   norm_std: float, chunk: int = 1 << 22) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    if init == "zero":
        return out.zero_()
    flat = out.view(-1)
    scale, shift = (std, 0.0) if init == "normal" else (norm_std, 1.0)
    for start in range(0, flat.numel(), chunk):
        end = min(start + chunk, flat.numel())
        flat[start:end] = torch.randn(end - start, generator=gen).mul_(scale).add_(shift)
    return out


# ---- helpers ------------------------------------------------------------------------------------------------

def _model_class(r: dict[str, Any]):
    import transformers

    return getattr(transformers, r["architecture"])


def _config(r: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.for_model(r["model_type"], **r["config"])


def _stream(r: dict[str, Any], *, domain: int, data_seed: int):
    from hf_provenance.factory.data import Language, TokenStream

    style = r["tokenizer"]
    lang = Language(r["sizes"]["vocab"], len(tokenizers_.special_tokens(style)), domain)
    if r["objective"] == "masked_lm":
        wrap = (tokenizers_.special_id(style, "cls_token"), tokenizers_.special_id(style, "sep_token"))
        return TokenStream(lang, data_seed, wrap=wrap)
    return TokenStream(lang, data_seed, bos_id=tokenizers_.special_id(style, "bos_token"))


def _mlm(r: dict[str, Any]) -> dict[str, int] | None:
    if r["objective"] != "masked_lm":
        return None
    style = r["tokenizer"]
    return {"mask_id": tokenizers_.special_id(style, "mask_token"),
            "n_special": len(tokenizers_.special_tokens(style)), "vocab_size": r["sizes"]["vocab"]}


def _save(model, out: Path) -> None:
    """``save_pretrained`` (safetensors is the only format in transformers 5), without its progress bar."""
    with _quiet_progress():
        model.save_pretrained(out)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _size_overrides(r: dict[str, Any]) -> dict[str, Any]:
    defaults = recipes.resolve_sizes(r["family"])
    out = {k: v for k, v in r["sizes"].items() if defaults.get(k) != v}
    if r["train"]["steps"] != recipes.FAMILIES[r["family"]]["train"]["steps"]:
        out["train_steps"] = r["train"]["steps"]
    return out


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _seed64(*parts: Any) -> int:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")
