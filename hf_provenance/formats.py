"""Checkpoint formats the evidence can and cannot read yet, and LoRA adapters (checked by construction).

Quantised repositories other than FP8 with block/channel scales (GPTQ, AWQ, bitsandbytes, compressed-tensors
integer packs, MXFP4...) store packed integers the measurement cannot decode: their tensors are "not comparable
(format X)" and a comparison left with nothing else is ``inconclusive`` — never ``independent``, so a correct card
is not contradicted.
"""

from __future__ import annotations

from dataclasses import dataclass

# quant_method values whose weights the reader decodes exactly (FP8 with scales)
READABLE_QUANT = frozenset({"fp8"})


def unreadable_format(source) -> str | None:
    """The quantisation format of ``source`` when the reader cannot decode it, else None."""
    method = getattr(source, "quantization", None)
    if not method:
        return None
    return None if str(method).lower() in READABLE_QUANT else str(method)


@dataclass(frozen=True)
class AdapterCheck:
    base_declared: str | None
    matches_base: bool
    modules_checked: int
    mismatches: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"base_model_name_or_path": self.base_declared, "matches_base": self.matches_base,
                "modules_checked": self.modules_checked, "mismatches": list(self.mismatches),
                "evidence": "by construction, not weight evidence"}


def check_adapter(model, base) -> AdapterCheck:
    """A LoRA adapter fits a base when each target module's lora_A/lora_B shapes fit the base module's weight.

    lora_A: [r, in_features], lora_B: [out_features, r]; the base module's weight is [out_features, in_features].
    """
    declared = (model.adapter or {}).get("base_model_name_or_path")
    base_shapes = {n.removesuffix(".weight"): info.shape for n, info in base.inventory.items() if n.endswith(".weight")}
    checked, bad = 0, []
    for name, info in model.inventory.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b_name = name.replace(".lora_A.", ".lora_B.")
        target = _find_base_module(module, base_shapes)
        if target is None or b_name not in model.inventory:
            bad.append(f"{module}: no such module in the base")
            continue
        out_f, in_f = base_shapes[target][0], base_shapes[target][-1]
        a_shape, b_shape = info.shape, model.inventory[b_name].shape
        checked += 1
        if a_shape[-1] != in_f or b_shape[0] != out_f or a_shape[0] != b_shape[-1]:
            bad.append(f"{module}: lora_A {list(a_shape)}, lora_B {list(b_shape)} do not fit base weight "
                       f"{list(base_shapes[target])}")
    return AdapterCheck(declared, checked > 0 and not bad, checked, tuple(bad))


def _find_base_module(module: str, base_shapes: dict) -> str | None:
    """PEFT names modules 'base_model.model.<name>'; match the longest suffix present in the base."""
    parts = module.split(".")
    for i in range(len(parts)):
        cand = ".".join(parts[i:])
        if cand in base_shapes:
            return cand
    return None
