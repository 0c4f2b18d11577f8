"""``inspect``: what one model is, from its config and tensor headers only (no weight byte is read).

    >>> result = inspect_model("path/to/model")            # doctest: +SKIP
    >>> result.to_dict()["params"]["transformers_equivalent"]  # doctest: +SKIP
    22713216

The result is a frozen dataclass whose ``to_dict()`` follows the ``hf-provenance.inspect/1`` schema
(``hf_provenance/schemas/inspect.json``); the terminal renderer reads only ``to_dict()``.

Three kinds of input work: a folder with config and weights (everything), a config-only folder (architecture and
counts from the config; no inventory) and a lone ``.safetensors`` file without config (inventory only: components
are guessed from tensor names, there is no architecture and no parameter count but the stored one).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from hf_provenance import __version__
from hf_provenance.alignment.keys import KeyMapper, component_of
from hf_provenance.architecture import check_against_inventory, count_params, describe_moe, describe_spec, normalise
from hf_provenance.architecture.spec import layer_index

SCHEMA = "hf-provenance.inspect/1"

# Report order of inventory components (component_of's names); others follow alphabetically, "unknown" last.
COMPONENT_ORDER = ("embeddings", "position_embeddings", "attention", "norms", "dense_mlp", "router",
                   "routed_experts", "shared_experts", "final_norm", "lm_head", "pooler", "mlm_head", "mtp", "vision",
                   "other")
UNKNOWN = "unknown"
# adapter_config.json keys worth reporting (the file may hold much more)
ADAPTER_KEYS = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "task_type")


@dataclass(frozen=True)
class InventoryGroup:
    """Tensors of one component or one dtype: how many, how many elements, how many bytes."""

    name: str
    tensors: int
    params: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tensors": self.tensors, "params": self.params, "bytes": self.bytes}


@dataclass(frozen=True)
class Inventory:
    """The checkpoint's tensors grouped by canonical component and by dtype; unknown names kept with a reason."""

    tensors: int
    params: int
    bytes: int
    files: tuple[str, ...]
    by_component: tuple[InventoryGroup, ...]
    by_dtype: tuple[InventoryGroup, ...]
    unknown: tuple[tuple[str, str], ...]       # (tensor name, why it has no canonical key)
    key_mapping: str                           # which gguf table named the tensors
    scale_tensors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "params": self.params, "bytes": self.bytes, "files": list(self.files),
                "by_component": [g.to_dict() for g in self.by_component],
                "by_dtype": [g.to_dict() for g in self.by_dtype],
                "unknown": [{"name": n, "reason": r} for n, r in self.unknown],
                "key_mapping": self.key_mapping, "scale_tensors": self.scale_tensors}


@dataclass(frozen=True)
class InspectResult:
    """Everything ``hf-provenance inspect`` reports about one model (schema ``hf-provenance.inspect/1``).

    ``architecture`` is ``ArchSpec.to_dict()`` (None without config.json); ``params`` holds the four counts of
    DESIGN (``total_checkpoint``, ``transformers_equivalent``, ``mtp``, ``active_per_token``) and the rest of
    ``ParamCounts``; ``inventory`` is None for a config-only folder; ``findings`` are the disagreements between the
    config and the tensor shapes.
    """

    model: dict[str, Any]
    has_config: bool
    architecture: dict[str, Any] | None
    summary: str | None
    moe: str | None
    params: dict[str, Any]
    inventory: Inventory | None
    card: dict[str, Any]
    quantization: str | None
    adapter: dict[str, Any] | None
    vocab: dict[str, Any] | None
    findings: tuple[str, ...]
    notes: tuple[str, ...]
    tool: dict[str, str] = field(default_factory=lambda: {"name": "hf-provenance", "version": __version__})

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "tool": dict(self.tool), "model": dict(self.model), "has_config": self.has_config,
            "architecture": self.architecture, "summary": self.summary, "moe": self.moe, "params": dict(self.params),
            "inventory": None if self.inventory is None else self.inventory.to_dict(), "card": dict(self.card),
            "quantization": self.quantization, "adapter": self.adapter, "vocab": self.vocab,
            "findings": list(self.findings), "notes": list(self.notes),
        }


def _config_where(src) -> str:
    """Where config.json is (or would be), for messages: a local path, else ``<ref>: config.json``."""
    path = getattr(src, "path", None)
    if not path:
        return f"{src.ref}: config.json"
    folder = path if src.kind != "file" else os.path.dirname(path)
    return os.path.join(folder or ".", "config.json")


def _numel(info) -> int:
    return math.prod(int(d) for d in info.shape)


def _ordered(groups: dict[str, list[int]], order: tuple[str, ...] = ()) -> tuple[InventoryGroup, ...]:
    def rank(name: str):
        if name == UNKNOWN:
            return (2, 0, name)
        return (0, order.index(name), name) if name in order else (1, 0, name)

    return tuple(InventoryGroup(name, *groups[name]) for name in sorted(groups, key=rank))


def _add(groups: dict[str, list[int]], name: str, params: int, nbytes: int) -> None:
    g = groups.setdefault(name, [0, 0, 0])
    g[0] += 1
    g[1] += params
    g[2] += nbytes


def build_inventory(inventory: Mapping[str, Any], config: Mapping[str, Any] | None, files=(),
                    scale_tensors: int = 0) -> Inventory:
    """Group an inventory (name -> TensorInfo) by canonical component and by dtype."""
    if config is not None:
        mapper = KeyMapper.from_config(config)
        how = mapper.arch_note
    else:
        layers = [i for i in (layer_index(n) for n in inventory) if i is not None]
        mapper = KeyMapper("", max(layers) + 1 if layers else 0)
        how = ("no config.json: components guessed from tensor names alone (gguf's llama table, then every "
               "gguf arch); layer count taken from the names")
    keys, unknown = mapper.map_inventory(inventory)
    by_component: dict[str, list[int]] = {}
    by_dtype: dict[str, list[int]] = {}
    for name, info in inventory.items():
        n, b = _numel(info), info.nbytes
        key = keys.get(name)
        _add(by_component, component_of(key) if key is not None else UNKNOWN, n, b)
        _add(by_dtype, info.dtype, n, b)
    reasons = tuple((name, (mapper.explain(name) or "unknown").removeprefix("unknown: ")) for name in unknown)
    return Inventory(
        tensors=len(inventory), params=sum(_numel(i) for i in inventory.values()),
        bytes=sum(i.nbytes for i in inventory.values()), files=tuple(files),
        by_component=_ordered(by_component, COMPONENT_ORDER),
        by_dtype=tuple(sorted((InventoryGroup(k, *v) for k, v in by_dtype.items()), key=lambda g: -g.bytes)),
        unknown=reasons, key_mapping=how, scale_tensors=scale_tensors)


def _adapter(adapter: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not adapter:
        return None
    out = {k: adapter.get(k) for k in ADAPTER_KEYS if k in adapter}
    if isinstance(out.get("target_modules"), (set, tuple)):
        out["target_modules"] = sorted(out["target_modules"])
    return out


def inspect_model(ref: str, *, open_fn: Callable[[str], Any] | None = None) -> InspectResult:
    """Inspect the model at ``ref`` (folder, ``.safetensors`` file, HF cache snapshot).

    Raises:
        ModelNotFoundError, InputError, ConfigError (exit code 2): nothing at ``ref``, malformed files or config.
    """
    if open_fn is None:
        from hf_provenance.sources import open_model as open_fn
    src = open_fn(ref)
    try:
        return _inspect(src)
    finally:
        close = getattr(src, "close", None)
        if close is not None:
            close()


def _inspect(src) -> InspectResult:
    notes: list[str] = list(src.notes)
    config = src.config
    inventory = src.inventory or {}
    spec = counts = None
    if config is not None:
        spec = normalise(config, where=_config_where(src))
        counts = count_params(spec, inventory=inventory or None)
        notes += list(spec.notes) + list(counts.notes)
        params = counts.to_dict()
    else:
        total = sum(_numel(i) for i in inventory.values())
        params = {"total_checkpoint": total, "transformers_equivalent": None, "mtp": None, "active_per_token": None,
                  "source": "inventory", "notes": []}
        notes.append(f"{_config_where(src)}: not found; inventory only (no architecture, no parameter count "
                     "beyond the stored elements)")
    inv = None
    if inventory:
        inv = build_inventory(inventory, config, getattr(src, "files", ()),
                              scale_tensors=len(getattr(src, "scale_names", ()) or ()))
    findings = tuple(check_against_inventory(spec, inventory)) if spec is not None and inventory else ()
    vocab = None if src.vocab is None else {"kind": src.vocab.kind, "size": len(src.vocab)}
    if spec is not None and vocab is not None and vocab["size"] > spec.vocab_size:
        findings += (f"tokenizer: {vocab['size']:,} tokens but config.json vocab_size is {spec.vocab_size:,}",)
    return InspectResult(
        model={"ref": src.ref, "kind": src.kind, "path": src.path, "revision": src.revision,
               "content_id": src.content_id.to_dict()},
        has_config=config is not None,
        architecture=None if spec is None else spec.to_dict(),
        summary=None if spec is None else describe_spec(spec, counts),
        moe=None if spec is None else describe_moe(spec, counts),
        params=params, inventory=inv, card=src.card.to_dict(), quantization=src.quantization,
        adapter=_adapter(src.adapter), vocab=vocab, findings=findings, notes=tuple(dict.fromkeys(notes)))


__all__ = ["SCHEMA", "InspectResult", "Inventory", "InventoryGroup", "build_inventory", "inspect_model"]
