"""Config-only instantiation: build transformers' own class on the meta device to list tensor names and shapes.

No code from the model repo is ever run: ``auto_map`` is dropped, ``trust_remote_code`` is never passed, and the
class comes from transformers' registry for ``model_type``. Everything is created under
``torch.device("meta")``, which also catches parameters created with ``torch.empty`` (transformers v5's fused
experts), so even DeepSeek-V3 stays within a few hundred MB of RSS. When transformers does not know the
``model_type`` or rejects the config (its LlamaConfig refuses 96 heads x 128 with hidden 4096), the result is
``None`` with the reason, and callers use the analytic layout of ``params.components``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

# The Auto class for the suffix of ``architectures[0]`` (first match wins), then the fallbacks in order.
AUTO_CLASS_BY_SUFFIX: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForPreTraining", "AutoModelForPreTraining"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForConditionalGeneration", "AutoModelForImageTextToText"),
    ("Model", "AutoModel"),
)
FALLBACK_AUTO_CLASSES: tuple[str, ...] = ("AutoModelForCausalLM", "AutoModel")
# Keys that are never passed on: code references and bookkeeping.
DROPPED_KEYS: frozenset[str] = frozenset({"auto_map", "model_type", "_name_or_path", "trust_remote_code",
                                          "custom_pipelines", "transformers_version"})


@dataclass(frozen=True)
class MetaLayout:
    """What transformers would build: parameter and buffer shapes by name, and its ``num_parameters()``."""

    model_type: str
    model_class: str
    auto_class: str
    parameters: dict[str, tuple[int, ...]] = field(repr=False)
    buffers: dict[str, tuple[int, ...]] = field(repr=False)
    num_parameters: int
    transformers_version: str

    @property
    def num_buffer_elements(self) -> int:
        total = 0
        for shape in self.buffers.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "model_class": self.model_class, "auto_class": self.auto_class,
                "num_parameters": self.num_parameters, "num_buffer_elements": self.num_buffer_elements,
                "transformers_version": self.transformers_version,
                "parameters": {k: list(v) for k, v in self.parameters.items()},
                "buffers": {k: list(v) for k, v in self.buffers.items()}}


def auto_class_names(architectures: Any) -> tuple[str, ...]:
    """Auto classes to try, in order, for a config's ``architectures`` list."""
    arch = architectures[0] if isinstance(architectures, (list, tuple)) and architectures else ""
    first = next((auto for suffix, auto in AUTO_CLASS_BY_SUFFIX if str(arch).endswith(suffix)), None)
    names = ([first] if first else []) + [n for n in FALLBACK_AUTO_CLASSES if n != first]
    return tuple(names)


def meta_layout(config: Mapping[str, Any]) -> tuple[MetaLayout | None, str | None]:
    """Instantiate transformers' class for ``config`` on the meta device.

    Args:
        config: the config.json dict (a multimodal config keeps its sub-configs).

    Returns:
        ``(layout, None)`` on success, ``(None, reason)`` when transformers does not know the model_type or
        rejects the config. Never raises for a bad config; never runs remote code.
    """
    model_type = config.get("model_type") if isinstance(config, Mapping) else None
    if not model_type:
        return None, "config has no model_type"
    try:
        import torch
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except Exception as exc:  # pragma: no cover - transformers is a dependency
        return None, f"transformers is not importable ({type(exc).__name__}: {exc})"
    if model_type not in CONFIG_MAPPING:
        return None, f"transformers {transformers.__version__} does not know model_type {model_type!r}"
    kwargs = {k: v for k, v in config.items() if k not in DROPPED_KEYS}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:
        return None, f"transformers rejects the config: {_one_line(exc)}"
    errors: list[str] = []
    for name in auto_class_names(config.get("architectures")):
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = auto.from_config(cfg)
        except Exception as exc:
            errors.append(f"{name}: {_one_line(exc)}")
            continue
        params = {n: tuple(p.shape) for n, p in model.named_parameters()}
        buffers = {n: tuple(b.shape) for n, b in model.named_buffers()}
        layout = MetaLayout(model_type=model_type, model_class=type(model).__name__, auto_class=name,
                            parameters=params, buffers=buffers, num_parameters=int(model.num_parameters()),
                            transformers_version=transformers.__version__)
        del model
        return layout, None
    return None, "transformers cannot build a model for this config: " + "; ".join(errors)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
