"""Per-family tensor layouts, declared as data: fused tensors and how they split, orientation, rotary row order, norms.

Canonical keys (``keys.py``) say *what* a tensor is; a layout says *how its numbers are laid out*, which an alignment
plan needs before two families' tensors can be compared row by row:

* **Fused tensors.** ``attn_qkv`` (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, GPT-NeoX ``query_key_value``), ``ffn_gate_up``
  (Phi-3 / GLM-4 ``mlp.gate_up_proj``) and the stacked experts ``ffn_gate_up_exps`` of transformers v5. Each piece is
  a block of *output features*: concatenated (``concat``), alternating rows (``interleave``, gpt-oss) or per head
  (``per_head``, GPT-NeoX: ``[q_h; k_h; v_h]`` for each head h).
  In transformers 5.x ``MixtralExperts``, ``Qwen3MoeExperts``, ``DeepseekV3Experts``, ``Glm4MoeExperts``,
  ``Qwen2MoeExperts``, ``PhimoeExperts`` and ``SolarOpenExperts`` store ``gate_up_proj`` as ``[E, 2I, H]`` and
  ``down_proj`` as ``[E, H, I]`` (``nn.functional.linear(x, gate_up_proj[e]).chunk(2, dim=-1)`` -> gate first): the
  pieces are concatenated along axis 1, gate then up. gpt-oss stores ``[E, H, 2I]`` (transposed) with gate and up
  interleaved (``gate_up[..., ::2]``, ``gate_up[..., 1::2]``); Llama-4 stores ``[E, H, 2I]`` concatenated.
* **Orientation.** ``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]`` (``transposed``).
* **Rotary row order** of the Q/K output rows within a head: ``half`` (HF ``rotate_half``: dim i pairs with
  i + d/2; HF-layout Llama, Qwen, Mistral...) or ``interleaved`` (Meta/GGUF: dims 2i, 2i+1 pair; DeepSeek's MLA
  rope rows with ``rope_interleave``, Llama-4). Converting between them permutes rows inside each head.
* **Norm kind.** ``rmsnorm`` or ``layernorm``; Gemma 1-3 store ``w`` and scale by ``1 + w`` (offset 1.0).

``layout_for(model_type)`` returns the declared layout, or the stated fallback (llama-like: nn.Linear, half-split
rotary, RMSNorm, default fused splits) with ``declared=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["FusedSplit", "Layout", "LAYOUTS", "CONFIG_VARIANTS", "layout_for", "layout_for_config"]

SPLIT_MODES = ("concat", "interleave", "per_head")
SIZE_SYMBOLS = ("q", "kv", "equal")  # q: n_heads*head_dim, kv: n_kv_heads*head_dim, equal: total/len(pieces)
ROTARY_ORDERS = ("half", "interleaved")
NORM_KINDS = ("rmsnorm", "layernorm")


@dataclass(frozen=True)
class FusedSplit:
    """How one fused tensor splits into its pieces along the output-feature axis.

    Example:
        >>> s = FusedSplit("attn_qkv", ("attn_q", "attn_k", "attn_v"), "concat", ("q", "kv", "kv"))
        >>> s.sizes_for(32, n_heads=2, n_kv_heads=1, head_dim=8)
        (16, 8, 8)
    """

    role: str
    pieces: tuple[str, ...]
    mode: str = "concat"
    sizes: tuple[str, ...] = ()  # one SIZE_SYMBOL per piece; empty means all "equal"

    def __post_init__(self) -> None:
        if self.mode not in SPLIT_MODES:
            raise ValueError(f"FusedSplit.mode must be one of {SPLIT_MODES}, got {self.mode!r}")
        if len(self.pieces) < 2:
            raise ValueError(f"FusedSplit.pieces needs at least two roles, got {self.pieces!r}")
        if self.sizes and len(self.sizes) != len(self.pieces):
            raise ValueError(f"FusedSplit.sizes needs one entry per piece ({len(self.pieces)}), got {self.sizes!r}")
        bad = [s for s in self.sizes if s not in SIZE_SYMBOLS]
        if bad:
            raise ValueError(f"FusedSplit.sizes entries must be in {SIZE_SYMBOLS}, got {bad}")

    def sizes_for(
        self, total: int, *, n_heads: int | None = None, n_kv_heads: int | None = None, head_dim: int | None = None
    ) -> tuple[int, ...]:
        """Number of output features of each piece, given the fused tensor's output size ``total``."""
        symbols = self.sizes or ("equal",) * len(self.pieces)
        if all(s == "equal" for s in symbols):
            if total % len(symbols):
                raise ValueError(f"{self.role}: {total} output features do not split into {len(symbols)} equal parts")
            return (total // len(symbols),) * len(symbols)
        if head_dim is None or n_heads is None:
            raise ValueError(f"{self.role}: sizes {symbols} need n_heads and head_dim")
        n_kv = n_heads if n_kv_heads is None else n_kv_heads
        per = {"q": n_heads * head_dim, "kv": n_kv * head_dim}
        known = sum(per[s] for s in symbols if s != "equal")
        n_equal = sum(1 for s in symbols if s == "equal")
        rest = total - known
        if rest < 0 or (n_equal and rest % n_equal) or (not n_equal and rest):
            raise ValueError(f"{self.role}: sizes {symbols} with heads {n_heads}/{n_kv} x {head_dim} do not add up "
                             f"to {total} output features")
        return tuple(per[s] if s != "equal" else rest // n_equal for s in symbols)

    def indices(
        self, total: int, *, n_heads: int | None = None, n_kv_heads: int | None = None, head_dim: int | None = None
    ) -> tuple[tuple[int, ...], ...]:
        """Output-feature indices of each piece inside the fused tensor, in the piece's own order."""
        sizes = self.sizes_for(total, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
        k = len(sizes)
        if self.mode == "concat":
            out, start = [], 0
            for size in sizes:
                out.append(tuple(range(start, start + size)))
                start += size
            return tuple(out)
        if self.mode == "interleave":
            if len(set(sizes)) != 1:
                raise ValueError(f"{self.role}: interleaved pieces must have equal sizes, got {sizes}")
            return tuple(tuple(range(i, total, k)) for i in range(k))
        # per_head: for each head h, [piece0 rows of h; piece1 rows of h; ...], every piece head_dim rows per head
        if head_dim is None:
            raise ValueError(f"{self.role}: per_head split needs head_dim")
        if total % (k * head_dim):
            raise ValueError(f"{self.role}: {total} is not a multiple of {k} x head_dim {head_dim}")
        n = total // (k * head_dim)
        return tuple(
            tuple(h * k * head_dim + i * head_dim + d for h in range(n) for d in range(head_dim)) for i in range(k)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "pieces": list(self.pieces), "mode": self.mode,
                "sizes": list(self.sizes or ("equal",) * len(self.pieces))}


# Fused roles every family may carry (names are unambiguous); families override where their storage differs.
QKV = FusedSplit("attn_qkv", ("attn_q", "attn_k", "attn_v"), "concat", ("q", "kv", "kv"))
GATE_UP = FusedSplit("ffn_gate_up", ("ffn_gate", "ffn_up"), "concat", ("equal", "equal"))
GATE_UP_EXPS = FusedSplit("ffn_gate_up_exps", ("ffn_gate_exps", "ffn_up_exps"), "concat", ("equal", "equal"))
DEFAULT_FUSED: tuple[FusedSplit, ...] = (QKV, GATE_UP, GATE_UP_EXPS)


@dataclass(frozen=True)
class Layout:
    """One family's declared storage layout.

    ``transposed_roles``: roles whose weight is stored ``[in, out]`` (``[E, in, out]`` when stacked over experts).
    ``rotary``: row order of rotary dims inside each head of ``rotary_roles`` (None: no rotary embedding).
    ``rotary_fraction_field``: config field giving the rotated fraction of each head (partial rotary), if any.
    """

    model_type: str
    declared: bool = True
    note: str = ""
    fused: tuple[FusedSplit, ...] = DEFAULT_FUSED
    transposed_roles: frozenset[str] = frozenset()
    rotary: str | None = "half"
    rotary_roles: tuple[str, ...] = ("attn_q", "attn_k")
    rotary_fraction_field: str | None = None
    norm: str = "rmsnorm"
    norm_weight_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.rotary is not None and self.rotary not in ROTARY_ORDERS:
            raise ValueError(f"Layout.rotary must be None or one of {ROTARY_ORDERS}, got {self.rotary!r}")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"Layout.norm must be one of {NORM_KINDS}, got {self.norm!r}")
        roles = [s.role for s in self.fused]
        if len(set(roles)) != len(roles):
            raise ValueError(f"Layout {self.model_type!r} declares a fused role twice: {roles}")

    def split_for(self, role: str) -> FusedSplit | None:
        """How the fused tensor of ``role`` splits, or None when ``role`` is not fused."""
        for split in self.fused:
            if split.role == role:
                return split
        return None

    def is_transposed(self, role: str) -> bool:
        return role in self.transposed_roles

    def out_axis(self, role: str, part: str, ndim: int) -> int:
        """The axis of the stored tensor that indexes output features (where fused pieces lie).

        Biases (and any 1-D-per-expert vector) put outputs last; weights put them second-to-last (``[.., out, in]``)
        unless the role is transposed (``[.., in, out]``).
        """
        if ndim < 1:
            raise ValueError(f"{role}.{part}: a 0-D tensor has no output axis")
        if part == "bias" or ndim == 1:
            return ndim - 1
        return ndim - 1 if self.is_transposed(role) else ndim - 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "declared": self.declared,
            "note": self.note,
            "fused": [s.to_dict() for s in self.fused],
            "transposed_roles": sorted(self.transposed_roles),
            "rotary": self.rotary,
            "rotary_roles": list(self.rotary_roles),
            "rotary_fraction_field": self.rotary_fraction_field,
            "norm": self.norm,
            "norm_weight_offset": self.norm_weight_offset,
        }


def _fused(*overrides: FusedSplit) -> tuple[FusedSplit, ...]:
    """DEFAULT_FUSED with the given splits replacing those of the same role (and added when new)."""
    by_role = {s.role: s for s in DEFAULT_FUSED}
    by_role.update({s.role: s for s in overrides})
    return tuple(by_role.values())


_LLAMA_NOTE = "HF layout: nn.Linear [out, in], rotate_half rotary (Meta checkpoints were permuted to it), RMSNorm"
_LLAMA = Layout("llama", note=_LLAMA_NOTE)
_V5_EXPERTS = "transformers v5 experts: gate_up_proj [E, 2I, H] = [gate; up] on axis 1, down_proj [E, H, I]"

# ----------------------------------------------------------------------------------------------------------------
# The table. One row per family; a comment-free row means "llama-like" in every respect the fields list.
# ----------------------------------------------------------------------------------------------------------------
LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, model_type="mistral"),
    "mixtral": replace(_LLAMA, model_type="mixtral", note=f"{_LLAMA_NOTE}; {_V5_EXPERTS}"),
    "qwen2": replace(_LLAMA, model_type="qwen2"),
    "qwen2_moe": replace(_LLAMA, model_type="qwen2_moe", note=f"{_LLAMA_NOTE}; {_V5_EXPERTS}"),
    "qwen3": replace(_LLAMA, model_type="qwen3", note=f"{_LLAMA_NOTE}; per-head q_norm/k_norm"),
    "qwen3_moe": replace(_LLAMA, model_type="qwen3_moe", note=f"{_LLAMA_NOTE}; q_norm/k_norm; {_V5_EXPERTS}"),
    "glm4_moe": replace(
        _LLAMA, model_type="glm4_moe", rotary_fraction_field="partial_rotary_factor",
        note=f"{_LLAMA_NOTE}; partial rotary (first partial_rotary_factor of each head, default 0.5); {_V5_EXPERTS}",
    ),
    "solar_open": replace(
        _LLAMA, model_type="solar_open",
        note=f"GLM-4.5-style MoE layers (SolarOpenConfig subclasses Glm4MoeConfig); {_LLAMA_NOTE}; {_V5_EXPERTS}",
    ),
    "deepseek_v2": replace(
        _LLAMA, model_type="deepseek_v2", rotary="interleaved", rotary_roles=("attn_q_b", "attn_kv_a_mqa"),
        note="MLA: only the qk_rope_head_dim rows of each q head (attn_q_b) and of attn_kv_a_mqa rotate, stored "
             "in interleaved pairs (view_as_complex); nn.Linear; RMSNorm",
    ),
    "deepseek_v3": replace(
        _LLAMA, model_type="deepseek_v3", rotary="interleaved", rotary_roles=("attn_q_b", "attn_kv_a_mqa"),
        note="MLA: only the qk_rope_head_dim rows of each q head (attn_q_b) and of attn_kv_a_mqa rotate, stored "
             f"interleaved (config rope_interleave, default True); {_V5_EXPERTS}; FP8 weight_scale_inv 128x128 blocks",
    ),
    "phi3": replace(
        _LLAMA, model_type="phi3",
        note="qkv_proj = [q; k; v] (n_heads, n_kv, n_kv x head_dim rows); gate_up_proj = [gate; up] "
             "(chunk(2, dim=-1), gate first); rotate_half rotary; RMSNorm",
    ),
    "phimoe": replace(_LLAMA, model_type="phimoe", norm="layernorm",
                      note=f"nn.LayerNorm with bias; rotate_half rotary; {_V5_EXPERTS}"),
    "gemma": replace(_LLAMA, model_type="gemma", norm_weight_offset=1.0, note="RMSNorm scales by (1 + w)"),
    "gemma2": replace(_LLAMA, model_type="gemma2", norm_weight_offset=1.0, note="RMSNorm scales by (1 + w)"),
    "gemma3": replace(_LLAMA, model_type="gemma3", norm_weight_offset=1.0, note="RMSNorm scales by (1 + w)"),
    "gemma3_text": replace(_LLAMA, model_type="gemma3_text", norm_weight_offset=1.0,
                           note="RMSNorm scales by (1 + w)"),
    "gemma3n": replace(_LLAMA, model_type="gemma3n", note="RMSNorm scales by w (no offset, unlike Gemma 1-3)"),
    "gpt2": Layout(
        "gpt2",
        note="Conv1D stores [in, out]; c_attn = [q; k; v] along out (equal thirds); learned positions; LayerNorm",
        fused=_fused(FusedSplit("attn_qkv", ("attn_q", "attn_k", "attn_v"), "concat", ("equal",) * 3)),
        transposed_roles=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"}),
        rotary=None,
        rotary_roles=(),
        norm="layernorm",
    ),
    # GPT-BigCode (StarCoder): nn.Linear. Without multi_query, c_attn's output is viewed as (heads, 3 x head_dim):
    # [q_h; k_h; v_h] per head; with multi_query (one KV head) see CONFIG_VARIANTS.
    "gpt_bigcode": Layout(
        "gpt_bigcode",
        note="nn.Linear; c_attn rows are [q_h; k_h; v_h] per head h (multi_query=False); learned positions; LayerNorm",
        fused=_fused(FusedSplit("attn_qkv", ("attn_q", "attn_k", "attn_v"), "per_head", ("equal",) * 3)),
        rotary=None,
        rotary_roles=(),
        norm="layernorm",
    ),
    "gpt_neox": Layout(
        "gpt_neox",
        note="query_key_value rows are [q_h; k_h; v_h] per head h; partial rotate_half rotary; LayerNorm",
        fused=_fused(FusedSplit("attn_qkv", ("attn_q", "attn_k", "attn_v"), "per_head", ("equal",) * 3)),
        rotary_fraction_field="rotary_pct",
        norm="layernorm",
    ),
    "gpt_oss": replace(
        _LLAMA, model_type="gpt_oss",
        fused=_fused(FusedSplit("ffn_gate_up_exps", ("ffn_gate_exps", "ffn_up_exps"), "interleave",
                                ("equal", "equal"))),
        transposed_roles=frozenset({"ffn_gate_up_exps", "ffn_down_exps"}),
        note="experts gate_up_proj [E, H, 2I] with gate/up interleaved (::2, 1::2), down_proj [E, I, H]; "
             "rotate_half rotary; RMSNorm",
    ),
    "llama4": replace(
        _LLAMA, model_type="llama4", rotary="interleaved",
        transposed_roles=frozenset({"ffn_gate_up_exps", "ffn_down_exps"}),
        note="experts gate_up_proj [E, H, 2I] = [gate; up] on the last axis, down_proj [E, I, H]; complex "
             "(interleaved) rotary; RMSNorm",
    ),
    "bert": Layout("bert", note="nn.Linear; learned absolute positions; LayerNorm", rotary=None, rotary_roles=(),
                   norm="layernorm"),
    "roberta": Layout("roberta", note="nn.Linear; learned absolute positions (offset by padding_idx + 1); LayerNorm",
                      rotary=None, rotary_roles=(), norm="layernorm"),
    "distilbert": Layout("distilbert", note="nn.Linear; learned absolute positions; LayerNorm", rotary=None,
                         rotary_roles=(), norm="layernorm"),
}

FALLBACK_LAYOUT = replace(
    _LLAMA, model_type="", declared=False,
    note="no declared layout: assumed llama-like (nn.Linear [out, in], rotate_half rotary, RMSNorm, default fused "
         "splits); verify before trusting a fused split or rotary permutation",
)


# Families whose storage depends on a config flag: (model_type, config field, value that selects the row, the field's
# default when config.json omits it, the layout to use instead of LAYOUTS[model_type]).
CONFIG_VARIANTS: tuple[tuple[str, str, Any, Any, Layout], ...] = (
    ("gpt_bigcode", "multi_query", True, True, replace(
        LAYOUTS["gpt_bigcode"],
        note="nn.Linear; multi_query: c_attn rows are [q (heads x head_dim); k (head_dim); v (head_dim)]; learned "
             "positions; LayerNorm",
        fused=_fused(FusedSplit("attn_qkv", ("attn_q", "attn_k", "attn_v"), "concat", ("q", "kv", "kv"))))),
)


def layout_for_config(config: dict[str, Any] | None) -> Layout:
    """The declared layout for a config.json dict: ``layout_for(model_type)`` unless a ``CONFIG_VARIANTS`` row
    matches (GPT-BigCode's fused c_attn is per head without ``multi_query``, concatenated with it)."""
    cfg = config or {}
    mt = str(cfg.get("model_type", "") or "").strip().lower()
    for model_type, name, value, default, layout in CONFIG_VARIANTS:
        if mt == model_type and cfg.get(name, default) == value:
            return layout
    return layout_for(mt)


def layout_for(model_type: str) -> Layout:
    """The declared layout of ``model_type``, or ``FALLBACK_LAYOUT`` (``declared=False``) naming it."""
    mt = (model_type or "").strip().lower()
    layout = LAYOUTS.get(mt)
    if layout is not None:
        return layout
    return replace(FALLBACK_LAYOUT, model_type=mt)
