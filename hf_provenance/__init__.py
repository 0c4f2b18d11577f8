"""hf-provenance: do this model's weights share lineage with a given base model, or were they trained independently?"""

__version__ = "0.1.0"

__all__ = ["__version__", "open_model"]


def open_model(ref: str, **kwargs):
    """Open a model by ref (local folder, .safetensors file, HF cache snapshot). See ``hf_provenance.sources``."""
    from hf_provenance.sources import open_model as _open

    return _open(ref, **kwargs)
