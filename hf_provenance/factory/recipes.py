"""Family recipes as data: size knobs, the transformers config they make, training settings, and tensor layout.

Each entry of :data:`FAMILIES` says, for one family:

- ``architecture`` / ``model_type``: the transformers class and config type that build and save it.
- ``sizes``: knobs a caller may override (``hidden``, ``layers``, ``heads``, ``intermediate``, ``vocab``...).
  A value is an int or an expression over the knobs before it (see :func:`evaluate`).
- ``config``: transformers config fields as expressions over the knobs; ``fixed``: literal config fields.
- ``tokenizer``: a style of :mod:`hf_provenance.factory.tokenizer`; ``objective``: ``causal_lm`` or ``masked_lm``.
- ``train``: pre-training settings (AdamW steps, learning rate, batch, sequence length, warm-up).
- ``layer_prefix``: how decoder/encoder layer ``L`` is named; ``moe``: for MoE families, the first MoE layer
  (an expression over the config) and the config field that counts routed experts.
- ``vocab_tensors``: tensors whose rows are indexed by token id.
- ``tensors``: every tensor ``save_pretrained`` writes, as ``(scope, name, shape, init)`` rows. Scopes:
  ``model`` (once), ``layer`` (every layer), ``dense`` (layers with a dense MLP), ``moe`` (MoE layers),
  ``expert`` (every routed expert of every MoE layer). Shapes are expressions over the resolved config.
  ``init``: ``normal`` (N(0, initializer_range)), ``norm`` (ones, jittered by :func:`build_random`), ``zero``.
  A test checks this table against what transformers actually saves, so it cannot drift silently.

How transformers 5.24 stores MoE experts: **in memory** Qwen3-MoE and DeepSeek-V3 hold *fused 3-D* tensors
(``mlp.experts.gate_up_proj`` of shape ``(experts, 2*moe_intermediate, hidden)`` and ``mlp.experts.down_proj`` of
shape ``(experts, hidden, moe_intermediate)``), but ``save_pretrained`` converts them back to the **per-expert**
Hub layout on disk: ``mlp.experts.{E}.gate_proj.weight`` ``(moe_intermediate, hidden)``, ``...up_proj.weight``,
``...down_proj.weight`` ``(hidden, moe_intermediate)``; ``from_pretrained`` fuses them again on load. So factory
checkpoints look like the published ones. Qwen3-MoE's expert count is saved as ``num_local_experts`` (the
published configs say ``num_experts``; both load). DeepSeek-V3's ``mlp.gate.e_score_correction_bias`` is saved
and is not trained. Transformers has no DeepSeek MTP module, so ``num_nextn_predict_layers`` is 0 here.

Adding a family is a data edit here plus a test row.
"""

from __future__ import annotations

import ast
import copy
import math
from typing import Any

FACTORY_VERSION = "2"  # bump whenever a change alters the bytes a recipe produces; part of every cache key

_ATTN_LLAMA = [
    ("layer", "self_attn.q_proj.weight", ("num_attention_heads * head_dim", "hidden_size"), "normal"),
    ("layer", "self_attn.k_proj.weight", ("num_key_value_heads * head_dim", "hidden_size"), "normal"),
    ("layer", "self_attn.v_proj.weight", ("num_key_value_heads * head_dim", "hidden_size"), "normal"),
    ("layer", "self_attn.o_proj.weight", ("hidden_size", "num_attention_heads * head_dim"), "normal"),
]
_DECODER_COMMON = [
    ("model", "model.embed_tokens.weight", ("vocab_size", "hidden_size"), "normal"),
    ("model", "model.norm.weight", ("hidden_size",), "norm"),
    ("model", "lm_head.weight", ("vocab_size", "hidden_size"), "normal"),
    ("layer", "input_layernorm.weight", ("hidden_size",), "norm"),
    ("layer", "post_attention_layernorm.weight", ("hidden_size",), "norm"),
]
_DENSE_MLP = [
    ("dense", "mlp.gate_proj.weight", ("intermediate_size", "hidden_size"), "normal"),
    ("dense", "mlp.up_proj.weight", ("intermediate_size", "hidden_size"), "normal"),
    ("dense", "mlp.down_proj.weight", ("hidden_size", "intermediate_size"), "normal"),
]
_EXPERTS = [
    ("expert", "mlp.experts.{E}.gate_proj.weight", ("moe_intermediate_size", "hidden_size"), "normal"),
    ("expert", "mlp.experts.{E}.up_proj.weight", ("moe_intermediate_size", "hidden_size"), "normal"),
    ("expert", "mlp.experts.{E}.down_proj.weight", ("hidden_size", "moe_intermediate_size"), "normal"),
]
_DECODER_VOCAB = ["model.embed_tokens.weight", "lm_head.weight"]
_DECODER_TRAIN = {"steps": 120, "lr": 3e-3, "batch": 8, "seq_len": 64, "warmup": 10, "weight_decay": 0.01}

FAMILIES: dict[str, dict[str, Any]] = {
    # Llama: grouped-query attention, RMSNorm, SwiGLU MLP, untied input/output embeddings.
    "llama": {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "objective": "causal_lm",
        "tokenizer": "metaspace",
        "sizes": {"hidden": 64, "layers": 4, "heads": "max(4, hidden // 128)", "kv_heads": "max(2, heads // 4)",
                  "intermediate": "hidden * 4", "vocab": 1024},
        "config": {"hidden_size": "hidden", "intermediate_size": "intermediate", "num_hidden_layers": "layers",
                   "num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "head_dim": "hidden // heads",
                   "vocab_size": "vocab"},
        "fixed": {"tie_word_embeddings": False, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                  "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"},
        "train": _DECODER_TRAIN,
        "layer_prefix": "model.layers.{L}.",
        "moe": None,
        "vocab_tensors": _DECODER_VOCAB,
        "tensors": _DECODER_COMMON + _ATTN_LLAMA + _DENSE_MLP,
    },
    # Qwen3-MoE: Llama-style GQA plus per-head q/k RMSNorm; every layer MoE (top-2 of a few experts), no shared
    # expert, normalised top-k weights.
    "qwen3_moe": {
        "architecture": "Qwen3MoeForCausalLM",
        "model_type": "qwen3_moe",
        "objective": "causal_lm",
        "tokenizer": "bytelevel",
        "sizes": {"hidden": 64, "layers": 2, "heads": "max(4, hidden // 128)", "kv_heads": "max(2, heads // 4)",
                  "intermediate": "hidden * 4", "moe_intermediate": "intermediate // 4", "experts": 4,
                  "experts_per_tok": 2, "vocab": 1024},
        "config": {"hidden_size": "hidden", "intermediate_size": "intermediate", "num_hidden_layers": "layers",
                   "num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "head_dim": "hidden // heads",
                   "moe_intermediate_size": "moe_intermediate", "num_experts": "experts",
                   "num_experts_per_tok": "experts_per_tok", "vocab_size": "vocab"},
        "fixed": {"tie_word_embeddings": False, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
                  "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0},
        "train": _DECODER_TRAIN,
        "layer_prefix": "model.layers.{L}.",
        "moe": {"first_layer": "0", "experts_field": "num_local_experts"},
        "vocab_tensors": _DECODER_VOCAB,
        "tensors": _DECODER_COMMON + _ATTN_LLAMA + [
            ("layer", "self_attn.q_norm.weight", ("head_dim",), "norm"),
            ("layer", "self_attn.k_norm.weight", ("head_dim",), "norm"),
            ("moe", "mlp.gate.weight", ("num_local_experts", "hidden_size"), "normal"),
        ] + _EXPERTS,
    },
    # DeepSeek-V3: multi-head latent attention (low-rank q and kv with a decoupled rotary part), the first
    # layer dense (first_k_dense_replace=1), then MoE layers with one shared expert and sigmoid-scored routed
    # experts carrying an e_score_correction_bias.
    "deepseek_v3": {
        "architecture": "DeepseekV3ForCausalLM",
        "model_type": "deepseek_v3",
        "objective": "causal_lm",
        "tokenizer": "bytelevel_deepseek",
        "sizes": {"hidden": 64, "layers": 3, "heads": "max(4, hidden // 128)", "intermediate": "hidden * 4",
                  "moe_intermediate": "intermediate // 8", "experts": 4, "experts_per_tok": 2, "vocab": 1024},
        "config": {"hidden_size": "hidden", "intermediate_size": "intermediate", "num_hidden_layers": "layers",
                   "num_attention_heads": "heads", "num_key_value_heads": "heads", "q_lora_rank": "hidden // 2",
                   "kv_lora_rank": "hidden // 4", "qk_nope_head_dim": "hidden // heads",
                   "qk_rope_head_dim": "hidden // heads // 2", "v_head_dim": "hidden // heads",
                   "moe_intermediate_size": "moe_intermediate", "n_routed_experts": "experts",
                   "num_experts_per_tok": "experts_per_tok", "vocab_size": "vocab"},
        "fixed": {"tie_word_embeddings": False, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
                  "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                  "num_nextn_predict_layers": 0, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                  "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2},
        "train": _DECODER_TRAIN,
        "layer_prefix": "model.layers.{L}.",
        "moe": {"first_layer": "first_k_dense_replace", "experts_field": "n_routed_experts"},
        "vocab_tensors": _DECODER_VOCAB,
        "tensors": _DECODER_COMMON + [
            ("layer", "self_attn.q_a_proj.weight", ("q_lora_rank", "hidden_size"), "normal"),
            ("layer", "self_attn.q_a_layernorm.weight", ("q_lora_rank",), "norm"),
            ("layer", "self_attn.q_b_proj.weight",
             ("num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)", "q_lora_rank"), "normal"),
            ("layer", "self_attn.kv_a_proj_with_mqa.weight", ("kv_lora_rank + qk_rope_head_dim", "hidden_size"),
             "normal"),
            ("layer", "self_attn.kv_a_layernorm.weight", ("kv_lora_rank",), "norm"),
            ("layer", "self_attn.kv_b_proj.weight",
             ("num_attention_heads * (qk_nope_head_dim + v_head_dim)", "kv_lora_rank"), "normal"),
            ("layer", "self_attn.o_proj.weight", ("hidden_size", "num_attention_heads * v_head_dim"), "normal"),
            ("moe", "mlp.gate.weight", ("n_routed_experts", "hidden_size"), "normal"),
            ("moe", "mlp.gate.e_score_correction_bias", ("n_routed_experts",), "zero"),
            ("moe", "mlp.shared_experts.gate_proj.weight", ("moe_intermediate_size * n_shared_experts", "hidden_size"),
             "normal"),
            ("moe", "mlp.shared_experts.up_proj.weight", ("moe_intermediate_size * n_shared_experts", "hidden_size"),
             "normal"),
            ("moe", "mlp.shared_experts.down_proj.weight",
             ("hidden_size", "moe_intermediate_size * n_shared_experts"), "normal"),
        ] + _DENSE_MLP + _EXPERTS,
    },
    # BERT: post-LayerNorm encoder with biases, learned positions, masked-LM head tied to the word embeddings
    # (cls.predictions.decoder.weight is not saved; its bias is cls.predictions.bias).
    "bert": {
        "architecture": "BertForMaskedLM",
        "model_type": "bert",
        "objective": "masked_lm",
        "tokenizer": "wordpiece",
        "sizes": {"hidden": 64, "layers": 2, "heads": "max(4, hidden // 64)", "intermediate": "hidden * 4",
                  "vocab": 1024},
        "config": {"hidden_size": "hidden", "intermediate_size": "intermediate", "num_hidden_layers": "layers",
                   "num_attention_heads": "heads", "vocab_size": "vocab"},
        "fixed": {"max_position_embeddings": 128, "type_vocab_size": 2, "pad_token_id": 0,
                  "tie_word_embeddings": True},
        "train": {"steps": 120, "lr": 3e-3, "batch": 8, "seq_len": 64, "warmup": 10, "weight_decay": 0.01},
        "layer_prefix": "bert.encoder.layer.{L}.",
        "moe": None,
        "vocab_tensors": ["bert.embeddings.word_embeddings.weight", "cls.predictions.bias"],
        "tensors": [
            ("model", "bert.embeddings.word_embeddings.weight", ("vocab_size", "hidden_size"), "normal"),
            ("model", "bert.embeddings.position_embeddings.weight", ("max_position_embeddings", "hidden_size"),
             "normal"),
            ("model", "bert.embeddings.token_type_embeddings.weight", ("type_vocab_size", "hidden_size"), "normal"),
            ("model", "bert.embeddings.LayerNorm.weight", ("hidden_size",), "norm"),
            ("model", "bert.embeddings.LayerNorm.bias", ("hidden_size",), "zero"),
            ("model", "cls.predictions.bias", ("vocab_size",), "zero"),
            ("model", "cls.predictions.transform.dense.weight", ("hidden_size", "hidden_size"), "normal"),
            ("model", "cls.predictions.transform.dense.bias", ("hidden_size",), "zero"),
            ("model", "cls.predictions.transform.LayerNorm.weight", ("hidden_size",), "norm"),
            ("model", "cls.predictions.transform.LayerNorm.bias", ("hidden_size",), "zero"),
        ] + [
            ("layer", f"{name}.weight", shape, "normal") for name, shape in [
                ("attention.self.query", ("hidden_size", "hidden_size")),
                ("attention.self.key", ("hidden_size", "hidden_size")),
                ("attention.self.value", ("hidden_size", "hidden_size")),
                ("attention.output.dense", ("hidden_size", "hidden_size")),
                ("intermediate.dense", ("intermediate_size", "hidden_size")),
                ("output.dense", ("hidden_size", "intermediate_size")),
            ]
        ] + [
            ("layer", f"{name}.bias", (rows,), "zero") for name, rows in [
                ("attention.self.query", "hidden_size"), ("attention.self.key", "hidden_size"),
                ("attention.self.value", "hidden_size"), ("attention.output.dense", "hidden_size"),
                ("intermediate.dense", "intermediate_size"), ("output.dense", "hidden_size"),
                ("attention.output.LayerNorm", "hidden_size"), ("output.LayerNorm", "hidden_size"),
            ]
        ] + [
            ("layer", "attention.output.LayerNorm.weight", ("hidden_size",), "norm"),
            ("layer", "output.LayerNorm.weight", ("hidden_size",), "norm"),
        ],
    },
}


def family(name: str) -> dict[str, Any]:
    """A deep copy of the recipe of family ``name`` (the table itself is never handed out)."""
    return copy.deepcopy(_recipe(name))


def _recipe(name: str) -> dict[str, Any]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"family {name!r} is not one of {sorted(FAMILIES)}") from None


def resolve_sizes(name: str, overrides: dict[str, int] | None = None) -> dict[str, int]:
    """The size knobs of family ``name`` with ``overrides`` applied, every expression evaluated to an int."""
    spec = _recipe(name)["sizes"]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(spec))
    if unknown:
        raise ValueError(f"size knob(s) {unknown} not known for family {name!r}; allowed: {sorted(spec)}")
    sizes: dict[str, int] = {}
    for knob, value in spec.items():
        value = overrides.get(knob, value)
        sizes[knob] = evaluate(value, sizes) if isinstance(value, str) else int(value)
        if sizes[knob] <= 0:
            raise ValueError(f"size knob {knob}={sizes[knob]} for family {name!r} must be positive")
    return sizes


def config_fields(name: str, sizes: dict[str, int]) -> dict[str, Any]:
    """The transformers config fields (``model_type`` excluded) that ``sizes`` give for family ``name``."""
    spec = _recipe(name)
    fields = {key: evaluate(expr, sizes) for key, expr in spec["config"].items()}
    fields.update(copy.deepcopy(spec["fixed"]))
    return fields


def moe_layers(name: str, config: dict[str, Any]) -> list[int]:
    """Indices of the MoE layers of family ``name`` under ``config`` (empty for dense families)."""
    moe = _recipe(name)["moe"]
    if moe is None:
        return []
    first = evaluate(moe["first_layer"], config)
    return list(range(first, config["num_hidden_layers"]))


def tensor_shapes(name: str, config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor family ``name`` saves under ``config``: ``{name: (shape, init)}``, in layer order."""
    spec = _recipe(name)
    rows = spec["tensors"]
    moe = set(moe_layers(name, config))
    experts = config[spec["moe"]["experts_field"]] if spec["moe"] else 0
    out: dict[str, tuple[tuple[int, ...], str]] = {}

    def add(key: str, shape_exprs: tuple[str, ...], init: str) -> None:
        out[key] = (tuple(evaluate(e, config) for e in shape_exprs), init)

    for scope, key, shape, init in rows:
        if scope == "model" and not key.startswith(("lm_head", "model.norm")):
            add(key, shape, init)
    for layer in range(config["num_hidden_layers"]):
        prefix = spec["layer_prefix"].format(L=layer)
        kind = "moe" if layer in moe else "dense"
        for scope, key, shape, init in rows:
            if scope in ("layer", kind):
                add(prefix + key, shape, init)
            elif scope == "expert" and kind == "moe":
                for e in range(experts):
                    add(prefix + key.format(E=e), shape, init)
    for scope, key, shape, init in rows:
        if scope == "model" and key.startswith(("lm_head", "model.norm")):
            add(key, shape, init)
    return out


# ---- a small, safe arithmetic evaluator for the expressions in the table ------------------------------------

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b}
_CALLS = {"max": max, "min": min}


def evaluate(expr: str | int, names: dict[str, Any]) -> int:
    """Evaluate an integer expression such as ``"num_attention_heads * (qk_nope_head_dim + v_head_dim)"``.

    Allowed: integer literals, names from ``names``, ``+ - * //``, parentheses, ``max(...)`` and ``min(...)``.
    Anything else raises ``ValueError`` (the table is data, never code).

    Example:
        >>> evaluate("max(4, hidden // 128)", {"hidden": 1024})
        8
    """
    if isinstance(expr, int):
        return expr
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"recipe expression {expr!r} is not valid: {err.msg}") from None
    return _eval(tree.body, names, expr)


def _eval(node: ast.AST, names: dict[str, Any], expr: str) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names or not isinstance(names[node.id], int) or isinstance(names[node.id], bool):
            raise ValueError(f"recipe expression {expr!r}: {node.id!r} is not an integer field here")
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, names, expr), _eval(node.right, names, expr))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS
            and node.args and not node.keywords):
        return _CALLS[node.func.id](*(_eval(a, names, expr) for a in node.args))
    raise ValueError(f"recipe expression {expr!r}: only integers, names, + - * //, max() and min() are allowed")


def parameter_count(name: str, config: dict[str, Any]) -> int:
    """Number of parameters family ``name`` saves under ``config`` (from the tensor table)."""
    return sum(math.prod(shape) for shape, _ in tensor_shapes(name, config).values())
