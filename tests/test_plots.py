"""Plots of a compare report: which are drawn from which report fields, which are skipped and why, that the PNGs
are real pictures (not blank) and deterministic, and the null band's formula."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from hf_provenance import schemas  # noqa: E402
from hf_provenance.compare import compare  # noqa: E402
from hf_provenance.report import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _doc(model, bases, **kw):
    doc = compare(model, bases, **kw).to_dict()
    schemas.validate(doc)
    return doc


@pytest.fixture(scope="session")
def dense(make):
    return _doc(make("llama", "finetune"), [make("llama")])


@pytest.fixture(scope="session")
def moe(make):
    return _doc(make("qwen3_moe", "finetune"), [make("qwen3_moe")])


def pixels(png: bytes) -> np.ndarray:
    from matplotlib import image

    return image.imread(io.BytesIO(png), format="png")


def distinct_colours(img: np.ndarray) -> int:
    rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    return len(np.unique(rgb, axis=0))


def test_dense_report_plots_and_skips(dense):
    ps = plots.render_plots(dense)
    assert list(ps.images) == ["layer_profile.png", "components.png", "layer_alignment.png"]
    assert set(ps.skipped) == {"experts", "pca"}
    assert "no per-expert tensors" in ps.skipped["experts"]
    assert ps.skipped["pca"] == plots.NO_SKETCHES and "layer_sketches" in ps.skipped["pca"]
    for name, png in ps.images.items():
        assert png.startswith(PNG), name
        img = pixels(png)
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert distinct_colours(img) > 50, name
        assert (img[..., :3].mean(axis=2) < 0.9).mean() > 0.02, name  # not blank


def test_moe_report_draws_expert_pairs(moe):
    ps = plots.render_plots(moe)
    assert "experts.png" in ps.images and "experts" not in ps.skipped
    img = pixels(ps.images["experts.png"])
    red = (img[..., 0] > 0.6) & (img[..., 1] < 0.2) & (img[..., 2] < 0.3)  # coolwarm near r = 1
    assert red.mean() > 0.05


def test_plots_are_deterministic(dense):
    a, b = plots.render_plots(dense), plots.render_plots(json.loads(json.dumps(dense)))
    assert a.images == b.images


def test_several_bases_get_numbered_files(make):
    doc = _doc(make("llama", "finetune"), [make("llama", "independent"), make("llama")])
    ps = plots.render_plots(doc)
    assert {"layer_profile-1.png", "layer_profile-2.png", "components-2.png"} <= set(ps.images)
    assert ps.ranks["layer_profile-2.png"] == 2 and "pca-1" in ps.skipped


def test_layer_null_sd_is_the_permutation_sd():
    t = {"evidence": True, "pearson": {"value": 0.0}, "numel": 64 * 32, "shape": [64, 32],
         "axes": ["arbitrary", "arbitrary"]}
    assert plots.layer_null_sd([t]) == pytest.approx(1 / math.sqrt(63 * 31))
    u = dict(t, numel=16 * 32, shape=[16, 32])
    w1, w2 = 64 * 32 / (80 * 32), 16 * 32 / (80 * 32)
    assert plots.layer_null_sd([t, u]) == pytest.approx(math.sqrt(w1 ** 2 / (63 * 31) + w2 ** 2 / (15 * 31)))
    vec = {"evidence": True, "pearson": {"value": 0.1}, "numel": 100, "shape": [100], "axes": ["arbitrary"]}
    assert plots.layer_null_sd([vec]) == pytest.approx(1 / math.sqrt(99))
    assert plots.layer_null_sd([dict(t, evidence=False)]) is None


def test_key_parts():
    assert plots.key_parts({"key": "blk.3.ffn_down_exp.e7.weight", "layer": 3, "name": "x"}) == \
        {"layer": 3, "role": "ffn_down_exp", "expert": 7, "part": "weight"}
    assert plots.key_parts({"key": "token_embd.weight", "layer": None, "name": "x"})["role"] == "token_embd"
    assert plots.key_parts({"key": "blk.0.attn_q.bias", "layer": 0, "name": "x"})["part"] == "bias"


def test_layer_map_from_alignment(make):
    """A report with a layer map (alignment.layers from alignment/layers.py: map = [[model j, base i, sim]])."""
    doc = _doc(make("llama", "pruned"), [make("llama")])
    c = doc["comparisons"][0]
    n_model = len(c["layers"])
    c["alignment"]["layers"] = {
        "layers": [n_model + 1, n_model],
        "map": [[j, j if j < n_model - 1 else j + 1, 0.9] for j in range(n_model)],
        "similarity": [[0.9 if (i == j or (i == j + 1 and j == n_model - 1)) else 0.0 for j in range(n_model)]
                       for i in range(n_model + 1)],
    }
    pairs = plots.layer_pairs(c)
    assert [(b, m) for b, m, _ in pairs] == [(j, j) for j in range(n_model - 1)] + [(n_model, n_model - 1)]
    png = plots.layer_alignment(c)
    assert isinstance(png, bytes) and png.startswith(PNG)


def test_report_without_tensors_skips_with_reasons(dense):
    doc = json.loads(json.dumps(dense))
    c = doc["comparisons"][0]
    c.update(tensors=[], layers=[], components={}, verdict="identical", relation=["copy"])
    schemas.validate(doc)
    ps = plots.render_plots(doc)
    assert ps.images == {}
    assert ps.skipped["layer_profile"] == "no per-layer tensors were compared"
    assert ps.skipped["components"] == "no tensor was compared"
