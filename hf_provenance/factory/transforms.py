"""State-dict transforms as a table: each entry turns a saved checkpoint into a derived one whose lineage is known.

A :class:`Transform` is data plus small functions:

- ``prepare(ctx) -> plan``: decide once what to do (which layers to drop, which tokens to add); the plan is
  recorded in ``factory.json`` so tests can read the ground truth.
- ``tensor(key, tensor, ctx) -> [(key, tensor), ...]``: map one saved tensor to zero or more output tensors.
  It sees one tensor at a time, so :func:`apply_transform` streams shard by shard and never holds the model.
- ``config(config, ctx) -> config``: edit ``config.json``; ``files(folder, ctx)``: edit side files (tokenizer).
- ``truth``: the verdict and relations (DESIGN vocabulary) that a correct comparison must find, and
  ``hub_relation``: what the card's ``base_model_relation`` says.

Later issues add permutations, merges and the like as new rows of :data:`TRANSFORMS`; ``build(family, name)``
accepts every row's name as a variant.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hf_provenance.factory import recipes
from hf_provenance.factory import tokenizer as tokenizers_

DEFAULT_MAX_SHARD_BYTES = 2 << 30
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
META_NAME = "factory.json"
# Names of the layer stack in the checkpoints the factory writes (and common others), as `(prefix)(index)(rest)`.
LAYER_PATTERNS = (
    re.compile(r"^(model\.layers\.)(\d+)(\..+)$"),  # Llama, Qwen, DeepSeek, Mistral ...
    re.compile(r"^(bert\.encoder\.layer\.)(\d+)(\..+)$"),  # BERT
    re.compile(r"^(model\.language_model\.layers\.)(\d+)(\..+)$"),  # multimodal wrappers
    re.compile(r"^(transformer\.h\.)(\d+)(\..+)$"),  # GPT-2
)
# Tensors whose rows are token ids, from every family recipe plus the tied BERT decoder when a file has it.
VOCAB_TENSORS = frozenset(
    [name for spec in recipes.FAMILIES.values() for name in spec["vocab_tensors"]]
    + ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"]
)
# config.json fields that follow the layer stack when layers are dropped: how each one changes.
LAYER_CONFIG_FIELDS = {
    "num_hidden_layers": "count",
    "first_k_dense_replace": "leading_count",  # DeepSeek: the first k layers are dense
    "mlp_only_layers": "index_list",  # Qwen-MoE: layers with a dense MLP
    "layer_types": "per_layer",  # per-layer attention kinds
}
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Context:
    """What a transform's functions see: its name, resolved params, seed, the source config and its plan."""

    name: str
    params: dict[str, Any]
    seed: int
    config: dict[str, Any]
    source: dict[str, Any]  # the source folder's factory.json ({} for a folder the factory did not make)
    plan: dict[str, Any] = field(default_factory=dict)

    def generator(self, key: str) -> torch.Generator:
        """A generator seeded by (seed, transform, key): the same draws whatever the shard or tensor order."""
        digest = hashlib.sha256(f"{self.seed}\0{self.name}\0{key}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class Transform:
    """One row of :data:`TRANSFORMS`."""

    name: str
    doc: str
    defaults: dict[str, Any]
    truth: dict[str, Any]
    hub_relation: str
    tensor: Callable[[str, torch.Tensor, Context], list[tuple[str, torch.Tensor]]]
    prepare: Callable[[Context], dict[str, Any]] = lambda ctx: {}
    config: Callable[[dict[str, Any], Context], dict[str, Any]] = lambda config, ctx: config
    files: Callable[[Path, Context], None] = lambda folder, ctx: None
    shards: Callable[[Context], int | None] = lambda ctx: None  # how many output shards, None: by size


# ---- the transforms -------------------------------------------------------------------------------------------

def _identity(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    return [(key, t)]


def _cast(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    return [(key, t.to(_dtype(ctx.params["dtype"])) if t.is_floating_point() else t)]


def _cast_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    config["dtype"] = ctx.params["dtype"]
    if "torch_dtype" in config:  # transformers 4 name
        config["torch_dtype"] = ctx.params["dtype"]
    return config


def _noise(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    if not t.is_floating_point() or t.numel() < 2:
        return [(key, t)]
    x = t.float()
    noise = torch.randn(x.shape, generator=ctx.generator(key)) * (ctx.params["scale"] * float(x.std()))
    return [(key, (x + noise).to(t.dtype))]


def _prune_prepare(ctx: Context) -> dict[str, Any]:
    n = int(ctx.config["num_hidden_layers"])
    drop = ctx.params["drop"]
    if drop is None:
        drop = [n // 2]
    elif isinstance(drop, int):
        drop = [drop]
    dropped = sorted({d % n if -n <= d < n else _bad_layer(d, n) for d in drop})
    if len(dropped) >= n:
        raise ValueError(f"drop={ctx.params['drop']!r} would remove all {n} layers")
    kept = [i for i in range(n) if i not in dropped]
    return {"dropped_layers": dropped, "kept_layers": kept, "layer_map": {str(new): old for new, old in
                                                                         enumerate(kept)}}


def _bad_layer(d: int, n: int) -> int:
    raise ValueError(f"drop: layer {d} is out of range for {n} layers (use 0..{n - 1} or -{n}..-1)")


def _prune(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    match = _layer_match(key)
    if match is None:
        return [(key, t)]
    old = int(match.group(2))
    if old in ctx.plan["dropped_layers"]:
        return []
    new = ctx.plan["kept_layers"].index(old)
    return [(f"{match.group(1)}{new}{match.group(3)}", t)]


def _prune_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    kept = ctx.plan["kept_layers"]
    for name, how in LAYER_CONFIG_FIELDS.items():
        if name not in config or config[name] is None:
            continue
        value = config[name]
        if how == "count":
            config[name] = len(kept)
        elif how == "leading_count":
            config[name] = sum(1 for old in kept if old < value)
        elif how == "index_list":
            config[name] = [kept.index(old) for old in value if old in kept]
        elif how == "per_layer" and isinstance(value, list) and len(value) == len(kept) + len(
                ctx.plan["dropped_layers"]):
            config[name] = [value[old] for old in kept]
    return config


def _extend_prepare(ctx: Context) -> dict[str, Any]:
    old = int(ctx.config["vocab_size"])
    n_new = int(ctx.params["n_new"])
    if n_new < 1:
        raise ValueError(f"n_new={n_new} must be at least 1")
    style = ctx.source.get("tokenizer_style")
    if style:
        new_tokens = tokenizers_.vocabulary(style, old + n_new, start=old)
    else:
        new_tokens = [f"<extra_token_{i}>" for i in range(n_new)]
    return {"old_vocab_size": old, "new_vocab_size": old + n_new, "new_tokens": new_tokens}


def _extend(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    if key not in VOCAB_TENSORS:
        return [(key, t)]
    old, new = ctx.plan["old_vocab_size"], ctx.plan["new_vocab_size"]
    if t.shape[0] != old:
        raise ValueError(f"{key}: {t.shape[0]} rows, expected vocab_size={old} from config.json")
    x = t.float()
    mean = x.mean(dim=0, keepdim=True)
    noise = torch.randn((new - old, *t.shape[1:]), generator=ctx.generator(key))
    rows = mean + noise * (ctx.params["noise"] * float(x.std()))
    return [(key, torch.cat([t, rows.to(t.dtype)], dim=0))]  # the old rows keep their exact bytes


def _extend_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    config["vocab_size"] = ctx.plan["new_vocab_size"]
    return config


def _extend_files(folder: Path, ctx: Context) -> None:
    if (folder / "tokenizer.json").exists():
        tokenizers_.extend(folder, ctx.plan["new_tokens"])


TRANSFORMS: dict[str, Transform] = {t.name: t for t in [
    Transform("copy", "Bit-identical tensors, resharded into `shards` files with an index.",
              {"shards": 2}, {"verdict": "identical", "relation": ["copy"], "direction_evident": False},
              "finetune", _identity, shards=lambda ctx: int(ctx.params["shards"])),
    Transform("bf16", "Every floating tensor cast to `dtype` (round to nearest even); config dtype updated.",
              {"dtype": "bfloat16"}, {"verdict": "derived", "relation": ["cast"], "direction_evident": False},
              "quantized", _cast, config=_cast_config),
    Transform("fp16", "Every floating tensor cast to float16; config dtype updated.",
              {"dtype": "float16"}, {"verdict": "derived", "relation": ["cast"], "direction_evident": False},
              "quantized", _cast, config=_cast_config),
    Transform("noise", "Gaussian noise of `scale` x the tensor's own std added to every floating tensor.",
              {"scale": 0.01}, {"verdict": "derived", "relation": ["finetune"], "direction_evident": False},
              "finetune", _noise),
    Transform("pruned", "Layers in `drop` removed (default: the middle one), the rest renumbered; config follows.",
              {"drop": None}, {"verdict": "derived", "relation": ["pruned"], "direction_evident": True},
              "finetune", _prune, prepare=_prune_prepare, config=_prune_config),
    Transform("vocab_extended", "`n_new` tokens appended: new embedding/head rows = mean row + `noise` x std "
              "Gaussian noise, old rows bit-identical; tokenizer and config vocab_size follow.",
              {"n_new": 32, "noise": 0.1},
              {"verdict": "derived", "relation": ["vocab-extended"], "direction_evident": True},
              "finetune", _extend, prepare=_extend_prepare, config=_extend_config, files=_extend_files),
]}


# ---- applying a transform ---------------------------------------------------------------------------------

def resolve_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The transform's defaults overridden by ``params``; unknown names raise ``ValueError``."""
    spec = transform(name)
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise ValueError(f"transform {name!r} takes no parameter(s) {unknown}; allowed: {sorted(spec.defaults)}")
    return {**spec.defaults, **params}


def transform(name: str) -> Transform:
    """The row of :data:`TRANSFORMS` called ``name``."""
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"transform {name!r} is not one of {sorted(TRANSFORMS)}") from None


def apply_transform(src_dir: str | Path, dst_dir: str | Path, name: str, *, seed: int = 0,
                    base_name: str | None = None, **params: Any) -> Path:
    """Write ``transform(name)`` of the checkpoint in ``src_dir`` into ``dst_dir`` (new or empty).

    Tensors stream one source shard at a time. Side files (config, tokenizer, generation config) are copied and
    edited by the transform; a model card naming ``base_name`` (default: the source's factory name, else its
    folder name) and ``factory.json`` with the plan and the expected verdict are written.

    Args:
        src_dir: a folder with ``config.json`` and ``model.safetensors`` or a sharded index.
        dst_dir: where to write; created if missing, must be empty.
        name: a key of :data:`TRANSFORMS`.
        seed: seeds every random draw (per tensor, so independent of shard order).
        **params: the transform's parameters (see its ``defaults``).

    Returns:
        ``dst_dir`` as a Path.

    Example:
        >>> apply_transform(base, tmp / "noisy", "noise", scale=0.05)  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    src, dst = Path(src_dir), Path(dst_dir)
    spec = transform(name)
    params = resolve_params(name, params)
    dst.mkdir(parents=True, exist_ok=True)
    if any(dst.iterdir()):
        raise FileExistsError(f"{dst}: destination is not empty")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    source = _read_meta(src)
    ctx = Context(name, params, seed, dict(config), source)
    ctx.plan = spec.prepare(ctx)
    shards = shard_files(src)
    headers = [_header(f) for f in shards]
    total = sum(h[2] for header in headers for h in header.values())
    n_out = spec.shards(ctx)
    writer = _ShardWriter(dst, math.ceil(total / n_out) if n_out else DEFAULT_MAX_SHARD_BYTES)
    seen: set[str] = set()
    for file in shards:
        for key, tensor in load_file(str(file)).items():
            for out_key, out in spec.tensor(key, tensor, ctx):
                if out_key in seen:
                    raise ValueError(f"{src}: transform {name!r} wrote tensor {out_key!r} twice")
                seen.add(out_key)
                writer.add(out_key, out)
    writer.close()
    for item in src.iterdir():
        if item.is_file() and item.name not in (INDEX_NAME, "README.md", META_NAME) and item.suffix != ".safetensors":
            shutil.copy2(item, dst / item.name)
    config = spec.config(json.loads(json.dumps(config)), ctx)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    spec.files(dst, ctx)
    base = base_name or source.get("name") or src.name
    meta = {
        "name": f"{base}-{name}",
        "factory_version": recipes.FACTORY_VERSION,
        "tokenizer_style": source.get("tokenizer_style"),
        "transform": {"name": name, "params": params, "seed": seed, "plan": ctx.plan},
        "base": {"name": base, "dir": str(src.resolve())},
        "truth": dict(spec.truth),
    }
    _write_meta(dst, meta)
    write_card(dst, name=f"{base}-{name}", base_name=base, hub_relation=spec.hub_relation,
               summary=f"`{name}` transform of `{base}`: {spec.doc}")
    return dst


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when it has one."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / SINGLE_NAME).exists():
        return [folder / SINGLE_NAME]
    raise FileNotFoundError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}")


def write_card(folder: str | Path, *, name: str, base_name: str | None, hub_relation: str | None,
               summary: str) -> Path:
    """Write ``README.md`` with YAML front matter (``base_model``/``base_model_relation`` when derived)."""
    lines = ["---", "library_name: transformers", "tags:", "- hf-provenance-factory", "- synthetic"]
    if base_name:
        lines += [f"base_model: {base_name}", f"base_model_relation: {hub_relation}"]
    lines += ["---", "", f"# {name}", "", summary, "",
              "Built by `hf_provenance.factory`: a tiny synthetic checkpoint whose lineage is known by construction. "
              "`factory.json` records the recipe and the expected comparison result.", ""]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class _ShardWriter:
    """Collects tensors into shards of at most ~``max_bytes`` and names them like ``save_pretrained`` does."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max(1, int(max_bytes))
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_params = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.current[key] = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        self.current_bytes += size
        self.total_bytes += size
        self.total_params += tensor.numel()
        if self.current_bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        path = self.folder / f".shard-{len(self.written):05d}.tmp"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.written.append((path, sorted(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        if len(self.written) == 1:
            final = self.folder / SINGLE_NAME
            self.written[0][0].rename(final)
            return [final]
        n = len(self.written)
        weight_map, finals = {}, []
        for i, (path, keys) in enumerate(self.written):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({k: final.name for k in keys})
        index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return finals


def _header(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """``{name: (dtype, shape, nbytes)}`` from a safetensors header (the factory's own files only)."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


def _layer_match(key: str) -> re.Match | None:
    for pattern in LAYER_PATTERNS:
        match = pattern.match(key)
        if match:
            return match
    return None


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"dtype={name!r} is not one of {sorted(DTYPE_NAMES)}") from None


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
