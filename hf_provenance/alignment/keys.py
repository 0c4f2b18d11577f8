"""Canonical tensor keys: every checkpoint name becomes ``(role, layer, expert, part)``.

Roles are gguf's tensor names (``gguf.TENSOR_NAMES`` without the ``blk.{bid}.`` prefix: ``attn_q``, ``ffn_down``,
``ffn_gate_inp``...) plus a few of our own for tensors gguf does not name (``pooler``, ``position_ids``, ``mtp``,
``ffn_gate_up``, ``mlm_*``, ``vision``...). Routed experts follow one convention:

* ``ffn_gate_exp`` / ``ffn_up_exp`` / ``ffn_down_exp`` with ``expert=i``: one expert's matrix, from per-expert names
  such as ``model.layers.3.mlp.experts.7.down_proj.weight``;
* ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps`` / ``ffn_gate_up_exps`` with ``expert=None``: all experts
  stacked in one 3-D tensor ``[E, ...]`` (transformers v5 ``mlp.experts.gate_up_proj``, gguf's own ``*_exps``).

How a name is resolved, in order (each step is a data table below):

1. ``PREFIX_RENAMES`` strip wrappers (``bert.``, ``model.language_model.`` ...).
2. MTP layers: ``model.layers.L.*`` with ``n_layers <= L < n_layers + mtp_layers`` becomes role ``mtp``,
   ``layer = L - n_layers``, ``part`` = the rest of the name. Never decoder layer L.
3. ``PART_RENAMES`` (``LayerNorm.gamma`` -> ``LayerNorm.weight``, ``e_score_correction_bias`` -> gguf's form).
4. ``DIRECT_RULES``: names gguf lacks (pooler, position_ids, BERT MLM head, fused experts, vision towers...).
5. ``EXPERT_INDEX``: the routed-expert index moves into the key.
6. gguf's ``TensorNameMap`` for the family's gguf arch (``ARCH_BY_MODEL_TYPE``), then llama's, then the superset
   of every gguf arch (llama first). Which table resolved each name is recorded (``KeyMapper.explain``).

Unknown names are returned, with a reason, never dropped.

gguf's ``TensorNameMap.__init__`` updates the class-level ``block_mappings_cfg`` in place with arch overrides, so a
map built for one arch leaks into maps built later. We snapshot gguf's class tables once (deep copies) and build
every map from fresh deep copies of that snapshot in a subclass: build order cannot change a map, and gguf's own
class tables are never touched.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES, TensorNameMap

from hf_provenance.errors import ConfigError

__all__ = [
    "ARCH_BY_MODEL_TYPE",
    "CanonicalKey",
    "KeyMapper",
    "component_of",
    "fixed_axis",
    "is_norm",
    "is_position_indexed",
    "is_vocab_indexed",
    "resolve_arch",
]


# ---------------------------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class CanonicalKey:
    """One tensor's place in a model, independent of the family's naming.

    ``role``: gguf tensor role or one of ours; ``layer``: decoder/encoder block (MTP index for role ``mtp``), None for
    global tensors; ``expert``: routed-expert index for per-expert tensors, None otherwise (also for stacked
    ``*_exps``); ``part``: ``weight``, ``bias``, ``weight_scale_inv``, ``weight_scale``... ("" for buffers).

    Example:
        >>> CanonicalKey("ffn_down_exp", 3, 7, "weight").to_str()
        'blk.3.ffn_down_exp.e7.weight'
    """

    role: str
    layer: int | None = None
    expert: int | None = None
    part: str = "weight"

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or not self.role:
            raise ValueError(f"CanonicalKey.role must be a non-empty string, got {self.role!r}")
        for field_name in ("layer", "expert"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"CanonicalKey.{field_name} must be None or an int >= 0, got {value!r}")
        if not isinstance(self.part, str):
            raise ValueError(f"CanonicalKey.part must be a string, got {self.part!r}")

    def to_str(self) -> str:
        """gguf-style text: ``token_embd.weight``, ``blk.3.attn_q.weight``, ``blk.3.ffn_down_exp.e7.weight``,
        ``mtp.0.enorm.weight``."""
        if self.role == "mtp":
            pieces = ["mtp", str(self.layer if self.layer is not None else 0)]
        else:
            pieces = [] if self.layer is None else ["blk", str(self.layer)]
            pieces.append(self.role)
        if self.expert is not None:
            pieces.append(f"e{self.expert}")
        if self.part:
            pieces.append(self.part)
        return ".".join(pieces)

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "layer": self.layer, "expert": self.expert, "part": self.part}

    @property
    def component(self) -> str:
        return component_of(self)

    def __str__(self) -> str:
        return self.to_str()


# ---------------------------------------------------------------------------------------------------------------
# Data: model_type -> gguf arch
# ---------------------------------------------------------------------------------------------------------------

# transformers model_type -> gguf arch name (a value of gguf.MODEL_ARCH_NAMES). The comment says why where the arch
# is not the obvious one. Entries whose arch the installed gguf lacks fall back (and say so).
ARCH_BY_MODEL_TYPE: dict[str, str] = {
    # decoder-only, dense
    "llama": "llama",
    "mistral": "llama",  # llama.cpp converts Mistral as llama
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "gemma3n": "gemma3n",
    "gemma3n_text": "gemma3n",
    "phi": "phi2",
    "phi3": "phi3",  # fused qkv_proj and gate_up_proj (see layouts.py)
    "gpt2": "gpt2",  # Conv1D: weights stored [in, out] (see layouts.py)
    "gpt_bigcode": "starcoder",  # llama.cpp converts GPT-BigCode (StarCoder 1) as starcoder
    "gpt_neox": "gptneox",
    "gptj": "gptj",
    "falcon": "falcon",
    "bloom": "bloom",
    "starcoder2": "starcoder2",
    "olmo": "olmo",
    "olmo2": "olmo2",
    "glm4": "glm4",
    "cohere": "command-r",
    "cohere2": "cohere2",
    "granite": "granite",
    "internlm2": "internlm2",
    "stablelm": "stablelm",
    "smollm3": "smollm3",
    "exaone4": "exaone4",
    "ernie4_5": "ernie4_5",
    "seed_oss": "seed_oss",
    "mistral3": "mistral3",  # multimodal wrapper; text names after stripping model.language_model.
    # decoder-only, mixture of experts
    "mixtral": "llama",  # llama.cpp converts Mixtral as llama (llama's tensor list has the MoE tensors)
    "qwen2_moe": "qwen2moe",  # shared_expert + shared_expert_gate
    "qwen3_moe": "qwen3moe",
    "qwen3_next": "qwen3next",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",  # llama.cpp converts V3 as deepseek2 (MLA, shared experts, exp_probs_b)
    "glm4_moe": "glm4moe",
    # Solar-Open: SolarOpenConfig subclasses Glm4MoeConfig and its layers are GLM-4.5's (GQA q/k/v/o, no MLA,
    # router with e_score_correction_bias, shared_experts): glm4moe fits; deepseek2 would expect MLA tensors.
    "solar_open": "glm4moe",
    "phimoe": "phimoe",
    "olmoe": "olmoe",
    "llama4": "llama4",
    "llama4_text": "llama4",
    "gpt_oss": "gpt-oss",
    "granitemoe": "granitemoe",
    "dbrx": "dbrx",
    "ernie4_5_moe": "ernie4_5-moe",
    "dots1": "dots1",
    # encoders
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "distilbert": "bert",
    "nomic_bert": "nomic-bert",
    "modernbert": "modern-bert",
    "t5": "t5",
}

FALLBACK_ARCH = "llama"  # then the superset of every gguf arch, llama first

# Roles whose gguf name, for one arch, does not say what the tensor does in the transformers model.
# These archs' gguf tensor lists lack ffn_norm, so gguf calls HF's post_attention_layernorm "post_attention_norm",
# but their decoder layers apply it to the residual stream *before the MLP*, exactly as llama's ffn_norm (read in
# transformers' modeling_{glm4_moe,seed_oss,qwen3_next,gpt_oss}.py). Gemma 2/3, OLMo-2 and EXAONE-4 apply it to the
# attention output (a true post-norm) and keep gguf's name.
ROLE_ALIASES_BY_ARCH: dict[str, dict[str, str]] = {
    "glm4moe": {"post_attention_norm": "ffn_norm"},
    "seed_oss": {"post_attention_norm": "ffn_norm"},
    "qwen3next": {"post_attention_norm": "ffn_norm"},
    "gpt-oss": {"post_attention_norm": "ffn_norm"},
}

_ARCH_BY_NAME: dict[str, MODEL_ARCH] = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}


def resolve_arch(model_type: str) -> tuple[str, str]:
    """``(gguf arch name, how)`` for a transformers ``model_type``.

    ``how`` is ``"table"`` (``ARCH_BY_MODEL_TYPE``), ``"gguf-name"`` (model_type is itself a gguf arch name, after
    ``_`` -> ``-``) or ``"fallback"`` (``FALLBACK_ARCH``, then the superset of all gguf archs).
    """
    mt = (model_type or "").strip().lower()
    name = ARCH_BY_MODEL_TYPE.get(mt)
    if name is not None and name in _ARCH_BY_NAME:
        return name, "table"
    for candidate in (mt, mt.replace("_", "-"), mt.replace("_", "")):
        if candidate in _ARCH_BY_NAME:
            return candidate, "gguf-name"
    return FALLBACK_ARCH, "fallback"


# ---------------------------------------------------------------------------------------------------------------
# Data: rewrites applied before the gguf lookup
# ---------------------------------------------------------------------------------------------------------------

# (pattern, replacement, why). Applied in order, each at most once, before everything else.
PREFIX_RENAMES: tuple[tuple[str, str, str], ...] = (
    (r"^model\.language_model\.", "model.", "transformers v5 multimodal wrapper (gemma3, mistral3, llava...)"),
    (r"^language_model\.model\.", "model.", "transformers v4 multimodal wrapper"),
    (r"^language_model\.", "", "multimodal wrapper around a causal LM (language_model.lm_head...)"),
    (r"^(?:bert|roberta|xlm_roberta|camembert|distilbert|electra)\.", "", "encoder task-head wrapper"),
)

# Applied after the MTP check (an MTP part keeps the original spelling).
PART_RENAMES: tuple[tuple[str, str, str], ...] = (
    (r"(LayerNorm|layer_norm|layernorm)\.gamma$", r"\1.weight", "TF-era BERT checkpoints"),
    (r"(LayerNorm|layer_norm|layernorm)\.beta$", r"\1.bias", "TF-era BERT checkpoints"),
    # gguf knows '...mlp.gate.e_score_correction' (exp_probs_b) with a separate bias suffix
    (r"\.e_score_correction_bias$", ".e_score_correction.bias", "DeepSeek-V3 / GLM-4.5 router bias"),
)


@dataclass(frozen=True)
class _Direct:
    """A name gguf lacks. Groups: ``layer`` (checked against n_layers unless ``mtp``), ``part``, ``expert``."""

    pattern: str
    role: str
    part: str = "weight"  # used when the pattern has no 'part' group (or it did not match)
    note: str = ""


DIRECT_RULES: tuple[_Direct, ...] = (
    # BERT family
    _Direct(r"^embeddings\.position_ids$", "position_ids", "", "BERT position_ids buffer (not a weight)"),
    _Direct(r"^pooler\.dense\.(?P<part>weight|bias)$", "pooler", note="BERT pooler"),
    _Direct(r"^cls\.predictions\.bias$", "mlm_bias", "bias", "BERT MLM output bias (vocabulary-indexed)"),
    _Direct(r"^cls\.predictions\.transform\.dense\.(?P<part>weight|bias)$", "mlm_dense", note="BERT MLM"),
    _Direct(r"^cls\.predictions\.transform\.LayerNorm\.(?P<part>weight|bias)$", "mlm_norm", note="BERT MLM"),
    _Direct(r"^cls\.predictions\.decoder\.(?P<part>weight|bias)$", "mlm_decoder", note="BERT MLM, tied"),
    _Direct(r"^cls\.seq_relationship\.(?P<part>weight|bias)$", "nsp_head", note="BERT next-sentence head"),
    _Direct(r"^lm_head\.dense\.(?P<part>weight|bias)$", "mlm_dense", note="RoBERTa MLM"),
    _Direct(r"^lm_head\.layer_norm\.(?P<part>weight|bias)$", "mlm_norm", note="RoBERTa MLM"),
    _Direct(r"^lm_head\.decoder\.(?P<part>weight|bias)$", "mlm_decoder", note="RoBERTa MLM, tied"),
    _Direct(r"^vocab_transform\.(?P<part>weight|bias)$", "mlm_dense", note="DistilBERT MLM"),
    _Direct(r"^vocab_layer_norm\.(?P<part>weight|bias)$", "mlm_norm", note="DistilBERT MLM"),
    _Direct(r"^vocab_projector\.(?P<part>weight|bias)$", "mlm_decoder", note="DistilBERT MLM, tied"),
    # GPT-2 causal-mask buffers stored in old checkpoints
    _Direct(r"^(?:transformer\.)?h\.(?P<layer>\d+)\.attn\.(?P<part>masked_bias|bias)$", "causal_mask",
            note="GPT-2 attention mask buffer"),
    # transformers v5 fused experts: [E, 2I, H] (gate; up concatenated), gpt-oss [E, H, 2I] interleaved + bias
    _Direct(r"^model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\.gate_up_proj(?:_(?P<part>bias))?$",
            "ffn_gate_up_exps", note="stacked fused experts"),
    _Direct(r"^model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\.down_proj_(?P<part>bias)$",
            "ffn_down_exps", note="gpt-oss stacked expert bias"),
    # dense fused gate/up (phi3, glm4): gguf folds it into ffn_up; we keep it distinct (layouts.py splits it)
    _Direct(r"^model\.layers\.(?P<layer>\d+)\.mlp\.gate_up_proj\.(?P<part>weight|bias|weight_scale_inv|weight_scale)$",
            "ffn_gate_up", note="fused dense gate/up"),
    # vision towers and projectors: one role, the rest of the name as part
    _Direct(r"^(?:model\.)?(?:vision_tower|visual|vision_model|vision_encoder|multi_modal_projector|mm_projector)"
            r"\.(?P<part>.+)$", "vision", note="vision tower / projector"),
    # Qwen3-Next / MiMo style MTP modules under their own prefix
    _Direct(r"^(?:model\.)?mtp\.layers\.(?P<mtp>\d+)\.(?P<part>.+)$", "mtp", note="MTP module"),
    _Direct(r"^(?:model\.)?mtp\.(?P<part>.+)$", "mtp", note="MTP module"),
)

# The routed-expert index moves into the key: '...experts.7.gate_proj.weight' -> expert 7, '...experts.gate_proj.weight'
EXPERT_INDEX = r"^(?P<head>.*?(?:^|\.)experts)\.(?P<expert>\d+)\.(?P<tail>.+)$"

# Decoder layers beyond n_layers are MTP when the config declares num_nextn_predict_layers.
MTP_LAYER = r"^(?P<prefix>(?:model\.)?layers)\.(?P<idx>\d+)\.(?P<rest>.+)$"

# Suffixes tried after the exact name (gguf get_type_and_name): the part of the key, without the dot.
PART_SUFFIXES: tuple[str, ...] = (
    ".weight",
    ".bias",
    ".weight_scale_inv",  # DeepSeek-V3 FP8 block scales
    ".weight_scale",  # compressed-tensors / FP8 per-channel scales
    ".input_scale",
    ".weight_zero_point",
    ".weight_packed",
    ".qweight",
    ".qzeros",
    ".scales",
    ".g_idx",
)


# ---------------------------------------------------------------------------------------------------------------
# gguf maps built from deep copies of gguf's class tables
# ---------------------------------------------------------------------------------------------------------------

_GGUF_TABLES = ("mappings_cfg", "block_mappings_cfg", "arch_block_mappings_cfg")


def _looks_polluted(tables: Mapping[str, Any]) -> list[str]:
    """Arch overrides already merged into the shared block table (someone built TensorNameMap(arch) before us)."""
    block = tables["block_mappings_cfg"]
    hits = []
    for arch, overrides in tables["arch_block_mappings_cfg"].items():
        for tensor, patterns in overrides.items():
            if block.get(tensor) == patterns:
                hits.append(f"{MODEL_ARCH_NAMES.get(arch, arch)}:{TENSOR_NAMES.get(tensor, tensor)}")
    return hits


# Snapshot taken once, when this module is imported.
_PRISTINE: dict[str, Any] = {name: copy.deepcopy(getattr(TensorNameMap, name)) for name in _GGUF_TABLES}
GGUF_TABLE_WARNINGS: tuple[str, ...] = tuple(_looks_polluted(_PRISTINE))
if GGUF_TABLE_WARNINGS:
    warnings.warn(
        "gguf.TensorNameMap.block_mappings_cfg was already modified by an arch-specific map before "
        f"hf_provenance was imported ({', '.join(GGUF_TABLE_WARNINGS)}); canonical keys may be wrong for names "
        "those overrides touch. Import hf_provenance before building gguf TensorNameMaps.",
        RuntimeWarning,
        stacklevel=2,
    )


class IsolatedTensorNameMap(TensorNameMap):
    """gguf's ``TensorNameMap`` whose three tables are per-instance deep copies of the import-time snapshot."""

    def __init__(self, arch: MODEL_ARCH, n_blocks: int):
        for name in _GGUF_TABLES:
            setattr(self, name, copy.deepcopy(_PRISTINE[name]))
        super().__init__(arch, n_blocks)


@functools.lru_cache(maxsize=64)
def gguf_map(arch_name: str, n_blocks: int) -> IsolatedTensorNameMap:
    """The isolated gguf map for one arch (by gguf name, e.g. ``"qwen3moe"``); cached, treat as read-only."""
    return IsolatedTensorNameMap(_ARCH_BY_NAME[arch_name], n_blocks)


def _superset_order() -> list[str]:
    order = [FALLBACK_ARCH]
    for name in ARCH_BY_MODEL_TYPE.values():
        if name in _ARCH_BY_NAME and name not in order:
            order.append(name)
    for arch in MODEL_ARCH:
        name = MODEL_ARCH_NAMES[arch]
        if name not in order and arch in MODEL_TENSORS:
            order.append(name)
    return order


@functools.lru_cache(maxsize=8)
def superset_map(n_blocks: int) -> IsolatedTensorNameMap:
    """Every gguf arch's map merged, first arch wins per name (llama, then ``ARCH_BY_MODEL_TYPE``, then the rest)."""
    merged: dict[str, tuple[MODEL_TENSOR, str]] = {}
    for name in _superset_order():
        for key, value in gguf_map(name, n_blocks).mapping.items():
            merged.setdefault(key, value)
    out = IsolatedTensorNameMap.__new__(IsolatedTensorNameMap)
    out.mapping = merged
    return out


def _template_regex(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
    return re.compile(rf"^{escaped}(?:\.(?P<part>.+))?$")


def _role_of_template(template: str) -> str:
    return template.replace("blk.{bid}.", "").replace(".{bid}.", ".").replace("{bid}.", "")


_TEMPLATES: dict[MODEL_TENSOR, tuple[re.Pattern[str], str]] = {
    tensor: (_template_regex(template), _role_of_template(template)) for tensor, template in TENSOR_NAMES.items()
}


# ---------------------------------------------------------------------------------------------------------------
# The mapper
# ---------------------------------------------------------------------------------------------------------------

_PREFIX_RENAMES = tuple((re.compile(p), r, why) for p, r, why in PREFIX_RENAMES)
_PART_RENAMES = tuple((re.compile(p), r, why) for p, r, why in PART_RENAMES)
_DIRECT = tuple((re.compile(rule.pattern), rule) for rule in DIRECT_RULES)
_EXPERT_INDEX = re.compile(EXPERT_INDEX)
_MTP_LAYER = re.compile(MTP_LAYER)


def _config_int(config: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class KeyMapper:
    """Maps one model's tensor names to canonical keys.

    Args:
        model_type: the config's ``model_type`` (picks the gguf arch; see ``ARCH_BY_MODEL_TYPE``).
        n_layers: ``num_hidden_layers`` (decoder blocks, MTP layers excluded).
        mtp_layers: ``num_nextn_predict_layers``; layers ``n_layers .. n_layers+mtp_layers-1`` become role ``mtp``.
        num_experts: routed experts; a per-expert name with an index beyond it is unknown.

    Example:
        >>> m = KeyMapper("qwen3_moe", 48, num_experts=128)
        >>> m.key("model.layers.1.mlp.experts.7.gate_proj.weight").to_str()
        'blk.1.ffn_gate_exp.e7.weight'
    """

    def __init__(self, model_type: str, n_layers: int, *, mtp_layers: int = 0, num_experts: int | None = None):
        if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 0:
            raise ValueError(f"n_layers must be an int >= 0, got {n_layers!r}")
        if not isinstance(mtp_layers, int) or isinstance(mtp_layers, bool) or mtp_layers < 0:
            raise ValueError(f"mtp_layers must be an int >= 0, got {mtp_layers!r}")
        if num_experts is not None and (not isinstance(num_experts, int) or num_experts < 1):
            raise ValueError(f"num_experts must be None or an int >= 1, got {num_experts!r}")
        self.model_type = model_type
        self.n_layers = n_layers
        self.mtp_layers = mtp_layers
        self.num_experts = num_experts
        self.arch, self.arch_source = resolve_arch(model_type)
        chain = [self.arch] if self.arch == FALLBACK_ARCH else [self.arch, FALLBACK_ARCH]
        self._chain: tuple[str, ...] = tuple(chain)
        self._aliases = ROLE_ALIASES_BY_ARCH.get(self.arch, {})
        self._how: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> KeyMapper:
        """Build from a raw config.json dict (text_config of a multimodal wrapper is used for the layer count).

        Raises:
            ConfigError: the config gives no layer count.
        """
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
        n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
        if n_layers is None:
            n_layers = _config_int(text, "num_hidden_layers", "n_layer", "num_layers")
        if n_layers is None:
            raise ConfigError(f"config.json (model_type {config.get('model_type')!r})",
                              "no num_hidden_layers / n_layer / num_layers, nor in text_config: add the layer count")
        merged = {**text, **config}
        return cls(
            str(config.get("model_type", "")),
            n_layers,
            mtp_layers=_config_int(merged, "num_nextn_predict_layers") or 0,
            num_experts=_config_int(merged, "n_routed_experts", "num_local_experts", "num_experts"),
        )

    @property
    def arch_note(self) -> str:
        """One sentence saying which gguf table is used and why."""
        if self.arch_source == "table":
            head = f"model_type {self.model_type!r} -> gguf arch {self.arch!r} (table)"
        elif self.arch_source == "gguf-name":
            head = f"model_type {self.model_type!r} is gguf arch {self.arch!r}"
        else:
            head = f"model_type {self.model_type!r} is not in the table: fallback to gguf arch {self.arch!r}"
        return head + "; names it lacks are tried against llama, then the superset of all gguf archs"

    def explain(self, name: str) -> str | None:
        """How ``name`` was resolved the last time ``key`` saw it (``gguf:qwen3moe``, ``direct:pooler``,
        ``fallback:superset``, ``mtp``, or ``unknown: <reason>``)."""
        return self._how.get(name)

    # -- one name ------------------------------------------------------------------------------------------------

    def key(self, name: str) -> CanonicalKey | None:
        """The canonical key of one tensor name, or None (see ``explain`` for the reason)."""
        key, how = self._resolve(name)
        self._how[name] = how
        return key

    def _resolve(self, name: str) -> tuple[CanonicalKey | None, str]:
        n = name
        for pattern, repl, _why in _PREFIX_RENAMES:
            new = pattern.sub(repl, n, count=1)
            if new != n:
                n = new
                break

        m = _MTP_LAYER.match(n)
        if m is not None:
            idx = int(m.group("idx"))
            if idx >= self.n_layers:
                if idx < self.n_layers + self.mtp_layers:
                    return CanonicalKey("mtp", idx - self.n_layers, None, m.group("rest")), "mtp"
                return None, (
                    f"unknown: layer {idx} is beyond n_layers={self.n_layers} + mtp_layers={self.mtp_layers}"
                )

        for pattern, repl, _why in _PART_RENAMES:
            n = pattern.sub(repl, n, count=1)

        for pattern, rule in _DIRECT:
            m = pattern.match(n)
            if m is None:
                continue
            groups = m.groupdict()
            layer = None
            if groups.get("layer") is not None:
                layer = int(groups["layer"])
                if layer >= self.n_layers:
                    return None, f"unknown: layer {layer} is beyond n_layers={self.n_layers}"
            if groups.get("mtp") is not None:
                layer = int(groups["mtp"])
                if 0 < self.mtp_layers <= layer:
                    return None, f"unknown: MTP layer {layer} is beyond mtp_layers={self.mtp_layers}"
            elif rule.role == "mtp":
                layer = 0
            part = groups.get("part") or rule.part
            return CanonicalKey(rule.role, layer, None, part), f"direct:{rule.role}"

        expert = None
        m = _EXPERT_INDEX.match(n)
        if m is not None:
            expert = int(m.group("expert"))
            if self.num_experts is not None and expert >= self.num_experts:
                return None, f"unknown: expert {expert} is beyond num_experts={self.num_experts}"
            n = f"{m.group('head')}.{m.group('tail')}"

        for label, tnm in self._maps():
            hit = tnm.get_type_and_name(n, try_suffixes=PART_SUFFIXES)
            if hit is None:
                continue
            key, problem = self._from_gguf(hit, expert)
            if key is None:
                return None, f"unknown: {problem}"
            return key, label
        return None, "unknown: no rewrite rule and no gguf mapping"

    def _maps(self) -> Iterable[tuple[str, TensorNameMap]]:
        for i, arch in enumerate(self._chain):
            label = f"gguf:{arch}" if i == 0 else f"fallback:{arch}"
            yield label, gguf_map(arch, self.n_layers)
        yield "fallback:superset", superset_map(self.n_layers)

    def _from_gguf(self, hit: tuple[MODEL_TENSOR, str], expert: int | None) -> tuple[CanonicalKey | None, str]:
        tensor, gguf_name = hit
        regex, role = _TEMPLATES[tensor]
        m = regex.match(gguf_name)
        if m is None:  # gguf returned a name that does not follow its own template
            return None, f"gguf name {gguf_name!r} does not match template {TENSOR_NAMES[tensor]!r}"
        layer = int(m.group("bid")) if "bid" in regex.groupindex and m.group("bid") is not None else None
        part = m.group("part") or "weight"
        role = self._aliases.get(role, role)
        if expert is not None:
            if not role.endswith("exps"):
                return None, f"expert index on a tensor that is not a routed expert ({role})"
            role = role[:-1]  # ffn_gate_exps (stacked) -> ffn_gate_exp (one expert)
        return CanonicalKey(role, layer, expert, part), ""

    # -- a whole inventory ---------------------------------------------------------------------------------------

    def map_inventory(self, names: Iterable[str]) -> tuple[dict[str, CanonicalKey], list[str]]:
        """Keys for every name, plus the names left unknown (sorted; ``explain`` gives each reason).

        Two names that land on one key are a mapping error: both are reported unknown rather than one being
        kept silently.
        """
        mapped: dict[str, CanonicalKey] = {}
        unknown: list[str] = []
        owner: dict[CanonicalKey, str] = {}
        for name in names:
            key = self.key(name)
            if key is None:
                unknown.append(name)
                continue
            first = owner.get(key)
            if first is not None:
                self._how[name] = f"unknown: same key {key.to_str()} as {first!r}"
                if first in mapped:
                    self._how[first] = f"unknown: same key {key.to_str()} as {name!r}"
                    del mapped[first]
                    unknown.append(first)
                unknown.append(name)
                continue
            owner[key] = name
            mapped[name] = key
        return mapped, sorted(unknown)


# ---------------------------------------------------------------------------------------------------------------
# Data: what each role is
# ---------------------------------------------------------------------------------------------------------------

COMPONENT_BY_ROLE: dict[str, str] = {
    # embeddings
    "token_embd": "embeddings",
    "token_types": "embeddings",
    "per_layer_token_embd": "embeddings",
    "position_embd": "position_embeddings",
    "position_ids": "other",  # buffer, not a weight
    "causal_mask": "other",  # buffer, not a weight
    # attention
    "attn_q": "attention",
    "attn_k": "attention",
    "attn_v": "attention",
    "attn_qkv": "attention",
    "attn_output": "attention",
    "attn_q_a": "attention",
    "attn_q_b": "attention",
    "attn_kv_a_mqa": "attention",
    "attn_kv_b": "attention",
    "attn_k_b": "attention",
    "attn_v_b": "attention",
    "attn_sinks": "attention",
    "attn_gate": "attention",
    "attn_rot_embd": "other",  # inv_freq buffer
    "rope_freqs": "other",
    # norms
    "token_embd_norm": "norms",
    "attn_norm": "norms",
    "attn_norm_2": "norms",
    "attn_q_norm": "norms",
    "attn_k_norm": "norms",
    "attn_q_a_norm": "norms",
    "attn_kv_a_norm": "norms",
    "attn_output_norm": "norms",
    "post_attention_norm": "norms",
    "ffn_norm": "norms",
    "post_ffw_norm": "norms",
    "layer_output_norm": "norms",
    # dense MLP
    "ffn_gate": "dense_mlp",
    "ffn_up": "dense_mlp",
    "ffn_down": "dense_mlp",
    "ffn_gate_up": "dense_mlp",
    # router
    "ffn_gate_inp": "router",
    "ffn_gate_inp_shexp": "router",
    "exp_probs_b": "router",
    # routed experts (one expert / stacked)
    "ffn_gate_exp": "routed_experts",
    "ffn_up_exp": "routed_experts",
    "ffn_down_exp": "routed_experts",
    "ffn_gate_exps": "routed_experts",
    "ffn_up_exps": "routed_experts",
    "ffn_down_exps": "routed_experts",
    "ffn_gate_up_exps": "routed_experts",
    "ffn_norm_exps": "routed_experts",
    # shared experts
    "ffn_gate_shexp": "shared_experts",
    "ffn_up_shexp": "shared_experts",
    "ffn_down_shexp": "shared_experts",
    # heads
    "output": "lm_head",
    "output_norm": "final_norm",
    "pooler": "pooler",
    "mlm_dense": "mlm_head",
    "mlm_norm": "mlm_head",
    "mlm_decoder": "mlm_head",
    "mlm_bias": "mlm_head",
    "nsp_head": "mlm_head",
    "mtp": "mtp",
    "vision": "vision",
}

# gguf roles with these prefixes belong to a tower: v.* vision encoder, mm.* multimodal projector, nextn.* MTP.
COMPONENT_BY_ROLE_PREFIX: tuple[tuple[str, str], ...] = (
    ("v.", "vision"),
    ("mm.", "vision"),
    ("nextn.", "mtp"),
)

NORM_ROLES: frozenset[str] = frozenset(role for role, comp in COMPONENT_BY_ROLE.items() if comp == "norms") | {
    "output_norm",
    "mlm_norm",
    "ffn_norm_exps",
}
# Other gguf roles named like norms (attn_sub_norm, ssm_norm, pre_ffw_norm_2, v.post_ln...) are norms too.
NORM_ROLE_PATTERN = re.compile(r"(?:^|[._])(?:[a-z0-9]*norm(?:_\d+)?|ln(?:_\d+)?|ln\d)$")

# Inside an MTP layer the part is the original remainder: these parts are norms.
MTP_NORM_PART = re.compile(r"(?:^|\.)(?:enorm|hnorm|norm|[a-z_]*layernorm|[a-z_]*_norm)\.(?:weight|bias)$")

# Axes that are NOT arbitrary (never permuted for a null): (axis, kind). kind: vocab | position | token_type.
FIXED_AXIS_BY_ROLE: dict[str, tuple[int, str]] = {
    "token_embd": (0, "vocab"),
    "per_layer_token_embd": (0, "vocab"),
    "output": (0, "vocab"),  # weight [V, H] and bias [V]
    "mlm_decoder": (0, "vocab"),
    "mlm_bias": (0, "vocab"),
    "position_embd": (0, "position"),
    "position_ids": (-1, "position"),
    "token_types": (0, "token_type"),
}
FIXED_AXIS_BY_MTP_PART: tuple[tuple[re.Pattern[str], tuple[int, str]], ...] = (
    (re.compile(r"^embed_tokens\.weight$"), (0, "vocab")),
    (re.compile(r"^shared_head\.head\.weight$"), (0, "vocab")),
)


def component_of(key: CanonicalKey) -> str:
    """The component a key belongs to (``COMPONENT_BY_ROLE``; ``other`` when the role is not listed)."""
    comp = COMPONENT_BY_ROLE.get(key.role)
    if comp is not None:
        return comp
    for prefix, comp in COMPONENT_BY_ROLE_PREFIX:
        if key.role.startswith(prefix):
            return comp
    if NORM_ROLE_PATTERN.search(key.role):
        return "norms"
    return "other"


def is_norm(key: CanonicalKey) -> bool:
    """True for LayerNorm/RMSNorm weight vectors (and biases), q/k norms and MLA latent norms included."""
    if key.role == "mtp":
        return bool(MTP_NORM_PART.search(key.part))
    return key.role in NORM_ROLES or bool(NORM_ROLE_PATTERN.search(key.role))


def fixed_axis(key: CanonicalKey) -> tuple[int, str] | None:
    """``(axis, kind)`` of the axis that is indexed by vocabulary, position or token type, else None.

    Those axes are not arbitrary under H0 (independent models share frequency structure there): never permute
    them for a null.
    """
    if key.role == "mtp":
        for pattern, axis in FIXED_AXIS_BY_MTP_PART:
            if pattern.search(key.part):
                return axis
        return None
    return FIXED_AXIS_BY_ROLE.get(key.role)


def is_vocab_indexed(key: CanonicalKey) -> bool:
    """Token embeddings, lm_head/output, the MLM decoder and bias: one axis is the vocabulary."""
    axis = fixed_axis(key)
    return axis is not None and axis[1] == "vocab"


def is_position_indexed(key: CanonicalKey) -> bool:
    """Position embeddings (and the position_ids buffer): one axis is the position."""
    axis = fixed_axis(key)
    return axis is not None and axis[1] == "position"
