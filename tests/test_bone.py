"""Bone and Bat (DiSHA, arXiv 2409.15371): the reference forwards equal the equations written here on the
dequantized NF4 weight, equal PEFT's MiSS (init_weights True / "bat") outputs, gradients and merges, start as
the base, train on a tiny llama, export merged and as PEFT adapters that load on the bitsandbytes 4-bit base
with the same logits, resume exactly, are counted by the plan, and refuse shapes they cannot cut."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TOL, dense_weight, make_base
from method_runs import logits, merged_export_error, resumed_checkpoint, run_cfg, started
from qtune.adapters import adapter_layers
from qtune.adapters.bone import BatLinear, BoneLinear
from qtune.errors import QtuneError
from qtune.export import export_peft, load_run
from qtune.loader import QuantSpec, quantized_cache_path
from qtune.plan import plan_memory
from qtune.train import train

FP32 = TOL[torch.float32]



def naive_bone_delta(block: torch.Tensor, in_features: int) -> torch.Tensor:
    """expand(D): column c of ΔW is row (c mod r) of D, i.e. Dᵀ (out, r) tiled along the input, cropped to k."""
    r = block.shape[0]
    return block.t()[:, torch.arange(in_features) % r]


def naive_bat_delta(w0: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Δ𝒲 = 𝒲₀ ×₃ D + D on the (k/r, d/r, r, r) view, one r×r block of W₀ at a time: the block in block-row i
    and block-column m becomes W₀[i, m]·D[i] + D[i]."""
    r = block.shape[-1]
    d, k = w0.shape
    rows = []
    for i in range(d // r):
        rows.append(torch.cat([w0[i * r:(i + 1) * r, m * r:(m + 1) * r] @ block[i] + block[i]
                               for m in range(k // r)], dim=1))
    return torch.cat(rows, dim=0)


def trained_like(layer: nn.Module, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.miss_block.normal_(0, 0.1)
    return layer


def grads(out: torch.Tensor, *tensors: torch.Tensor, seed: int = 2):
    torch.manual_seed(seed)
    return torch.autograd.grad((out * torch.randn_like(out)).sum(), tensors)


# (class, in, out, rank): Bone with r dividing k, Bone with a remainder (k = 70, r = 8: zero padding), Bat
CASES = [(BoneLinear, 64, 48, 8), (BoneLinear, 70, 48, 8), (BatLinear, 64, 96, 8)]
IDS_CASES = ["bone", "bone-padded", "bat"]


@pytest.mark.parametrize("cls, k, d, r", CASES, ids=IDS_CASES)
def test_forward_equals_the_equation_on_the_dequantized_weight(cls, k, d, r, one_thread):
    layer = trained_like(cls(make_base("quant", k, d), rank=r, scale=2.0))
    w0, bias = dense_weight(layer.base_layer), layer.base_layer.bias.float()
    torch.manual_seed(3)
    x = torch.randn(2, 5, k, requires_grad=True)
    got = layer(x)
    block = layer.miss_block.detach().clone().requires_grad_(True)
    delta = naive_bone_delta(block, k) if cls is BoneLinear else naive_bat_delta(w0, block)
    want = x @ (w0 + delta).t() + bias  # unscaled: PEFT's MiSS has no α/r
    torch.testing.assert_close(got, want, **FP32)
    for g, w in zip(grads(got, x, layer.miss_block), grads(want, x, block)):
        torch.testing.assert_close(g, w, **FP32)
    torch.testing.assert_close(layer.delta_weight(w0), delta.detach(), **FP32)
    # x·(W₀ + ΔW)ᵀ + b with the adapter's own merged weight is its forward
    torch.testing.assert_close(F.linear(x, layer.merged_weight(w0), bias), got, **FP32)


@pytest.mark.parametrize("cls, k, d, r", CASES, ids=IDS_CASES)
def test_a_new_layer_is_the_base(cls, k, d, r):
    layer = cls(make_base("quant", k, d), rank=r, scale=2.0)
    x = torch.randn(3, k)
    assert layer.miss_block.abs().sum() == 0
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


@pytest.mark.parametrize("cls, k, d, r", CASES, ids=IDS_CASES)
def test_matches_peft_miss_outputs_gradients_and_merge(cls, k, d, r, one_thread):
    from peft.tuners.miss import MissConfig, MissLinear

    ours = trained_like(cls(make_base("quant", k, d), rank=r, scale=2.0))
    w0 = dense_weight(ours.base_layer)
    dense = nn.Linear(k, d)  # PEFT on the dequantized base
    with torch.no_grad():
        dense.weight.copy_(w0)
        dense.bias.copy_(ours.base_layer.bias)
    dense.requires_grad_(False)
    init = True if cls is BoneLinear else "bat"
    theirs = MissLinear(dense, "default", config=MissConfig(r=r, init_weights=init), r=r)
    assert theirs.miss_block["default"].shape == ours.miss_block.shape
    with torch.no_grad():
        theirs.miss_block["default"].copy_(ours.miss_block)
    torch.manual_seed(4)
    x = torch.randn(2, 6, k)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, want = ours(xa), theirs(xb)
    torch.testing.assert_close(got, want, **FP32)
    for g, w in zip(grads(got, xa, ours.miss_block), grads(want, xb, theirs.miss_block["default"])):
        torch.testing.assert_close(g, w, **FP32)
    theirs.merge()  # PEFT writes W₀ + ΔW into the base weight
    torch.testing.assert_close(ours.merged_weight(w0), theirs.get_base_layer().weight.detach(), **FP32)


def test_bf16_activations_use_fp32_parameters():
    layer = trained_like(BoneLinear(make_base("quant", 70, 48), rank=8, scale=1.0))
    x = torch.randn(4, 70)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and layer.miss_block.dtype == torch.float32
    torch.testing.assert_close(y.float(), layer(x), **TOL[torch.bfloat16])


# Bone at rank 12 divides neither 64 nor 128 (the tiny llama's sizes): its padding runs end to end
@pytest.mark.parametrize("method, rank", [("bone", 12), ("bat", 8)])
def test_trains_exports_merged_and_peft_on_the_4bit_base_and_resumes(tiny_llama, corpus, tmp_path, method, rank):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg = run_cfg(tiny_llama, corpus, tmp_path / "run", method=method, rank=rank)
    train(cfg, progress=False)
    _, ours, *_ = load_run(tmp_path / "run", progress=False, compute_dtype="float32")
    layers = adapter_layers(ours)
    assert len(layers) == 14 and all(type(m).__name__ == {"bone": "BoneLinear", "bat": "BatLinear"}[method]
                                     for m in layers.values())
    assert all(m.miss_block.abs().max() > 1e-3 for m in layers.values())  # every block moved
    want = logits(ours)

    # plan: the same trainable count as the run (metrics' start line counts the model's parameters)
    assert plan_memory(cfg).trainable_params == started(tmp_path / "run")["trainable_params"] == sum(
        m.miss_block.numel() for m in layers.values())

    # merged fp16 model in plain transformers
    err = merged_export_error(tmp_path / "run", tmp_path / "merged", want)
    assert err < 2e-3, f"relative logit difference {err:.2e}"

    # PEFT's MiSS on the bitsandbytes 4-bit base
    out = export_peft(tmp_path / "run", tmp_path / "adapter", progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["r"] == rank
    assert config["init_weights"] == (True if method == "bone" else "bat")
    base = AutoModelForCausalLM.from_pretrained(quantized_cache_path(tiny_llama, QuantSpec(4), torch.float32),
                                                dtype=torch.float32)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = peft.PeftModel.from_pretrained(base, out)
    assert type(model.base_model.model.model.layers[0].mlp.down_proj).__name__ == "MissLinear"
    model.train()  # bitsandbytes' CPU eval path repacks weights; train mode dequantizes as we do (no dropout)
    torch.testing.assert_close(logits(model), want, atol=1e-4, rtol=1e-4)

    # resume: from the step-2 checkpoint (the step-4 one deleted) to step 4 gives the same adapter
    a, b = resumed_checkpoint(tmp_path / "run", cfg, 4, tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) == 14
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0)


def test_bat_refuses_a_rank_that_does_not_divide_the_layers(tiny_llama, corpus, tmp_path):
    with pytest.raises(QtuneError, match=r"layer model\.layers\.0\.self_attn\.q_proj \(out 64, in 64\).*--rank 12.*"
                                         r"divides 32 \(e\.g\. --rank 8\)"):
        train(run_cfg(tiny_llama, corpus, tmp_path / "run", method="bat", rank=12), progress=False)


def test_bat_names_the_common_divisor_across_layers():
    model = nn.ModuleDict({"a": nn.Linear(64, 96), "b": nn.Linear(96, 40)})
    with pytest.raises(QtuneError, match=r"layer b \(out 40, in 96\).*--rank 16.*divides 8 \(e\.g\. --rank 8\)"):
        BatLinear.check(model, ["a", "b"], 16, {})
    BatLinear.check(model, ["a", "b"], 8, {})  # 8 divides 64, 96 and 40


def test_bone_refuses_a_rank_above_a_layers_inputs_and_accepts_any_smaller_one():
    model = nn.ModuleDict({"a": nn.Linear(64, 96), "b": nn.Linear(40, 300)})
    with pytest.raises(QtuneError, match=r"layer b \(out 300, in 40\).*--rank 48.*--rank 40 or smaller"):
        BoneLinear.check(model, ["a", "b"], 48, {})
    BoneLinear.check(model, ["a", "b"], 40, {})  # PEFT's rule is r ≤ in_features; r need not divide it
    BoneLinear.check(model, ["a", "b"], 7, {})


def test_bat_refuses_dropout():
    with pytest.raises(QtuneError, match="--dropout 0"):
        BatLinear(make_base("dense", 64, 64), rank=8, scale=1.0, dropout=0.1)
