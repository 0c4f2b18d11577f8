"""Tiny real checkpoints whose lineage is known by construction, for tests, the demo and benchmarks.

Four families in genuine Hugging Face format (``save_pretrained`` of transformers): ``llama``, ``qwen3_moe``,
``deepseek_v3`` and ``bert``, each with a synthetic tokenizer whose ids follow frequency rank. Variants: ``base``,
``finetune``, ``independent`` and the state-dict transforms of :data:`TRANSFORMS` (``copy``, ``bf16``, ``fp16``,
``noise``, ``pruned``, ``vocab_extended``). Every folder carries ``factory.json`` with its recipe and the expected
result of comparing it with its base (``truth``), and a card whose YAML names ``base_model`` for derived variants.

Example:
    >>> from hf_provenance.factory import build_family
    >>> paths = build_family("llama", ["base", "finetune", "independent"])  # doctest: +SKIP
    >>> paths["finetune"] / "model.safetensors"  # doctest: +SKIP

Layout: ``recipes`` (family tables), ``data`` (token streams), ``tokenizer``, ``train``, ``transforms`` (the
transform table and ``apply_transform``), ``build`` (cache, variants, ``build_random``).
"""

from hf_provenance.factory.build import (
    DEFAULT_VARIANTS,
    build,
    build_family,
    build_random,
    build_stats,
    cache_root,
    recipe,
    variants,
)
from hf_provenance.factory.recipes import FACTORY_VERSION, FAMILIES
from hf_provenance.factory.transforms import TRANSFORMS, Transform, apply_transform

__all__ = [
    "DEFAULT_VARIANTS",
    "FACTORY_VERSION",
    "FAMILIES",
    "TRANSFORMS",
    "Transform",
    "apply_transform",
    "build",
    "build_family",
    "build_random",
    "build_stats",
    "cache_root",
    "recipe",
    "variants",
]
