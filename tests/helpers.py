"""Helpers shared by several test modules."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file


def permute_residual(src, dst, seed: int = 3) -> None:
    """A Llama-layout copy with the residual stream permuted and sign-flipped (function unchanged)."""
    shutil.copytree(src, dst)
    sd = load_file(f"{src}/model.safetensors")
    h = sd["model.embed_tokens.weight"].shape[1]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(h, generator=g)
    sign = torch.where(torch.rand(h, generator=g) < 0.5, -1.0, 1.0)
    reads = ("embed_tokens", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and v.shape[1] == h and any(x in k for x in reads):
            v = (v * sign)[:, perm]
        elif v.ndim == 2 and v.shape[0] == h and ("o_proj" in k or "down_proj" in k):
            v = (v * sign[:, None])[perm]
        elif v.ndim == 1 and v.shape[0] == h:
            v = v[perm]
        out[k] = v.contiguous()
    save_file(out, f"{dst}/model.safetensors")
