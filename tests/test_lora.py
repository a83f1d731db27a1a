"""LoRA layer: equals the base at init, matches the paper's equation written here, and PEFT; the engine's
fused node (qtune.engine.fused.LoRANode) matches the same equation."""

import math

import pytest
import torch
from torch import nn

from conftest import TOL
from qtune.adapters import attach_adapters
from qtune.adapters.lora import LoRALinear
from qtune.engine import linear as engine_linear
from quant import QuantLinear


def naive_lora(x, W, bias, A, B, s):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, straight from arXiv 2106.09685 eq. (3)."""
    y = x @ W.T + s * (x @ A.T) @ B.T
    return y if bias is None else y + bias


def run(layer, x, form):
    return layer(x) if form == "reference" else engine_linear.eager(layer, x)


@pytest.mark.parametrize("form", ["reference", "fused"])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_equals_base_at_init_and_matches_naive(quantized, bias, form):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=bias)
    base = QuantLinear.from_linear(lin, compute_dtype=torch.float32) if quantized else lin.requires_grad_(False)
    layer = LoRALinear(base, rank=4, scale=2.0)
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(run(layer, x, form), base(x), atol=0, rtol=0)  # B = 0: exactly the base

    with torch.no_grad():
        layer.lora_B.normal_()
    W = base.dequantized_weight(torch.float32) if quantized else lin.weight.detach()
    b = None if not bias else lin.bias.detach()
    x1 = x.clone().requires_grad_()
    run(layer, x1, form).square().sum().backward()
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ref = naive_lora(x2, W, b, A, B, 2.0)
    ref.square().sum().backward()
    torch.testing.assert_close(run(layer, x, form).detach(), ref.detach(), **TOL[torch.float32])
    for got, want in [(x1.grad, x2.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)]:
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert all(p.grad is None for p in base.parameters())


@pytest.mark.parametrize("form", ["reference", "fused"])
def test_lora_with_dropout_matches_the_equation_on_the_same_mask(form):
    """Dropout on the adapter's input only: y = x Wᵀ + s·(drop(x) Aᵀ) Bᵀ; dL/dx gets the base's part
    through x and the adapter's through the mask (the fused node's separate-input path)."""
    torch.manual_seed(3)
    lin = nn.Linear(48, 40)
    base = QuantLinear.from_linear(lin, compute_dtype=torch.float32)
    layer = LoRALinear(base, rank=4, scale=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x1 = torch.randn(3, 5, 48).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    torch.manual_seed(7)
    y = run(layer, x1, form)
    y.square().sum().backward()
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    torch.manual_seed(7)
    x_d = torch.nn.functional.dropout(x2, 0.5)  # the same mask
    W = base.dequantized_weight(torch.float32)
    ref = x2 @ W.T + lin.bias.detach() + 2.0 * (x_d @ A.T) @ B.T
    ref.square().sum().backward()
    torch.testing.assert_close(y.detach(), ref.detach(), **TOL[torch.float32])
    for got, want in [(x1.grad, x2.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)]:
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_lora_matches_peft_forward_and_gradients():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(32, 24)

        def forward(self, x):
            return self.q_proj(x)

    ref_model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], use_rslora=True))
    ours = Tiny()
    ours.load_state_dict({k.replace("base_layer.", ""): v for k, v in ref_model.base_model.model.state_dict().items()
                          if "lora" not in k})
    attach_adapters(ours, "qlora", ["q_proj"], rank=8, scale=16 / math.sqrt(8))
    peft_layer = ref_model.base_model.model.q_proj
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.normal_()
        peft_layer.lora_B["default"].weight.normal_()
        ours.q_proj.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.q_proj.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(4, 32)
    y_ref, y = ref_model(x), ours(x)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    y_ref.square().sum().backward()
    y.square().sum().backward()
    torch.testing.assert_close(ours.q_proj.lora_A.grad, peft_layer.lora_A["default"].weight.grad, **TOL[torch.float32])
    torch.testing.assert_close(ours.q_proj.lora_B.grad, peft_layer.lora_B["default"].weight.grad, **TOL[torch.float32])


def test_merge_equals_unmerged_and_is_idempotent():
    torch.manual_seed(2)
    lin = nn.Linear(32, 16)
    layer = LoRALinear(QuantLinear.from_linear(lin, compute_dtype=torch.float32), rank=4, scale=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    W = layer.base_layer.dequantized_weight(torch.float32)
    merged = layer.merged_weight(W)
    x = torch.randn(6, 32)
    torch.testing.assert_close(x @ merged.T + lin.bias.detach(), layer(x).detach(), **TOL[torch.float32])
    # merging is a function of (base, adapter): doing it twice from the same state gives the same weight,
    # and merging into the merged weight with a zero adapter changes nothing
    torch.testing.assert_close(layer.merged_weight(W), merged, atol=0, rtol=0)
    fresh = LoRALinear(nn.Linear(32, 16), rank=4, scale=0.5)
    torch.testing.assert_close(fresh.merged_weight(merged), merged, atol=0, rtol=0)


def test_rank_larger_than_layer_is_refused():
    from qtune.errors import QtuneError

    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 4))
    with pytest.raises(QtuneError, match="at most 4"):
        attach_adapters(model, "qlora", ["q_proj"], rank=5, scale=1.0)
    with pytest.raises(QtuneError, match="No linear layer matches"):
        attach_adapters(model, "qlora", ["nope"], rank=2, scale=1.0)
