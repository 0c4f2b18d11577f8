"""Layouts as alignment steps: fused tensors split per the family's declared layout, Conv1D read transposed.

Truth by construction: the factory's ``fused_layout`` (Llama -> Phi-3: qkv_proj, gate_up_proj) and
``conv1d_to_linear`` (GPT-2 Conv1D -> GPT-BigCode nn.Linear, c_attn concat -> per head) transforms are real
conversions, checked here to keep the function (same logits in transformers), so the pieces they wrote are the
base's tensors exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_provenance.alignment.fused import layout_plan
from hf_provenance.alignment.identity import identity_plan
from hf_provenance.compare import compare
from hf_provenance.factory import apply_transform
from hf_provenance.measurement.stream import measure_plan
from hf_provenance.measurement.transposed import TransposedRows
from hf_provenance.sources import open_model

QKV_MODEL = "fused layout: attn_qkv split into q/k/v in the model (concat) for 4 layers"
GATE_UP_MODEL = "fused layout: ffn_gate_up split into gate/up in the model (concat) for 4 layers"
PIECES = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")


def _tiny_gpt2(folder: Path, seed: int) -> Path:
    """A GPT-2 with every parameter drawn from ``seed`` (random init leaves biases at zero: useless to compare)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = torch.randn(p.shape, generator=g) * (0.02 if p.ndim == 2 else 0.1)
            p.copy_(x + (1.0 if ".ln_" in f".{name}" and name.endswith("weight") else 0.0))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(make):
    return make("llama")


@pytest.fixture(scope="module")
def phi3(make):
    return make("llama", "fused_layout")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    g0, g1 = _tiny_gpt2(root / "gpt2-s0", 0), _tiny_gpt2(root / "gpt2-s1", 1)
    return {"base": str(g0), "independent": str(g1),
            "bigcode": str(apply_transform(g0, root / "bigcode", "conv1d_to_linear")),
            "bigcode_noise": str(apply_transform(g0, root / "bigcode-noise", "conv1d_to_linear", noise=0.5))}


def _comparison(model: str, base: str):
    c = compare(model, [base]).comparisons[0]
    json.dumps(c.to_dict(), allow_nan=False)
    return c


def _logits(folder: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits, type(model).__name__


# ---- the conversions are real: same function ------------------------------------------------------------------

def test_fused_layout_is_phi3_with_the_same_logits(llama, phi3):
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    (a, cls_a), (b, cls_b) = _logits(llama, ids), _logits(phi3, ids)
    assert (cls_a, cls_b) == ("LlamaForCausalLM", "Phi3ForCausalLM")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    inv = open_model(phi3).inventory
    assert list(inv["model.layers.0.self_attn.qkv_proj.weight"].shape) == [4 * 16 + 2 * 2 * 16, 64]
    assert list(inv["model.layers.0.mlp.gate_up_proj.weight"].shape) == [2 * 256, 64]
    assert not any("q_proj" in n or "gate_proj" in n for n in inv)


def test_conv1d_to_linear_is_gpt_bigcode_with_the_same_logits(gpt2):
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    (a, cls_a), (b, cls_b) = _logits(gpt2["base"], ids), _logits(gpt2["bigcode"], ids)
    assert (cls_a, cls_b) == ("GPT2LMHeadModel", "GPTBigCodeForCausalLM")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    inv_a, inv_b = open_model(gpt2["base"]).inventory, open_model(gpt2["bigcode"]).inventory
    assert list(inv_a["transformer.h.0.mlp.c_fc.weight"].shape) == [64, 256]   # Conv1D [in, out]
    assert list(inv_b["transformer.h.0.mlp.c_fc.weight"].shape) == [256, 64]   # nn.Linear [out, in]


# ---- fused vs unfused -----------------------------------------------------------------------------------------

def _pieces(c) -> dict[str, float]:
    return {t.key: t.pearson.value for t in c.tensors if t.key.split(".")[-2] in PIECES}


def test_fused_copy_against_unfused_base_pairs_every_piece(llama, phi3):
    c = _comparison(phi3, llama)
    # every base tensor has its counterpart: the pieces come out of qkv_proj / gate_up_proj
    assert c.unmatched == ()
    pieces = _pieces(c)
    assert len(pieces) == 4 * 5 and all(r == pytest.approx(1.0) for r in pieces.values())
    assert all(t.frac_equal == 1.0 for t in c.tensors)
    # the same numbers in another layout: bit-equal once split (DESIGN: identical allows lossless re-encoding)
    assert c.verdict.verdict == "identical"
    assert QKV_MODEL in c.alignment["lines"] and GATE_UP_MODEL in c.alignment["lines"]
    fused = {f["role"]: f for f in c.alignment["layout"]["fused"]}
    assert fused["attn_qkv"]["model_mode"] == "concat" and fused["attn_qkv"]["base_mode"] is None
    assert fused["ffn_gate_up"]["layers"] == [0, 1, 2, 3]
    q = next(t for t in c.tensors if t.key == "blk.0.attn_q.weight")
    assert q.axes == ("rotary", "arbitrary") and q.shape == (64, 64)


def test_fused_copy_with_noise_is_derived(make, llama):
    c = _comparison(make("llama", "fused_layout", noise=0.5), llama)
    assert c.verdict.verdict == "derived" and "finetune" in c.verdict.relation
    pieces = _pieces(c)
    assert len(pieces) == 20
    # noise is 0.5 x the *fused* tensor's std: gate and up (alike) get r = 1/sqrt(1.25); v, smaller than q and k
    # inside qkv_proj, gets relatively more
    mlp = [r for k, r in pieces.items() if ".ffn_" in k]
    assert all(r == pytest.approx(1 / np.sqrt(1.25), abs=0.02) for r in mlp), pieces
    assert all(0.75 < r < 0.97 for r in pieces.values()), pieces
    assert QKV_MODEL in c.alignment["lines"]


def test_unfused_model_against_fused_base(llama, phi3):
    c = _comparison(llama, phi3)
    assert c.unmatched == () and c.verdict.verdict == "identical"
    assert len(_pieces(c)) == 20
    lines = c.alignment["lines"]
    assert "fused layout: attn_qkv split into q/k/v in the base (concat) for 4 layers" in lines
    assert "fused layout: ffn_gate_up split into gate/up in the base (concat) for 4 layers" in lines


def test_independent_model_in_the_fused_layout_is_not_derived(make, llama, tmp_path_factory):
    ind = apply_transform(make("llama", "independent"), tmp_path_factory.mktemp("ind") / "phi3", "fused_layout")
    c = _comparison(str(ind), llama)
    assert c.verdict.verdict in ("independent", "inconclusive"), c.verdict.reasons
    assert len(_pieces(c)) == 20 and all(abs(r) < 0.1 for r in _pieces(c).values())


def test_split_sizes_that_do_not_add_up_are_refused(llama, phi3, tmp_path):
    bad = Path(shutil.copytree(phi3, tmp_path / "phi3-bad"))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_key_value_heads"] = 1            # q 64 + k 16 + v 16 = 96 rows, but qkv_proj has 128
    (bad / "config.json").write_text(json.dumps(cfg))
    c = _comparison(str(bad), llama)
    refused = [u for u in c.unmatched if u["name"].endswith("qkv_proj.weight")]
    assert len(refused) == 4 and all("do not add up" in u["reason"] for u in refused), refused
    assert all("1 KV heads" in u["reason"] for u in refused)
    assert not any(k.split(".")[-2] in ("attn_q", "attn_k", "attn_v") for k in _pieces(c))
    assert c.verdict.verdict != "identical"  # not everything was compared
    assert GATE_UP_MODEL in c.alignment["lines"]
    assert any(line.startswith("layout not applied to model tensor model.layers.0.self_attn.qkv_proj.weight")
               for line in c.alignment["lines"])


# ---- Conv1D vs nn.Linear, concat vs per-head ------------------------------------------------------------------

def test_conv1d_model_against_linear_base_and_back(gpt2):
    for model, base, side in ((gpt2["bigcode"], gpt2["base"], "base"), (gpt2["base"], gpt2["bigcode"], "model")):
        c = _comparison(model, base)
        assert c.unmatched == () and c.verdict.verdict == "identical", c.verdict.reasons
        assert all(t.frac_equal == 1.0 for t in c.tensors)
        modes = ("concat", "per_head") if side == "base" else ("per_head", "concat")
        assert (f"fused layout: attn_qkv split into q/k/v on both sides (base {modes[0]}, model {modes[1]}) "
                f"for 2 layers") in c.alignment["lines"]
        assert (f"transposed layout: attn_output, attn_qkv, ffn_down, ffn_up stored [in, out] (Conv1D) in the "
                f"{side}, compared as [out, in] for 2 layers") in c.alignment["lines"]
        trans = c.alignment["layout"]["transposed"]
        assert {t["role"] for t in trans} == {"attn_output", "attn_qkv", "ffn_down", "ffn_up"}
        assert {t["side"] for t in trans} == {side}
        keys = {t.key for t in c.tensors}
        # c_proj is square: the identity plan paired it untransposed; it is now read transposed and equal
        assert {"blk.0.attn_q.weight", "blk.0.attn_v.bias", "blk.1.ffn_up.weight", "blk.1.attn_output.weight"} <= keys


def test_conv1d_with_noise_is_derived_and_independent_is_not(gpt2):
    c = _comparison(gpt2["bigcode_noise"], gpt2["base"])
    assert c.verdict.verdict == "derived"
    mats = [t for t in c.tensors if len(t.shape) == 2 and t.layer is not None]
    assert len(mats) == 2 * 6 and all(t.pearson.value > 0.8 for t in mats)
    c = _comparison(gpt2["independent"], gpt2["bigcode"])
    assert c.verdict.verdict in ("independent", "inconclusive"), c.verdict.reasons
    assert any(line.startswith("transposed layout:") for line in c.alignment["lines"])


def test_same_layout_pairs_keep_the_identity_plan(make, llama, phi3, gpt2):
    for model, base in ((make("llama", "noise"), llama), (phi3, make("llama", "fused_layout", noise=0.5)),
                        (gpt2["independent"], gpt2["base"])):
        b, m = open_model(base), open_model(model)
        plan, _ = identity_plan(b, m)
        out, summary, lines = layout_plan(b, m, plan)
        assert out is plan and summary is None and lines == []


# ---- stacked experts: interleaved and transposed (gpt-oss) vs concatenated (transformers v5) -------------------

def _moe_folder(folder: Path, model_type: str, tensors: dict) -> str:
    folder.mkdir()
    cfg = {"model_type": model_type, "num_hidden_layers": 1, "num_local_experts": 2, "hidden_size": 8,
           "intermediate_size": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
           "vocab_size": 16}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return str(folder)


def test_interleaved_transposed_experts_against_concatenated(tmp_path):
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2, 8, 12, generator=g)          # gpt-oss: [E, H, 2I], gate = [..., ::2], up = [..., 1::2]
    down = torch.randn(2, 6, 8, generator=g)              # gpt-oss: [E, I, H]
    oss = _moe_folder(tmp_path / "oss", "gpt_oss", {"model.layers.0.mlp.experts.gate_up_proj": gate_up,
                                                    "model.layers.0.mlp.experts.down_proj": down})
    v5 = torch.cat([gate_up[..., ::2].transpose(1, 2), gate_up[..., 1::2].transpose(1, 2)], 1)  # [E, 2I, H]
    qwen = _moe_folder(tmp_path / "qwen", "qwen3_moe", {"model.layers.0.mlp.experts.gate_up_proj": v5,
                                                        "model.layers.0.mlp.experts.down_proj": down.transpose(1, 2)})
    base, model = open_model(qwen), open_model(oss)
    plan, _ = identity_plan(base, model)
    new, summary, lines = layout_plan(base, model, plan)
    assert new.unmatched == ()
    assert {p.key.role for p in new.pairs} == {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
    assert summary["fused"][0] == {"role": "ffn_gate_up_exps", "base_mode": "concat", "model_mode": "interleave",
                                   "pieces": ["ffn_gate_exps", "ffn_up_exps"], "layers": [0]}
    assert "fused layout: ffn_gate_up_exps split into gate_exps/up_exps on both sides (base concat, model " \
           "interleave) for 1 layer" in lines
    for m in measure_plan(new, base, model, fraction=None, seed=0):
        assert m.acc.equal == m.pair.numel, m.pair.key     # every element of every piece lines up


def test_transposed_rows_use_bounded_windows(tmp_path):
    w = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(1))   # [E, in, out]
    folder = _moe_folder(tmp_path / "t", "gpt_oss", {"model.layers.0.mlp.experts.down_proj": w})
    src = open_model(folder)
    info = src.inventory["model.layers.0.mlp.experts.down_proj"]
    want = w.transpose(1, 2).reshape(24, 8)
    t = TransposedRows(src.reader, info, budget=4 * 8 * 5, chunk_bytes=4 * 12 * 3)  # 5 columns per window
    assert torch.equal(t.rows(None), want)
    assert t.windows_loaded == 2 * 3                       # 12 columns in windows of 5, per expert
    idx = np.random.default_rng(0).permutation(24)
    assert torch.equal(TransposedRows(src.reader, info, budget=4 * 8 * 5).rows(idx, 3, 17), want[idx[3:17]])
    whole = TransposedRows(src.reader, info)               # fits the default budget: one window per matrix
    read0 = src.reader.bytes_read
    assert torch.equal(torch.cat([whole.rows(None, s, s + 4) for s in range(0, 24, 4)]), want)
    assert whole.windows_loaded == 2 and src.reader.bytes_read - read0 == info.nbytes
