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
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hf_provenance.atomic import new_file_mode
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
    re.compile(r"^(encoder\.layer\.)(\d+)(\..+)$"),  # BERT saved without its task head (sentence-transformers)
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
    scratch: dict[str, Any] = field(default_factory=dict)  # tensors a transform holds between calls (never written)
    folder: Path | None = None  # the source checkpoint (for transforms that need another tensor, e.g. fold_norms)

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


# ---- layer up-scaling (SOLAR-style depth up-scaling) ---------------------------------------------------------

def _upscale_prepare(ctx: Context) -> dict[str, Any]:
    """SOLAR 10.7B (Kim et al. 2023, arXiv:2312.15166): two copies of the n layers, the last m dropped from the
    first and the first m from the second: layers 0..n-m-1 then m..n-1 of the base, 2(n-m) in all."""
    n = int(ctx.config["num_hidden_layers"])
    m = ctx.params["m"]
    m = max(1, n // 4) if m is None else int(m)
    if not 1 <= m or not 2 * (n - m) > n:
        raise ValueError(f"m={m}: up-scaling {n} layers needs 1 <= m < {n}/2 (2(n-m) layers must exceed n)")
    source = list(range(0, n - m)) + list(range(m, n))
    return {"m": m, "source_layers": source, "layer_map": {str(new): old for new, old in enumerate(source)}}


def _upscale(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    match = _layer_match(key)
    if match is None:
        return [(key, t)]
    old = int(match.group(2))
    news = [new for new, src in enumerate(ctx.plan["source_layers"]) if src == old]
    # a layer used twice is written twice; safetensors refuses two names on one storage, hence the clone
    return [(f"{match.group(1)}{new}{match.group(3)}", t if i == 0 else t.clone()) for i, new in enumerate(news)]


def _upscale_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    source = ctx.plan["source_layers"]
    n_old = int(ctx.config["num_hidden_layers"])
    for name, how in LAYER_CONFIG_FIELDS.items():
        if name not in config or config[name] is None:
            continue
        value = config[name]
        if how == "count":
            config[name] = len(source)
        elif how == "leading_count":
            dense = [old < value for old in source]
            k = sum(dense)
            if dense != [True] * k + [False] * (len(dense) - k):
                raise ValueError(f"{name}={value}: up-scaled layers {source} put a dense layer after an MoE "
                                 "layer, which this config field cannot express")
            config[name] = k
        elif how == "index_list":
            config[name] = [new for new, old in enumerate(source) if old in value]
        elif how == "per_layer" and isinstance(value, list) and len(value) == n_old:
            config[name] = [value[old] for old in source]
    return config


# ---- vocabulary re-spelled in another tokenizer family, or pruned ---------------------------------------------

# A factory tokenizer style -> the token-normalisation family it writes, and the family other_tokenizer writes.
STYLE_KIND = {"metaspace": "metaspace", "bytelevel": "bytelevel", "bytelevel_deepseek": "bytelevel",
              "wordpiece": "wordpiece"}
OTHER_KIND = {"metaspace": "bytelevel", "bytelevel": "metaspace", "wordpiece": "bytelevel"}


def _style_of(ctx: Context) -> str:
    style = ctx.source.get("tokenizer_style")
    if style not in STYLE_KIND:
        raise ValueError(f"transform {ctx.name!r} needs a factory folder (tokenizer_style in factory.json), "
                         f"got tokenizer_style={style!r}")
    return style


def _ordinary_ids(ctx: Context) -> tuple[int, int]:
    """(number of special tokens leading the vocabulary, vocabulary size)."""
    return len(tokenizers_.special_tokens(_style_of(ctx))), int(ctx.config["vocab_size"])


def _other_prepare(ctx: Context) -> dict[str, Any]:
    k, v = _ordinary_ids(ctx)
    n_drop, n_add = int(ctx.params["n_drop"]), int(ctx.params["n_add"])
    if not 0 <= n_drop < v - k or n_add < 0:
        raise ValueError(f"n_drop={n_drop}, n_add={n_add}: need 0 <= n_drop < {v - k} ordinary tokens, n_add >= 0")
    src_kind = STYLE_KIND[_style_of(ctx)]
    target = ctx.params["target"] or OTHER_KIND[src_kind]
    if target not in ("bytelevel", "metaspace") or target == src_kind:
        raise ValueError(f"target={target!r}: must be 'bytelevel' or 'metaspace' and differ from the source's "
                         f"{src_kind!r}")
    g = ctx.generator("vocabulary")
    ordinary = torch.arange(k, v)
    kept = ordinary[torch.randperm(v - k, generator=g)[n_drop:]].tolist()
    slots = kept + [-1] * n_add                                   # -1: a new token
    order = [slots[i] for i in torch.randperm(len(slots), generator=g).tolist()]
    words = tokenizers_.words(n_add, start=v)                    # ranks beyond the vocabulary: unseen pieces
    from hf_provenance.alignment import tokens as tok_norm

    new_tokens = [tok_norm.spell(w.encode(), True, target) for w in words]
    return {"source_kind": src_kind, "target_kind": target, "n_special": k,
            "order": list(range(k)) + order,                      # new id -> old id, -1 for a new token
            "dropped": sorted(set(range(k, v)) - set(kept)), "new_tokens": new_tokens,
            "old_vocab_size": v, "new_vocab_size": k + len(order)}


def _prune_vocab_prepare(ctx: Context) -> dict[str, Any]:
    k, v = _ordinary_ids(ctx)
    n_drop = ctx.params["n_drop"]
    n_drop = (v - k) // 8 if n_drop is None else int(n_drop)
    if not 1 <= n_drop < v - k:
        raise ValueError(f"n_drop={n_drop}: need 1 <= n_drop < {v - k} ordinary tokens")
    g = ctx.generator("vocabulary")
    dropped = sorted((torch.randperm(v - k, generator=g)[:n_drop] + k).tolist())
    gone = set(dropped)
    order = [i for i in range(v) if i not in gone]
    return {"n_special": k, "order": order, "dropped": dropped, "old_vocab_size": v, "new_vocab_size": len(order)}


def _vocab_rows(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    """Rows of vocabulary tensors in the plan's new id order; new tokens get mean + noise rows."""
    if key not in VOCAB_TENSORS:
        return [(key, t)]
    old_v = ctx.plan["old_vocab_size"]
    if t.shape[0] != old_v:
        raise ValueError(f"{key}: {t.shape[0]} rows, expected vocab_size={old_v} from config.json")
    order = torch.tensor(ctx.plan["order"])
    new = order < 0
    out = t[order.clamp_min(0)].clone()
    if bool(new.any()):
        x = t.float()
        noise = torch.randn((int(new.sum()), *t.shape[1:]), generator=ctx.generator(key))
        out[new] = (x.mean(dim=0, keepdim=True) + noise * (ctx.params["noise"] * float(x.std()))).to(t.dtype)
    return [(key, out)]


def _vocab_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    config["vocab_size"] = ctx.plan["new_vocab_size"]
    return config


def _tokenizer_parts(kind: str) -> dict[str, Any]:
    """tokenizer.json components (pre_tokenizer, decoder) a tokenizers WordLevel model of ``kind`` writes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"x": 0}, unk_token="x"))
    if kind == "bytelevel":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    doc = json.loads(tok.to_str())
    return {"pre_tokenizer": doc["pre_tokenizer"], "decoder": doc["decoder"]}


def _rewrite_vocab_files(folder: Path, ctx: Context, respell) -> tuple[dict[str, Any], list[str]]:
    """tokenizer.json (and vocab.txt) in the plan's new id order, each kept token passed through ``respell``."""
    path = folder / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    old = {i: t for t, i in doc["model"]["vocab"].items()}
    k, new_tokens = ctx.plan["n_special"], iter(ctx.plan.get("new_tokens", []))
    tokens = [next(new_tokens) if i < 0 else old[i] if i < k else respell(old[i]) for i in ctx.plan["order"]]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{path}: re-spelled vocabulary has duplicate strings")
    doc["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    for added in doc.get("added_tokens") or []:  # specials lead the vocabulary and keep their ids
        if added["id"] >= k:
            raise ValueError(f"{path}: added token {added['content']!r} at id {added['id']} is not a leading special")
    return doc, tokens


def _other_files(folder: Path, ctx: Context) -> None:
    from hf_provenance.alignment import tokens as tok_norm

    src, target = ctx.plan["source_kind"], ctx.plan["target_kind"]
    doc, tokens = _rewrite_vocab_files(folder, ctx, lambda t: tok_norm.spell(*tok_norm.normalise(t, src), target))
    unk = doc["model"].get("unk_token")
    doc["model"] = {"type": "WordLevel", "vocab": doc["model"]["vocab"], "unk_token": unk}
    doc["normalizer"] = None
    doc.update(_tokenizer_parts(target))
    (folder / "tokenizer.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "vocab.txt").unlink(missing_ok=True)  # WordPiece's file no longer describes the vocabulary
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg.pop("do_lower_case", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _prune_vocab_files(folder: Path, ctx: Context) -> None:
    doc, tokens = _rewrite_vocab_files(folder, ctx, lambda t: t)
    (folder / "tokenizer.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    txt = folder / "vocab.txt"
    if txt.exists():
        txt.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


# ---- hidden-axis transforms: units, heads, experts (function-preserving) --------------------------------------

# MLP tensors with a hidden-unit axis, as (pattern, kind, role). kind names the unit group (one per layer, expert or
# shared expert); role: gate/up have one row (bias element) per unit, down one column per unit.
UNIT_TENSORS: tuple[tuple[re.Pattern, str, str], ...] = tuple((re.compile(p), kind, role) for p, kind, role in (
    # Llama, Qwen, Mistral, DeepSeek dense layers
    (r"^model\.layers\.(?P<layer>\d+)\.mlp\.gate_proj\.(?:weight|bias)$", "mlp", "gate"),
    (r"^model\.layers\.(?P<layer>\d+)\.mlp\.up_proj\.(?:weight|bias)$", "mlp", "up"),
    (r"^model\.layers\.(?P<layer>\d+)\.mlp\.down_proj\.weight$", "mlp", "down"),
    # routed experts, per-expert names (Qwen-MoE, DeepSeek)
    (r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.gate_proj\.weight$", "expert", "gate"),
    (r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.up_proj\.weight$", "expert", "up"),
    (r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.down_proj\.weight$", "expert", "down"),
    # Mixtral: w1 = gate, w3 = up, w2 = down
    (r"^model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.w1\.weight$", "expert", "gate"),
    (r"^model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.w3\.weight$", "expert", "up"),
    (r"^model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.w2\.weight$", "expert", "down"),
    # DeepSeek shared experts (n_shared_experts concatenated along the unit axis)
    (r"^model\.layers\.(?P<layer>\d+)\.mlp\.shared_experts\.gate_proj\.weight$", "shared", "gate"),
    (r"^model\.layers\.(?P<layer>\d+)\.mlp\.shared_experts\.up_proj\.weight$", "shared", "up"),
    (r"^model\.layers\.(?P<layer>\d+)\.mlp\.shared_experts\.down_proj\.weight$", "shared", "down"),
    # BERT: intermediate (GELU, no gate) and output
    (r"^bert\.encoder\.layer\.(?P<layer>\d+)\.intermediate\.dense\.(?:weight|bias)$", "mlp", "up"),
    (r"^bert\.encoder\.layer\.(?P<layer>\d+)\.output\.dense\.weight$", "mlp", "down"),
))
# Attention tensors with a head axis, as (pattern, role). q/q_b/kv_b/o follow the query-head map, k/v the KV-group
# map (grouped-query attention: a query head moves only with its KV group).
HEAD_TENSORS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), role) for p, role in (
    (r"^model\.layers\.(?P<layer>\d+)\.self_attn\.q_proj\.(?:weight|bias)$", "q"),
    (r"^model\.layers\.(?P<layer>\d+)\.self_attn\.k_proj\.(?:weight|bias)$", "k"),
    (r"^model\.layers\.(?P<layer>\d+)\.self_attn\.v_proj\.(?:weight|bias)$", "v"),
    (r"^model\.layers\.(?P<layer>\d+)\.self_attn\.o_proj\.weight$", "o"),
    (r"^model\.layers\.(?P<layer>\d+)\.self_attn\.q_b_proj\.weight$", "q_b"),     # MLA
    (r"^model\.layers\.(?P<layer>\d+)\.self_attn\.kv_b_proj\.weight$", "kv_b"),   # MLA
    (r"^bert\.encoder\.layer\.(?P<layer>\d+)\.attention\.self\.query\.(?:weight|bias)$", "q"),
    (r"^bert\.encoder\.layer\.(?P<layer>\d+)\.attention\.self\.key\.(?:weight|bias)$", "k"),
    (r"^bert\.encoder\.layer\.(?P<layer>\d+)\.attention\.self\.value\.(?:weight|bias)$", "v"),
    (r"^bert\.encoder\.layer\.(?P<layer>\d+)\.attention\.output\.dense\.weight$", "o"),
))
# Routed experts: per-expert names (renamed), routers and router biases (one row/element per expert), stacked
# expert tensors ([E, ...]).
EXPERT_NAME = re.compile(r"^(?P<head>model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\.)"
                         r"(?P<expert>\d+)(?P<tail>\..+)$")
ROUTER_TENSORS = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.gate\."
                            r"(?:weight|e_score_correction_bias)$")
STACKED_EXPERTS = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\."
                             r"(?:gate_up_proj|down_proj)(?:_bias)?$")
# Families whose MLP is gated: up×c, down÷c preserves the function only where up enters linearly.
GATED_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe",
                               "deepseek_v2", "deepseek_v3"})


def _draw_perm(ctx: Context, name: str, n: int) -> torch.Tensor:
    """perm[new] = old for group ``name``: drawn once, recorded in the plan (``perms``) as ground truth."""
    perms = ctx.plan.setdefault("perms", {})
    if name not in perms:
        perms[name] = torch.randperm(n, generator=ctx.generator(name)).tolist()
    if len(perms[name]) != n:
        raise ValueError(f"{name}: tensors disagree on the group size ({len(perms[name])} vs {n})")
    return torch.tensor(perms[name])


def _head_layout(config: dict[str, Any]) -> dict[str, Any]:
    n_heads = int(config["num_attention_heads"])
    if config.get("kv_lora_rank"):  # MLA: every query head has its own k/v rows in kv_b
        nope, rope, v = (int(config[f]) for f in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        return {"heads": n_heads, "kv": n_heads, "block": {"q_b": nope + rope, "kv_b": nope + v, "o": v}}
    hd = int(config.get("head_dim") or int(config["hidden_size"]) // n_heads)
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    return {"heads": n_heads, "kv": n_kv, "block": {"q": hd, "k": hd, "v": hd, "o": hd}}


def _head_perms(ctx: Context, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query-head map, KV-group map), perm[new] = old: groups permuted, heads permuted within their group."""
    lay = _head_layout(ctx.config)
    n, g = lay["heads"], lay["kv"]
    name = f"layer{layer}.heads"
    perms = ctx.plan.setdefault("perms", {})
    if name not in perms:
        gen = ctx.generator(name)
        groups = torch.randperm(g, generator=gen)
        r = n // g
        heads = torch.cat([groups[j] * r + torch.randperm(r, generator=gen) for j in range(g)])
        perms[name] = heads.tolist()
        perms[f"layer{layer}.kv_groups"] = groups.tolist()
    return torch.tensor(perms[name]), torch.tensor(perms[f"layer{layer}.kv_groups"])


def _blocks(perm: torch.Tensor, block: int) -> torch.Tensor:
    return (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def _unit_group(match: re.Match, kind: str) -> str:
    expert = match.groupdict().get("expert")
    return f"layer{match.group('layer')}.{kind}" + (f".expert{expert}" if expert is not None else "")


def _with_noise(key: str, t: torch.Tensor, ctx: Context) -> torch.Tensor:
    scale = float(ctx.params.get("noise") or 0.0)
    if scale <= 0 or not t.is_floating_point() or t.numel() < 2:
        return t
    x = t.float()
    return (x + torch.randn(x.shape, generator=ctx.generator(key)) * (scale * float(x.std()))).to(t.dtype)


def _permute_units(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    out = t
    if ctx.params["units"]:
        for pattern, kind, role in UNIT_TENSORS:
            m = pattern.match(key)
            if m:
                dim = 1 if role == "down" else 0
                out = out.index_select(dim, _draw_perm(ctx, _unit_group(m, kind), t.shape[dim]))
                break
    if ctx.params["heads"]:
        for pattern, role in HEAD_TENSORS:
            m = pattern.match(key)
            if m:
                heads, groups = _head_perms(ctx, m.group("layer"))
                block = _head_layout(ctx.config)["block"][role]
                rows = _blocks(groups if role in ("k", "v") else heads, block)
                out = out.index_select(1 if role == "o" else 0, rows)
                break
    return [(key, _with_noise(key, out.contiguous(), ctx))]


def _rescale_prepare(ctx: Context) -> dict[str, Any]:
    mt = str(ctx.config.get("model_type", ""))
    if mt not in GATED_MODEL_TYPES:
        raise ValueError(f"rescale_units: model_type {mt!r} has no gated MLP (up×c, down÷c would change the "
                         f"function); gated families: {sorted(GATED_MODEL_TYPES)}")
    if not float(ctx.params["spread"]) > 0:
        raise ValueError(f"rescale_units: spread={ctx.params['spread']!r} must be > 0")
    return {}


def _rescale_units(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    out = t
    for pattern, kind, role in UNIT_TENSORS:
        m = pattern.match(key)
        if m and role in ("up", "down"):
            dim = 1 if role == "down" else 0
            name = _unit_group(m, kind) + ".scales"
            u = torch.rand(t.shape[dim], generator=ctx.generator(name), dtype=torch.float64)
            c = torch.exp((u * 2 - 1) * float(ctx.params["spread"])).float()
            x = t.float()
            if role == "down":
                x = x / c[None, :]
            else:
                x = x * (c[:, None] if x.ndim == 2 else c)
            out = x.to(t.dtype)
            break
    return [(key, _with_noise(key, out.contiguous(), ctx))]


def _n_experts(config: dict[str, Any]) -> int:
    for name in ("n_routed_experts", "num_experts", "num_local_experts"):
        if isinstance(config.get(name), int):
            return int(config[name])
    raise ValueError("shuffle_experts: config.json has no n_routed_experts / num_experts / num_local_experts")


def _expert_perm(ctx: Context, layer: str) -> torch.Tensor:
    """perm[new] = old within each routing group (DeepSeek's n_group: group-limited routing stays intact)."""
    name = f"layer{layer}.experts"
    perms = ctx.plan.setdefault("perms", {})
    if name not in perms:
        n = _n_experts(ctx.config)
        groups = int(ctx.config.get("n_group") or 1)
        size = n // groups
        gen = ctx.generator(name)
        perms[name] = torch.cat([g * size + torch.randperm(size, generator=gen) for g in range(groups)]).tolist()
    return torch.tensor(perms[name])


def _shuffle_experts(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    m = EXPERT_NAME.match(key)
    if m:
        perm = _expert_perm(ctx, m.group("layer"))
        new = int(torch.nonzero(perm == int(m.group("expert")))[0, 0])
        key = f"{m.group('head')}{new}{m.group('tail')}"
        return [(key, _with_noise(key, t, ctx))]
    m = ROUTER_TENSORS.match(key) or STACKED_EXPERTS.match(key)
    if m:
        t = t.index_select(0, _expert_perm(ctx, m.group("layer"))).contiguous()
    return [(key, _with_noise(key, t, ctx))]


def _shuffle_prepare(ctx: Context) -> dict[str, Any]:
    _n_experts(ctx.config)
    return {}


# transformers v5 stacked experts ([E, 2I, H] gate_up = [gate; up], [E, H, I] down; layouts.py): families whose
# per-expert checkpoints name experts mlp.experts.<e>.{gate,up,down}_proj and whose v5 module loads the stacked names
STACKABLE_MODEL_TYPES = frozenset({"qwen3_moe", "qwen2_moe", "deepseek_v3"})
PER_EXPERT = re.compile(r"^(?P<head>model\.layers\.(?P<layer>\d+)\.mlp\.experts\.)(?P<expert>\d+)\."
                        r"(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def _stack_prepare(ctx: Context) -> dict[str, Any]:
    mt = ctx.config.get("model_type")
    if mt not in STACKABLE_MODEL_TYPES:
        raise ValueError(f"stack_experts: model_type {mt!r} is not one of {sorted(STACKABLE_MODEL_TYPES)}")
    return {"experts": _n_experts(ctx.config), "gate_up": "[E, 2I, H] = [gate; up]", "down": "[E, H, I]"}


def _stack_experts(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    m = PER_EXPERT.match(key)
    if m is None:
        return [(key, t)]
    held = ctx.scratch.setdefault(m.group("head"), {})
    held[(int(m.group("expert")), m.group("proj"))] = t
    n = ctx.plan["experts"]
    if len(held) < 3 * n:
        return []
    del ctx.scratch[m.group("head")]
    gate_up = torch.stack([torch.cat([held[e, "gate_proj"], held[e, "up_proj"]]) for e in range(n)])
    down = torch.stack([held[e, "down_proj"] for e in range(n)])
    head = m.group("head")
    return [(head + "gate_up_proj", gate_up.contiguous()), (head + "down_proj", down.contiguous())]


def _stack_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    if ctx.scratch:   # runs after every tensor was seen: a layer missing expert tensors never goes unnoticed
        raise ValueError(f"stack_experts: incomplete experts in {sorted(ctx.scratch)}")
    return config


DENSE_MLP = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
MIXTRAL_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
LLAMA_ONLY_FIELDS = ("mlp_bias", "pretraining_tp", "attention_bias")  # Llama config fields Mixtral's lacks


def _upcycle_prepare(ctx: Context) -> dict[str, Any]:
    mt = ctx.config.get("model_type")
    if mt not in ("llama", "mistral"):
        raise ValueError(f"upcycle: source model_type {mt!r} is not a dense llama/mistral checkpoint")
    e, k = int(ctx.params["experts"]), int(ctx.params["top_k"])
    if not 1 <= k <= e:
        raise ValueError(f"upcycle: need 1 <= top_k <= experts, got top_k={k}, experts={e}")
    return {"experts": e, "top_k": k, "mode": "copy"}


def _upcycle(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    m = DENSE_MLP.match(key)
    if m is None:
        return [(key, t)]
    layer, proj = m.group("layer"), m.group("proj")
    prefix = f"model.layers.{layer}.block_sparse_moe."
    out = []
    for e in range(ctx.plan["experts"]):
        name = f"{prefix}experts.{e}.{MIXTRAL_PROJ[proj]}.weight"
        out.append((name, _with_noise(name, t.clone(), ctx)))
    if proj == "gate_proj":
        router = torch.randn((ctx.plan["experts"], t.shape[1]), generator=ctx.generator(f"{prefix}gate"))
        out.append((f"{prefix}gate.weight", (router * float(ctx.params["router_std"])).to(t.dtype)))
    return out


def _upcycle_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    for name in LLAMA_ONLY_FIELDS:
        config.pop(name, None)
    config.update({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                   "num_local_experts": ctx.plan["experts"], "num_experts_per_tok": ctx.plan["top_k"],
                   "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "output_router_logits": False,
                   "sliding_window": None})
    return config


def _upcycle_slices_prepare(ctx: Context) -> dict[str, Any]:
    """Which dense units each expert takes, per layer (the ground truth): slice e mod `slices` for expert e."""
    plan = _upcycle_prepare(Context(ctx.name, {"experts": ctx.params["n_experts"], "top_k": ctx.params["top_k"]},
                                    ctx.seed, ctx.config, ctx.source))
    e, n_inter = plan["experts"], int(ctx.config["intermediate_size"])
    s = int(ctx.params["slices"] or e)
    if s < 1 or e % s or n_inter % s:
        raise ValueError(f"upcycle_slices: slices={s} must divide n_experts={e} and intermediate_size={n_inter}")
    size = n_inter // s
    units = {}
    for layer in range(int(ctx.config["num_hidden_layers"])):
        order = (torch.randperm(n_inter, generator=ctx.generator(f"layer{layer}.units"))
                 if ctx.params["shuffle"] else torch.arange(n_inter))
        units[f"layer{layer}"] = [order[(x % s) * size:(x % s + 1) * size].tolist() for x in range(e)]
    return {**plan, "mode": "slices", "slices": s, "slice_units": size, "units": units}


def _upcycle_slices(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    m = DENSE_MLP.match(key)
    if m is None:
        return [(key, t)]
    layer, proj = m.group("layer"), m.group("proj")
    prefix = f"model.layers.{layer}.block_sparse_moe."
    out = []
    for e, units in enumerate(ctx.plan["units"][f"layer{layer}"]):
        idx = torch.tensor(units)
        part = t.index_select(1 if proj == "down_proj" else 0, idx).contiguous()
        name = f"{prefix}experts.{e}.{MIXTRAL_PROJ[proj]}.weight"
        out.append((name, _with_noise(name, part, ctx)))
    if proj == "gate_proj":
        router = torch.randn((ctx.plan["experts"], t.shape[1]), generator=ctx.generator(f"{prefix}gate"))
        out.append((f"{prefix}gate.weight", (router * float(ctx.params["router_std"])).to(t.dtype)))
    return out


def _upcycle_slices_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    config = _upcycle_config(config, ctx)
    config["intermediate_size"] = ctx.plan["slice_units"]
    return config


# Width pruning (Minitron, Sheared-LLaMA): dense decoders whose MLP and attention tensors carry the names of
# UNIT_TENSORS ("mlp" kind) and HEAD_TENSORS (q/k/v/o).
WIDTH_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _kept(ctx: Context, name: str, n: int, k: int) -> list[int]:
    """k of n indices drawn at random (model index i = base index kept[i]); in a random order when `shuffle`."""
    if k == n:
        return list(range(n))
    kept = torch.randperm(n, generator=ctx.generator(name))[:k]
    return (kept if ctx.params["shuffle"] else kept.sort().values).tolist()


def _order(ctx: Context, name: str, n: int) -> list[int]:
    """0..n-1, in a random order when `shuffle` (query heads of one KV group are interchangeable)."""
    return torch.randperm(n, generator=ctx.generator(name)).tolist() if ctx.params["shuffle"] else list(range(n))


def _width_prepare(ctx: Context) -> dict[str, Any]:
    """Per layer the kept MLP units, KV groups and query heads (whole groups: the heads-per-group ratio stays).

    The share of heads kept is named `groups` (not `heads`, a size knob of the factory's families)."""
    cfg = ctx.config
    mt = cfg.get("model_type")
    if mt not in WIDTH_MODEL_TYPES:
        raise ValueError(f"width_pruned: model_type {mt!r} is not a dense decoder of {sorted(WIDTH_MODEL_TYPES)}")
    fu, fh = float(ctx.params["units"]), float(ctx.params["groups"])
    if not (0 < fu <= 1 and 0 < fh <= 1):
        raise ValueError(f"width_pruned: units={fu} and groups={fh} must be fractions kept in (0, 1]")
    lay = _head_layout(cfg)
    n_inter, n_kv, r = int(cfg["intermediate_size"]), lay["kv"], lay["heads"] // lay["kv"]
    k_units, k_groups = max(1, round(fu * n_inter)), max(1, round(fh * n_kv))
    if k_units == n_inter and k_groups == n_kv:
        raise ValueError(f"width_pruned: units={fu}, groups={fh} keep every unit and KV group: nothing pruned")
    plan: dict[str, Any] = {"intermediate_size": [n_inter, k_units],     # [base, model]
                            "num_attention_heads": [lay["heads"], k_groups * r],
                            "num_key_value_heads": [n_kv, k_groups],
                            "head_dim": lay["block"]["o"], "heads_mode": "whole KV groups",
                            "units": {}, "kv_groups": {}, "heads": {}}
    for layer in range(int(cfg["num_hidden_layers"])):
        groups = _kept(ctx, f"layer{layer}.kv_groups", n_kv, k_groups)
        plan["units"][f"layer{layer}"] = _kept(ctx, f"layer{layer}.units", n_inter, k_units)
        plan["kv_groups"][f"layer{layer}"] = groups
        inner = [_order(ctx, f"layer{layer}.group{g}.heads", r) if k_groups < n_kv else range(r) for g in groups]
        plan["heads"][f"layer{layer}"] = [g * r + j for g, js in zip(groups, inner) for j in js]
    return plan


def _width_prune(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    out = t
    for pattern, kind, role in UNIT_TENSORS:
        m = pattern.match(key)
        if m and kind == "mlp":
            out = out.index_select(1 if role == "down" else 0, torch.tensor(ctx.plan["units"][f"layer{m['layer']}"]))
            break
    for pattern, role in HEAD_TENSORS:
        m = pattern.match(key)
        if m and role in ("q", "k", "v", "o"):
            kept = ctx.plan["kv_groups" if role in ("k", "v") else "heads"][f"layer{m['layer']}"]
            out = out.index_select(1 if role == "o" else 0, _blocks(torch.tensor(kept), ctx.plan["head_dim"]))
            break
    return [(key, _with_noise(key, out.contiguous(), ctx))]


def _width_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    config.update({name: ctx.plan[name][1] for name in ("intermediate_size", "num_attention_heads",
                                                         "num_key_value_heads")})
    config["head_dim"] = ctx.plan["head_dim"]   # hidden_size // heads no longer gives it
    return config


# ---- residual-width pruning (Minitron, Sheared-LLaMA) ------------------------------------------------------------

HIDDEN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe"})
# HF Llama / Qwen names: tensors whose columns read the residual stream, whose rows write it, and vectors over it
HIDDEN_READERS = re.compile(r"^(?:model\.embed_tokens|lm_head|model\.layers\.\d+\.(?:self_attn\.[qkv]_proj|"
                            r"mlp\.(?:gate_proj|up_proj|gate|shared_expert\.(?:gate_proj|up_proj)|shared_expert_gate|"
                            r"experts\.\d+\.(?:gate_proj|up_proj))))\.weight$")
HIDDEN_WRITERS = re.compile(r"^model\.layers\.\d+\.(?:self_attn\.o_proj|mlp\.(?:down_proj|shared_expert\.down_proj|"
                            r"experts\.\d+\.down_proj))\.weight$")
HIDDEN_VECTORS = re.compile(r"^model\.(?:norm|layers\.\d+\.(?:input_layernorm|post_attention_layernorm))\.weight$")


def _hidden_prepare(ctx: Context) -> dict[str, Any]:
    mt = ctx.config.get("model_type")
    if mt not in HIDDEN_MODEL_TYPES:
        raise ValueError(f"hidden_pruned: model_type {mt!r} is not one of {sorted(HIDDEN_MODEL_TYPES)}")
    h = int(ctx.config["hidden_size"])
    k = max(1, round(float(ctx.params["keep"]) * h))
    if not 0 < k < h:
        raise ValueError(f"hidden_pruned: keep={ctx.params['keep']} must keep some but not all of {h} dimensions")
    return {"hidden_size": [h, k], "head_dim": _head_layout(ctx.config)["block"]["o"],
            "kept": _kept(ctx, "hidden", h, k)}


def _hidden_prune(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    kept = torch.tensor(ctx.plan["kept"])
    if HIDDEN_READERS.match(key):
        t = t.index_select(1, kept)
    elif HIDDEN_WRITERS.match(key) or HIDDEN_VECTORS.match(key):
        t = t.index_select(0, kept)
    return [(key, _with_noise(key, t.contiguous(), ctx))]


def _hidden_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    config["hidden_size"] = ctx.plan["hidden_size"][1]
    config["head_dim"] = ctx.plan["head_dim"]   # hidden_size // heads no longer gives it
    return config


# ---- layout re-parametrisations: rotary row order, folded norms ------------------------------------------------

ROTARY_TENSORS = re.compile(r"^model\.layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>q_proj|k_proj)\.(?:weight|bias)$")
QK_NORMS = re.compile(r"^model\.layers\.(?P<layer>\d+)\.self_attn\.(?:q_norm|k_norm)\.weight$")  # Qwen3: per head dim


def _rotary_prepare(ctx: Context) -> dict[str, Any]:
    if ctx.config.get("kv_lora_rank"):
        raise ValueError("rotary_reorder: MLA checkpoints (kv_lora_rank) are not supported (rope rows are a slice)")
    lay = _head_layout(ctx.config)
    hd = lay["block"]["q"]
    frac = ctx.config.get("partial_rotary_factor") or (ctx.config.get("rope_parameters") or {}).get(
        "partial_rotary_factor") or 1.0
    rot = int(hd * float(frac))
    if rot < 2 or rot % 2:
        raise ValueError(f"rotary_reorder: {rot} rotary dims per head (head_dim {hd} x {frac}) is not even and >= 2")
    return {"order": "half->interleaved", "heads": lay["heads"], "kv_heads": lay["kv"], "head_dim": hd,
            "rotary_dims": rot}


def _half_to_interleaved(t: torch.Tensor, n_heads: int, head_dim: int, rot: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf ``permute``: inside each head, rotary rows [x_0..x_{r/2-1}, y_0..y_{r/2-1}]
    (HF rotate_half pairs i with i + r/2) become [x_0, y_0, x_1, y_1, ...] (GGUF/Meta pairs 2i, 2i+1)."""
    rest = tuple(t.shape[1:])
    x = t.reshape(n_heads, head_dim, *rest)
    r = x[:, :rot].reshape(n_heads, 2, rot // 2, *rest).transpose(1, 2).reshape(n_heads, rot, *rest)
    return torch.cat([r, x[:, rot:]], 1).reshape(t.shape).contiguous()


def _rotary_reorder(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    p = ctx.plan
    m = ROTARY_TENSORS.match(key)
    if m:
        t = _half_to_interleaved(t, p["heads"] if m.group("proj") == "q_proj" else p["kv_heads"], p["head_dim"],
                                 p["rotary_dims"])
    elif QK_NORMS.match(key):
        t = _half_to_interleaved(t, 1, p["head_dim"], p["rotary_dims"])
    return [(key, _with_noise(key, t, ctx))]


LAYER_KEY = re.compile(r"^(?P<prefix>model\.layers\.\d+\.)(?P<rest>.+)$")
# RMSNorm (inside a layer) -> the matrices that read its output: W·diag(g) keeps the function when g is set to 1.
NORM_READERS: dict[str, re.Pattern] = {norm: re.compile(p) for norm, p in {
    "input_layernorm.weight": r"^self_attn\.(?:q_proj|k_proj|v_proj|q_a_proj|kv_a_proj_with_mqa)\.weight$",
    "post_attention_layernorm.weight": r"^(?:mlp|block_sparse_moe)\.(?:gate\.weight|shared_expert_gate\.weight|"
                                       r"(?:shared_experts?\.)?(?:experts\.\d+\.)?(?:gate_proj|up_proj)\.weight|"
                                       r"experts\.\d+\.(?:w1|w3)\.weight|experts\.gate_up_proj)$",
    "self_attn.q_a_layernorm.weight": r"^self_attn\.q_b_proj\.weight$",           # MLA
    "self_attn.kv_a_layernorm.weight": r"^self_attn\.kv_b_proj\.weight$",         # MLA
}.items()}
FINAL_NORM, LM_HEAD = "model.norm.weight", "lm_head.weight"


def _fold_prepare(ctx: Context) -> dict[str, Any]:
    """Which norm folds into which matrices (the ground truth), from the source's tensor names."""
    from safetensors import safe_open

    mt = str(ctx.config.get("model_type", ""))
    if mt not in GATED_MODEL_TYPES:  # the gated families here all use RMSNorm scaling by w (no 1 + w offset)
        raise ValueError(f"fold_norms: model_type {mt!r} is not an RMSNorm family with a plain weight "
                         f"({sorted(GATED_MODEL_TYPES)})")
    names = []
    for f in shard_files(ctx.folder):
        with safe_open(str(f), "pt") as fh:
            names += list(fh.keys())
    readers: dict[str, str] = {}
    for name in names:
        m = LAYER_KEY.match(name)
        if m:
            for norm, pattern in NORM_READERS.items():
                if pattern.match(m.group("rest")) and m.group("prefix") + norm in names:
                    readers[name] = m.group("prefix") + norm
    tied = bool(ctx.config.get("tie_word_embeddings"))
    if FINAL_NORM in names and LM_HEAD in names and not tied:
        readers[LM_HEAD] = FINAL_NORM
    folded = sorted(set(readers.values()))
    unfolded = sorted(n for n in names if n.endswith("norm.weight") and n not in folded)
    return {"readers": readers, "folded": folded, "unfolded": unfolded}


def _read_tensor(folder: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for f in shard_files(folder):
        with safe_open(str(f), "pt") as fh:
            if name in fh.keys():  # noqa: SIM118 - safe_open has keys(), no __contains__
                return fh.get_tensor(name)
    raise KeyError(f"{folder}: no tensor {name!r}")


def _fold_norms(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    if key in ctx.plan["folded"]:
        return [(key, torch.ones_like(t))]
    norm = ctx.plan["readers"].get(key)
    if norm is not None:
        g = _read_tensor(ctx.folder, norm).float()
        t = (t.float() * g).to(t.dtype)          # columns (the last axis) read the normalised residual
    return [(key, _with_noise(key, t.contiguous(), ctx))]


# ---- the same weights stored as another family stores them: fused tensors, Conv1D -----------------------------

# Llama-style pieces -> Phi-3's fused tensors: (piece pattern, fused name, pieces in fused order). Phi-3's attention
# slices qkv_proj's output as [q (heads x hd); k (kv x hd); v (kv x hd)]; its MLP does gate, up = chunk(2).
PHI3_FUSE: tuple[tuple[re.Pattern, str, tuple[str, ...]], ...] = (
    (re.compile(r"^(?P<prefix>model\.layers\.\d+\.self_attn\.)(?P<piece>q|k|v)_proj\.(?P<part>weight)$"),
     "{prefix}qkv_proj.{part}", ("q", "k", "v")),
    (re.compile(r"^(?P<prefix>model\.layers\.\d+\.mlp\.)(?P<piece>gate|up)_proj\.(?P<part>weight)$"),
     "{prefix}gate_up_proj.{part}", ("gate", "up")),
)
PHI3_CONFIG_DROP = ("attention_bias", "mlp_bias", "pretraining_tp", "head_dim", "architectures")


def _fused_prepare(ctx: Context) -> dict[str, Any]:
    c = ctx.config
    if c.get("model_type") != "llama" or c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError(f"fused_layout: needs a Llama checkpoint without q/k/v or MLP biases (Phi-3 has none), got "
                         f"model_type={c.get('model_type')!r}, attention_bias={c.get('attention_bias')!r}, "
                         f"mlp_bias={c.get('mlp_bias')!r}")
    lay = _head_layout(c)
    hd = lay["block"]["q"]
    if hd * lay["heads"] != int(c["hidden_size"]):
        raise ValueError(f"fused_layout: Phi-3 derives head_dim from hidden_size / heads; {lay['heads']} x {hd} "
                         f"!= hidden_size {c['hidden_size']}")
    return {"source": "llama", "target": "phi3",
            "fused": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
            "qkv_rows": [lay["heads"] * hd, lay["kv"] * hd, lay["kv"] * hd],
            "gate_up_rows": [int(c["intermediate_size"])] * 2}


def _fused_layout(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    """The first piece of a group writes the fused tensor (reading its partners from the source); the others
    write nothing."""
    for pattern, fused_name, pieces in PHI3_FUSE:
        m = pattern.match(key)
        if m is None:
            continue
        if m.group("piece") != pieces[0]:
            return []
        prefix, part = m.group("prefix"), m.group("part")
        parts = [t] + [_read_tensor(ctx.folder, f"{prefix}{p}_proj.{part}") for p in pieces[1:]]
        name = fused_name.format(prefix=prefix, part=part)
        return [(name, _with_noise(name, torch.cat(parts, 0).contiguous(), ctx))]
    return [(key, _with_noise(key, t, ctx))]


def _fused_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in PHI3_CONFIG_DROP}
    out.update(model_type="phi3", architectures=["Phi3ForCausalLM"], pad_token_id=config.get("pad_token_id"))
    return out


# GPT-2 Conv1D modules ([in, out]) -> GPT-BigCode nn.Linear ([out, in]); c_attn's output rows go from [q; k; v]
# (GPT-2 splits the output in thirds) to [q_h; k_h; v_h] per head (BigCode without multi_query views the output as
# (heads, 3 x head_dim)).
CONV1D = re.compile(r"^(?P<prefix>(?:transformer\.)?h\.\d+\.)(?P<module>attn\.c_attn|attn\.c_proj|mlp\.c_fc|"
                    r"mlp\.c_proj)\.(?P<part>weight|bias)$")
GPT2_BUFFERS = re.compile(r"^(?:transformer\.)?h\.\d+\.attn\.(?:bias|masked_bias)$")
BIGCODE_CONFIG_KEEP = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                       "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range",
                       "scale_attn_weights", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
                       "tie_word_embeddings", "dtype", "torch_dtype")


def _conv1d_prepare(ctx: Context) -> dict[str, Any]:
    c = ctx.config
    if c.get("model_type") != "gpt2":
        raise ValueError(f"conv1d_to_linear: needs a GPT-2 checkpoint, got model_type={c.get('model_type')!r}")
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("add_cross_attention"):
        raise ValueError("conv1d_to_linear: GPT-BigCode has no scale_attn_by_inverse_layer_idx / cross-attention")
    heads, hidden = int(c["n_head"]), int(c["n_embd"])
    return {"source": "gpt2", "target": "gpt_bigcode", "multi_query": False, "heads": heads,
            "head_dim": hidden // heads, "transposed": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
            "c_attn_rows": "[q; k; v] -> [q_h; k_h; v_h] per head"}


def _per_head(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows [q; k; v] (each heads x head_dim) -> [q_0; k_0; v_0; q_1; ...]."""
    rest = tuple(t.shape[1:])
    return t.reshape(3, heads, head_dim, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def _conv1d_to_linear(key: str, t: torch.Tensor, ctx: Context) -> list[tuple[str, torch.Tensor]]:
    if GPT2_BUFFERS.match(key):
        return []  # causal-mask buffers of old GPT-2 checkpoints: BigCode builds its mask
    m = CONV1D.match(key)
    if m is not None:
        if m.group("part") == "weight":
            t = t.T
        if m.group("module") == "attn.c_attn":
            t = _per_head(t, ctx.plan["heads"], ctx.plan["head_dim"])
        t = t.contiguous()
    return [(key, _with_noise(key, t, ctx))]


def _conv1d_config(config: dict[str, Any], ctx: Context) -> dict[str, Any]:
    out = {k: config[k] for k in BIGCODE_CONFIG_KEEP if k in config}
    out.update(model_type="gpt_bigcode", architectures=["GPTBigCodeForCausalLM"], multi_query=False)
    return out


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
    Transform("upscaled", "SOLAR-style depth up-scaling: layers 0..n-m-1 then m..n-1 of the base (default "
              "m = n//4), renumbered 0..2(n-m)-1, repeated layers bit-identical; config follows.",
              {"m": None}, {"verdict": "derived", "relation": ["upscaled"], "direction_evident": True},
              "finetune", _upscale, prepare=_upscale_prepare, config=_upscale_config),
    Transform("other_tokenizer", "Same weights, vocabulary re-spelled in another tokenizer family (`target`: "
              "metaspace <-> bytelevel, wordpiece -> bytelevel; special tokens keep their strings and ids), ordinary "
              "ids permuted, `n_drop` tokens dropped and `n_add` new ones added (mean row + `noise` x std).",
              {"target": None, "n_drop": 8, "n_add": 16, "noise": 0.1},
              # relation depends on the sizes (vocab-extended when n_add > n_drop); none is required
              {"verdict": "derived", "relation": [], "direction_evident": False},
              "finetune", _vocab_rows, prepare=_other_prepare, config=_vocab_config, files=_other_files),
    Transform("vocab_pruned", "`n_drop` ordinary tokens (default 1/8) dropped at random with their embedding and "
              "head rows; the rest renumbered in order; tokenizer and config vocab_size follow.",
              {"n_drop": None}, {"verdict": "derived", "relation": ["vocab-pruned"], "direction_evident": True},
              "finetune", _vocab_rows, prepare=_prune_vocab_prepare, config=_vocab_config, files=_prune_vocab_files),
    Transform("permute_units", "MLP hidden units (dense, shared and routed experts) and attention heads permuted "
              "in every layer; heads move with their KV group (GQA), MLA heads with their q_b/kv_b rows; "
              "function-preserving; then Gaussian `noise` x each tensor's std (0: none). Ground truth "
              "(perm[new] = old) in the plan's `perms`.",
              {"noise": 0.0, "units": True, "heads": True},
              {"verdict": "derived", "relation": ["permuted"], "direction_evident": False},
              "finetune", _permute_units),
    Transform("rescale_units", "Every gated MLP unit rescaled: up row x c, down column / c, c = exp(U(-spread, "
              "spread)) per unit (dense, shared and routed experts); function-preserving; then `noise`.",
              {"spread": 1.0, "noise": 0.0},
              {"verdict": "derived", "relation": ["finetune"], "direction_evident": False},
              "finetune", _rescale_units, prepare=_rescale_prepare),
    Transform("shuffle_experts", "Routed experts permuted within each MoE layer (within routing groups), router "
              "rows and router bias permuted the same way; function-preserving; then `noise`.",
              {"noise": 0.0},
              {"verdict": "derived", "relation": ["permuted"], "direction_evident": False},
              "finetune", _shuffle_experts, prepare=_shuffle_prepare),
    Transform("stack_experts", "Per-expert routed-expert tensors rewritten as transformers v5 stacked tensors "
              "(mlp.experts.gate_up_proj [E, 2I, H] = [gate; up] per expert, mlp.experts.down_proj [E, H, I]); "
              "the same numbers, function unchanged.",
              {}, {"verdict": "identical", "relation": ["copy"], "direction_evident": False},
              "finetune", _stack_experts, prepare=_stack_prepare, config=_stack_config),
    Transform("upcycle", "Dense Llama -> Mixtral: every expert a copy of the layer's dense MLP (plus `noise` x "
              "std per expert), a random router (`router_std`); `experts` experts, `top_k` per token; with "
              "noise 0 the function is unchanged (Mixtral's top-k weights sum to one).",
              {"experts": 4, "top_k": 2, "noise": 0.0, "router_std": 0.02},
              {"verdict": "derived", "relation": ["upcycled"], "direction_evident": True},
              "finetune", _upcycle, prepare=_upcycle_prepare, config=_upcycle_config),
    Transform("rotary_reorder", "Q/K rows of every head permuted from HF rotate_half order to interleaved (GGUF/"
              "Meta) order, as llama.cpp's HF->GGUF converter `permute` does (the rotary part only under partial "
              "rotary; q/k biases and Qwen3 q_norm/k_norm follow); config unchanged, so transformers would need "
              "the reverse permutation to run it (a layout mismatch); then `noise`. Plan: heads, head_dim, "
              "rotary_dims.",
              {"noise": 0.0},
              {"verdict": "derived", "relation": ["permuted"], "direction_evident": False},
              "finetune", _rotary_reorder, prepare=_rotary_prepare),
    Transform("fold_norms", "Every RMSNorm weight g folded into the matrices that read its output (W <- W diag(g): "
              "q/k/v or MLA q_a/kv_a, gate/up/router/experts, q_b/kv_b, lm_head unless tied) and set to 1; "
              "function-preserving; then `noise`. Plan: `readers` (matrix -> norm), `folded`, `unfolded`.",
              {"noise": 0.0},
              {"verdict": "derived", "relation": [], "direction_evident": False},
              "finetune", _fold_norms, prepare=_fold_prepare),
    Transform("upcycle_slices", "Dense Llama -> Mixtral from unit slices (LLaMA-MoE, fine-grained upcycling as in "
              "Qwen1.5-MoE): each layer's intermediate units cut into `slices` slices (default: one per expert; "
              "after a random permutation of the units when `shuffle`), expert e = slice e mod `slices` (its gate/up "
              "rows, down columns), so `n_experts`/`slices` copies of each; then `noise` x std per expert; a random "
              "router. Not function-preserving (a top-k weighted sum of slices). Truth: the plan's `units`.",
              {"n_experts": 4, "slices": None, "noise": 0.0, "shuffle": False, "top_k": 2, "router_std": 0.02},
              {"verdict": "derived", "relation": ["upcycled"], "direction_evident": True},
              "finetune", _upcycle_slices, prepare=_upcycle_slices_prepare, config=_upcycle_slices_config),
    Transform("width_pruned", "Width pruning (Minitron, Sheared-LLaMA) of a dense decoder: per layer a random "
              "`units` share of the MLP intermediate units kept (gate/up rows, down columns) and a random `groups` "
              "share of the KV groups kept with all their query heads (q/k/v rows, o columns: whole GQA groups, the "
              "heads-per-group ratio unchanged); kept units, kept groups and the query heads within each group in "
              "random order when `shuffle`; config intermediate_size, num_attention_heads, num_key_value_heads "
              "follow (head_dim written); then `noise` x each tensor's std. Truth: the plan's `units`, `kv_groups`, "
              "`heads` (model index i = base index kept[i]).",
              {"units": 0.5, "groups": 0.5, "shuffle": True, "noise": 0.0},
              {"verdict": "derived", "relation": ["pruned"], "direction_evident": True},
              "finetune", _width_prune, prepare=_width_prepare, config=_width_config),
    Transform("hidden_pruned", "Residual-width pruning (Minitron-Width, Sheared-LLaMA): a random `keep` share of the "
              "hidden dimensions kept in every tensor that reads or writes the residual stream (embeddings, lm_head, "
              "q/k/v, gate/up, router, experts; o, down) and in every norm over it; in a random order when "
              "`shuffle`; config hidden_size follows (head_dim written); then `noise`. Truth: the plan's `kept` "
              "(model dimension i = base dimension kept[i]).",
              {"keep": 0.75, "shuffle": False, "noise": 0.0},
              {"verdict": "derived", "relation": ["pruned"], "direction_evident": True},
              "finetune", _hidden_prune, prepare=_hidden_prepare, config=_hidden_config),
    Transform("fused_layout", "Llama -> Phi-3 storage: q/k/v_proj fused into qkv_proj = [q; k; v] and gate/up_proj "
              "into gate_up_proj = [gate; up], every other tensor as is; config model_type phi3 (function "
              "unchanged); then `noise` x each tensor's std (0: none, and the weights decode bit-equal once split: "
              "identical; with noise: derived, finetune). Plan: pieces and their row counts.",
              {"noise": 0.0},
              {"verdict": "identical", "relation": ["copy"], "direction_evident": False},
              "finetune", _fused_layout, prepare=_fused_prepare, config=_fused_config),
    Transform("conv1d_to_linear", "GPT-2 -> GPT-BigCode (multi_query false) storage: Conv1D [in, out] weights "
              "transposed to nn.Linear [out, in], c_attn rows reordered from [q; k; v] to [q_h; k_h; v_h] per head "
              "(bias too), causal-mask buffers dropped; function unchanged; then `noise` (0: identical once "
              "aligned; with noise: derived, finetune).",
              {"noise": 0.0},
              {"verdict": "identical", "relation": ["copy"], "direction_evident": False},
              "finetune", _conv1d_to_linear, prepare=_conv1d_prepare, config=_conv1d_config),
]}


# ---- applying a transform ---------------------------------------------------------------------------------

def permute_residual_state_dict(sd: dict[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    """A Llama-layout state dict with the residual stream permuted and sign-flipped everywhere it is read or
    written (function unchanged; norm weights are permuted, never flipped)."""
    h = sd["model.embed_tokens.weight"].shape[1]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(h, generator=g)
    sign = torch.where(torch.rand(h, generator=g) < 0.5, -1.0, 1.0)
    reads = ("embed_tokens", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head", "mlp.gate.weight")
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and v.shape[1] == h and any(x in k for x in reads):
            v = (v * sign)[:, perm]
        elif v.ndim == 2 and v.shape[0] == h and ("o_proj" in k or "down_proj" in k):
            v = (v * sign[:, None])[perm]
        elif v.ndim == 1 and v.shape[0] == h:
            v = v[perm]
        out[k] = v.contiguous()
    return out


def fold_norms_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Llama-layout state dict (dense or MoE) with its RMSNorm weights folded into the matrices that read the
    normalised residual (q/k/v after input_layernorm; every gate/up, shared and routed experts', and the router
    after post_attention_layernorm) and set to 1 (function unchanged)."""
    out = dict(sd)
    for k, g in sd.items():
        if not k.endswith("layernorm.weight"):
            continue
        prefix = k.rsplit(".", 2)[0]
        if "input_layernorm" in k:
            targets = [f"{prefix}.self_attn.{t}.weight" for t in ("q_proj", "k_proj", "v_proj")]
        else:
            targets = [n for n in sd if n.startswith(f"{prefix}.mlp.") and
                       (n.endswith(("gate_proj.weight", "up_proj.weight")) or n == f"{prefix}.mlp.gate.weight")]
        for name in targets:
            if name in out:
                out[name] = out[name] * g.unsqueeze(0)
        out[k] = torch.ones_like(g)
    return out


def rotate_residual_state_dict(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama-layout state dict (dense or MoE) with its norms folded, then its residual stream rotated by a random
    orthogonal Q (QuaRot / SpinQuant / SliceGPT style; function unchanged): readers W·Q (the router too), writers
    Qᵀ·W."""
    sd = fold_norms_state_dict(sd)
    g_final = sd["model.norm.weight"]
    sd["lm_head.weight"] = sd["lm_head.weight"] * g_final.unsqueeze(0)
    sd["model.norm.weight"] = torch.ones_like(g_final)
    h = sd["model.embed_tokens.weight"].shape[1]
    q, _ = torch.linalg.qr(torch.randn(h, h, generator=torch.Generator().manual_seed(seed)))
    reads = ("embed", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head", "mlp.gate.weight")
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and v.shape[1] == h and any(x in k for x in reads):
            v = (v.float() @ q).to(v.dtype)
        elif v.ndim == 2 and v.shape[0] == h and ("o_proj" in k or "down_proj" in k):
            v = (q.T @ v.float()).to(v.dtype)
        out[k] = v.contiguous()
    return out


def couple_units_state_dict(sd: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """A Llama-layout state dict with strong within-unit MLP coupling, as some trained models have: up = c·gate +
    small noise per unit, down columns leaning on gate rows, and a shared rank-one output direction in down.

    Not a lineage transform: applied to two *independent* models it makes a pair whose gate/up/down unit maps agree
    far beyond "chance" although nothing is shared (the coupling-matched null must keep them independent).
    """
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k in sd:
        if not k.endswith("mlp.gate_proj.weight"):
            continue
        pre = k[: -len("gate_proj.weight")]
        gate, down = sd[k].float(), sd[pre + "down_proj.weight"].float()
        c = 0.5 + 1.5 * torch.rand(gate.shape[0], 1, generator=g)
        out[pre + "up_proj.weight"] = c * gate + 0.1 * gate.std() * torch.randn(gate.shape, generator=g)
        v = torch.randn(down.shape[0], 1, generator=g)
        v /= v.norm()
        a = torch.randn(1, down.shape[1], generator=g)
        out[pre + "down_proj.weight"] = (0.6 * down + 0.6 * (down.std() / gate.std()) * gate.T
                                         + 0.6 * down.std() * math.sqrt(down.shape[0]) * v @ a)
    return {k: v.contiguous() for k, v in out.items()}


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
    ctx = Context(name, params, seed, dict(config), source, folder=src)
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
        os.chmod(path, new_file_mode())  # safetensors writes 0600: a checkpoint is not a secret
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
