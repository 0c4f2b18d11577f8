"""``arch``: two architectures side by side, from their config.json alone (no weight byte is read).

    >>> report = arch_report("org/model", "org/base")      # doctest: +SKIP
    >>> report.to_dict()["depth"]["text"]                   # doctest: +SKIP
    'depth differs: 48 vs 46 decoder layers (+1 MTP in base)'

The result is a frozen dataclass whose ``to_dict()`` follows ``hf-provenance.arch/1``
(``hf_provenance/schemas/arch.json``). It restates ``architecture.compare_specs`` with the two sides named
``model`` and ``base``, adds what each component is called in Hugging Face checkpoints, and keeps the notes that say
shapes are not evidence of lineage either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from hf_provenance import __version__
from hf_provenance.architecture import compare_specs, count_params, describe_spec, normalise
from hf_provenance.architecture.compare import AFTER_ALIGNMENT, DIRECT, NO_COUNTERPART, ArchComparison
from hf_provenance.errors import ConfigError
from hf_provenance.inspect_model import _config_where

SCHEMA = "hf-provenance.arch/1"
STATUSES = (DIRECT, AFTER_ALIGNMENT, NO_COUNTERPART)

# What each architecture component is called in Hugging Face checkpoints (display only).
HF_NAMES: dict[str, str] = {
    "embed_tokens": "embed_tokens", "embed_positions": "position embeddings",
    "embed_token_types": "token-type embeddings", "embed_norm": "embeddings LayerNorm", "attn_q": "q_proj",
    "attn_k": "k_proj", "attn_v": "v_proj", "attn_kv": "kv_a/kv_b (MLA)", "attn_o": "o_proj",
    "attn_qk_norm": "q_norm/k_norm", "norm_attn": "input norm", "norm_mlp": "post-attention norm",
    "mlp_dense": "dense MLP", "moe_router": "router", "moe_experts": "routed experts",
    "moe_shared_experts": "shared experts", "moe_shared_gate": "shared-expert gate", "final_norm": "final norm",
    "lm_head": "lm_head", "pooler": "pooler", "mlm_head": "MLM head", "nsp_head": "NSP head",
    "classifier": "classifier", "mtp": "MTP block", "vision_embed": "vision embeddings",
    "vision_layers": "vision layers",
}


def _side(shapes, layers: int, instances: int) -> dict[str, Any] | None:
    if shapes is None:
        return None
    return {"shapes": {k: list(v) for k, v in shapes.items()}, "layers": layers, "instances": instances}


@dataclass(frozen=True)
class ArchReport:
    """``hf-provenance arch MODEL BASE``: field table, component comparability, layer kinds, depth, notes."""

    model: dict[str, Any]
    base: dict[str, Any]
    comparison: ArchComparison
    model_spec: dict[str, Any]
    base_spec: dict[str, Any]
    tool: dict[str, str] = field(default_factory=lambda: {"name": "hf-provenance", "version": __version__})

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        components = []
        for comp in c.components:
            components.append({
                "name": comp.name, "label": HF_NAMES.get(comp.name, comp.name), "scope": comp.scope,
                "status": comp.status, "shapes_match": comp.shapes_match,
                "model": _side(comp.a, comp.a_layers, comp.a_instances),
                "base": _side(comp.b, comp.b_layers, comp.b_instances),
                "reasons": list(comp.reasons)})
        by_status = {s: [x["name"] for x in components if x["status"] == s] for s in STATUSES}
        return {
            "schema": SCHEMA, "tool": dict(self.tool),
            "model": dict(self.model, spec=self.model_spec), "base": dict(self.base, spec=self.base_spec),
            "fields": [{"name": f.name, "model": f.a, "base": f.b, "match": f.match} for f in c.fields],
            "components": components,
            "layer_kinds": {k: {"model": a, "base": b} for k, (a, b) in c.layer_kinds.items()},
            "depth": {"model": {"layers": self.model_spec["num_layers"], "mtp_layers": self.model_spec["mtp_layers"]},
                      "base": {"layers": self.base_spec["num_layers"], "mtp_layers": self.base_spec["mtp_layers"]},
                      "text": c.depth},
            "by_status": by_status,
            "notes": list(c.notes),
        }


def _describe(src) -> tuple[dict[str, Any], Any]:
    if src.config is None:
        raise ConfigError(src.ref, "no config.json: the architecture cannot be described without it (arch "
                                   "compares configs; use compare to compare weights)")
    spec = normalise(src.config, where=_config_where(src))
    counts = count_params(spec)
    side = {"ref": src.ref, "kind": src.kind, "revision": src.revision, "content_id": src.content_id.to_dict(),
            "summary": describe_spec(spec, counts), "params": counts.transformers_equivalent}
    return side, spec


def arch_report(model_ref: str, base_ref: str, *, open_fn: Callable[[str], Any] | None = None) -> ArchReport:
    """Compare the architectures of ``model_ref`` and ``base_ref`` (config.json only; config-only folders work).

    Raises:
        ModelNotFoundError, InputError, ConfigError (exit code 2): a ref names nothing, or has no usable config.
    """
    if open_fn is None:
        from hf_provenance.sources import open_model as open_fn
    sides = []
    for ref in (model_ref, base_ref):  # one model open at a time
        src = open_fn(ref)
        try:
            sides.append(_describe(src))
        finally:
            close = getattr(src, "close", None)
            if close is not None:
                close()
    (model, spec_m), (base, spec_b) = sides
    cmp = compare_specs(spec_m, spec_b, labels=("model", "base"))
    return ArchReport(model=model, base=base, comparison=cmp, model_spec=spec_m.to_dict(),
                      base_spec=spec_b.to_dict())


__all__ = ["SCHEMA", "HF_NAMES", "ArchReport", "arch_report"]
