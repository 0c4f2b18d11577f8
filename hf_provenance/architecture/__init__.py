"""Architecture stage: config.json normalised into one spec, parameter counts, and per-component comparability.

    spec = normalise(config, where="org/model/config.json")
    counts = count_params(spec, inventory=source.inventory)
    cmp = compare_specs(spec_a, spec_b, labels=("model", "base"))

``meta.meta_layout`` (config-only instantiation through transformers on the meta device) is imported lazily: it
needs torch and transformers, the rest of this package does not.
"""

from hf_provenance.architecture.compare import ArchComparison, ComponentComparison, FieldComparison, compare_specs
from hf_provenance.architecture.describe import describe_counts, describe_moe, describe_spec
from hf_provenance.architecture.params import Component, ParamCounts, components, count_params
from hf_provenance.architecture.spec import ArchSpec, MoESpec, RopeSpec, check_against_inventory, normalise

__all__ = [
    "ArchComparison", "ArchSpec", "Component", "ComponentComparison", "FieldComparison", "MoESpec", "ParamCounts",
    "RopeSpec", "check_against_inventory", "compare_specs", "components", "count_params", "describe_counts",
    "describe_moe", "describe_spec", "meta_layout", "normalise",
]


def meta_layout(config):
    """See ``hf_provenance.architecture.meta.meta_layout`` (imports transformers on first use)."""
    from hf_provenance.architecture.meta import meta_layout as _meta_layout

    return _meta_layout(config)
