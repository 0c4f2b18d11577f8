"""Helpers shared by several test modules."""

from __future__ import annotations

import shutil

from safetensors.torch import load_file, save_file

from hf_provenance.factory.transforms import permute_residual_state_dict


def permute_residual(src, dst, seed: int = 3) -> None:
    """A copy of the Llama-layout model in ``src`` with its residual stream permuted and sign-flipped."""
    shutil.copytree(src, dst)
    sd = load_file(f"{src}/model.safetensors")
    save_file(permute_residual_state_dict(sd, seed), f"{dst}/model.safetensors")
