"""Folk readings people apply to similarity numbers: displayed beside the evidence, never verdict inputs
(DESIGN §Statistics 7)."""

from __future__ import annotations

# (lower bound, label) of the usual reading bands for a similarity value
BANDS = ((0.99, "near-identical"), (0.90, "high"), (0.50, "partial sharing"), (0.10, "low"), (-1.01, "unrelated"))

# the typical fine-tune profile by position: (position, low, high)
FINETUNE_PROFILE = {"embeddings": (0.98, 0.99), "early": (0.95, 0.99), "middle": (0.85, 0.95),
                    "late": (0.70, 0.90), "output": (0.60, 0.85)}

FOLK_FINETUNE = {"mean_layer_cosine": 0.90, "embeddings": 0.98}
FOLK_SCRATCH = {"mean_layer_cosine": 0.30, "embeddings": 0.10}


def band(value: float | None) -> str | None:
    if value is None:
        return None
    for lo, label in BANDS:
        if value >= lo:
            return label
    return "unrelated"


def depth_position(layer: int, n_layers: int) -> str:
    """Where a layer sits in the typical fine-tune profile: early = layers 1-5, late = last quarter."""
    if layer < 5 and layer < n_layers * 0.5:
        return "early"
    if layer >= n_layers - max(1, n_layers // 4):
        return "late"
    return "middle"


def rule_of_thumb(mean_layer_cosine: float | None, embedding_cosine: float | None) -> dict:
    """The folk verdict: mean layer cosine ≥ 0.90 and embeddings ≥ 0.98 ⇒ fine-tune; < 0.3 and < 0.1 ⇒ scratch."""
    if mean_layer_cosine is None:
        verdict = "not applicable"
    elif mean_layer_cosine >= FOLK_FINETUNE["mean_layer_cosine"] and (
            embedding_cosine is None or embedding_cosine >= FOLK_FINETUNE["embeddings"]):
        verdict = "fine-tune"
    elif mean_layer_cosine < FOLK_SCRATCH["mean_layer_cosine"] and (
            embedding_cosine is None or embedding_cosine < FOLK_SCRATCH["embeddings"]):
        verdict = "from scratch"
    else:
        verdict = "unclear"
    return {"mean_layer_cosine": mean_layer_cosine, "embedding_cosine": embedding_cosine, "verdict": verdict,
            "rule": "mean layer cosine ≥ 0.90 and embeddings ≥ 0.98 ⇒ fine-tune; < 0.3 and < 0.1 ⇒ scratch",
            "note": "rule of thumb shown for reference; not used by the verdict"}
