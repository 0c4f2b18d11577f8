"""The self-contained HTML report: nothing external, plots inlined, every section present; it opens in headless
Chromium and the screenshot shows the plots (skipped only when no chromium binary is installed; CI installs
Debian's ``chromium`` package)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from hf_provenance import schemas
from hf_provenance.compare import compare
from hf_provenance.report import plots
from hf_provenance.report.html import render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def moe_doc(make):
    doc = compare(make("qwen3_moe", "finetune"), [make("qwen3_moe")]).to_dict()
    schemas.validate(doc)
    return doc


@pytest.fixture(scope="session")
def moe_html(moe_doc):
    pytest.importorskip("matplotlib")
    return render_html(moe_doc, plots.render_plots(moe_doc))


def test_html_is_self_contained(moe_html):
    html = moe_html
    assert html.startswith("<!DOCTYPE html>")
    assert "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in html
    assert not re.search(r"<(script|link|iframe|object|embed)\b", html, re.I)
    assert not re.search(r"""\b(src|href)\s*=\s*(?!["']data:|["']#)""", html, re.I)
    assert not re.search(r"url\(|@import|https?://", html.replace("http://www.w3.org/2000/svg", ""))
    assert html.count('src="data:image/png;base64,') == 4
    assert html.count('src="data:image/svg+xml;base64,') == 1


def test_html_holds_every_section(moe_html, moe_doc):
    c = moe_doc["comparisons"][0]
    for heading in ("Per-component statistics", "Plots", "Layer profile", "Architecture", "Alignment applied",
                    "Hash matches", "Tensors", "How it was measured", "Reproduce"):
        assert f"<h3>{heading}</h3>" in moe_html or f"<h2>{heading}</h2>" in moe_html, heading
    assert "This model shares weight lineage with qwen3_moe-base" in moe_html
    assert moe_html.count("<tr><td><code>model.layers.") + moe_html.count("<tr><td><code>") >= len(c["tensors"])
    assert f"{c['overall']['pearson']['value']:.3f}" in moe_html
    assert moe_doc["model"]["content_id"]["value"] in moe_html
    assert "Not drawn: pca: the report carries no layer sketches" in moe_html


def test_html_escapes_report_text(moe_doc):
    doc = json.loads(json.dumps(moe_doc))
    doc["comparisons"][0]["reasons"] = ["<script>alert(1)</script> & co"]
    html = render_html(doc, None, plots_note="plots not drawn: test")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html
    assert "plots not drawn: test" in html


def screenshot(html_path: Path, png: Path, height: int) -> None:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
                        f"--window-size=1200,{height}", html_path.as_uri()],
                       capture_output=True, timeout=180, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def red_pixels(rgb: np.ndarray) -> np.ndarray:
    """The heatmaps' saturated red (coolwarm near r = 1): only where the inlined plots were decoded and drawn."""
    return (rgb[..., 0] > 150) & (rgb[..., 1] < 50) & (rgb[..., 2] < 70)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI: apt-get install -y chromium)")
def test_html_opens_in_chromium_and_shows_the_plots(tmp_path, moe_html, moe_doc):
    from matplotlib import image

    shots = {}
    for name, html in (("with", moe_html), ("without", render_html(moe_doc, None, plots_note="none"))):
        page = tmp_path / f"{name}.html"
        page.write_text(html, encoding="utf-8")
        shot = tmp_path / f"{name}.png"
        screenshot(page, shot, 4200)
        assert shot.exists() and shot.stat().st_size > 10_000, "chromium wrote no screenshot"
        shots[name] = (image.imread(shot)[..., :3] * 255).astype(np.uint8)
    rgb = shots["with"]
    assert rgb.shape[:2] == (4200, 1200)
    red = red_pixels(rgb)
    assert red.sum() > 20_000, red.sum()
    rows = np.nonzero(red.any(axis=1))[0]
    band = rgb[rows.min():rows.max() + 1]
    assert len(np.unique(band.reshape(-1, 3), axis=0)) > 500  # antialiased plots, labels, colour bars
    assert (band.mean(axis=2) < 240).mean() > 0.2  # far from blank
    # the same page without plots has (almost) none of that red: the check measures the plots, not the page
    assert red_pixels(shots["without"]).sum() < 500
