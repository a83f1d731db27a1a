"""DoRALinear (qtune/adapters/dora.py) against the paper's equation, PEFT, and its own merge; the
engine's fused node (qtune.engine.fused.DoRANode) against the same equation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.dora import DoRALinear
from qtune.engine import linear as engine_linear
from qtune.engine.fused import foldable
from quant import QuantLinear
import conftest
from conftest import TOL, dense_weight

IN, OUT, RANK, SCALE = 64, 48, 4, 2.0
FP32 = TOL[torch.float32]


def make_base(kind: str, bias: bool = True, seed: int = 0) -> nn.Module:
    """"quant" (in = 64: DoRA's scale folds into the NF4 block scales), "quant_unaligned" (in = 40:
    blocks straddle rows, so the activations are scaled instead) or "dense"."""
    if kind == "quant_unaligned":
        return conftest.make_base("quant", 40, OUT, bias, seed)
    return conftest.make_base(kind, IN, OUT, bias, seed)



def randomize_(layer: DoRALinear, seed: int = 1) -> DoRALinear:
    """Non-zero B and a magnitude away from ‖W‖, so every gradient and every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
        layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    return layer


def naive_dora(x, weight, bias, A, B, m, scale, detach_norm):
    """The paper's eq. 5 written out: W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row, y = x W'ᵀ + b."""
    v = weight + scale * B @ A  # (out, in)
    n = v.norm(dim=1, keepdim=True)  # (out, 1)
    if detach_norm:
        n = n.detach()
    w_prime = m[:, None] * v / n
    return F.linear(x, w_prime, bias)


def forward(layer, x, form: str):
    """The reference forward (the module's own) or the engine's eager fast form of it."""
    return layer(x) if form == "reference" else engine_linear.eager(layer, x)


def grads_of(y, grad_out, tensors):
    return torch.autograd.grad(y, tensors, grad_out)


@pytest.mark.parametrize("kind", ["quant", "dense"])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_base_at_init(kind, bias):
    base = make_base(kind, bias)
    layer = DoRALinear(base, RANK, SCALE)
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(layer(x), base(x), **FP32)
    torch.testing.assert_close(layer.magnitude, dense_weight(base).norm(dim=1), **FP32)


@pytest.mark.parametrize("form", ["reference", "fused"])
@pytest.mark.parametrize("kind", ["quant", "quant_unaligned", "dense"])
@pytest.mark.parametrize("detach_norm", [False, True])
def test_matches_naive_reference_forward_and_grads(kind, detach_norm, form):
    base = make_base(kind)
    assert foldable(base) == (kind == "quant")  # both of the fused node's paths are covered
    layer = randomize_(DoRALinear(base, RANK, SCALE, detach_norm=detach_norm))
    x = torch.randn(3, 5, base.in_features, requires_grad=True)
    y = forward(layer, x, form)
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    A, B, m = (p.detach().clone().requires_grad_(True) for p in params)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = naive_dora(x_ref, dense_weight(base), base.bias, A, B, m, SCALE, detach_norm)
    torch.testing.assert_close(y, y_ref, **FP32)

    grad_out = torch.randn_like(y)
    got = grads_of(y, grad_out, params + [x])
    want = grads_of(y_ref, grad_out, [A, B, m, x_ref])
    for name, g, w in zip(["A", "B", "magnitude", "x"], got, want):
        assert g.abs().max() > 0, f"gradient of {name} is zero: the test would prove nothing"
        torch.testing.assert_close(g, w, **FP32, msg=lambda s: f"grad of {name}: {s}")


def test_detached_norm_changes_gradients():
    """Sanity of the previous test: detaching n really is a different gradient (DoRA §4.3)."""
    layers = [randomize_(DoRALinear(make_base("dense"), RANK, SCALE, detach_norm=d)) for d in (False, True)]
    x = torch.randn(4, IN)
    gB = [grads_of(layer(x), torch.ones(4, OUT), [layer.lora_B])[0] for layer in layers]
    assert not torch.allclose(gB[0], gB[1], atol=1e-4)


def test_quantized_equals_same_computation_on_dequantized_weight():
    """torchtune's test_qdora_parity: DoRA(QuantLinear) == DoRA(nn.Linear holding D(Q(W)))."""
    qbase = make_base("quant")
    dbase = nn.Linear(IN, OUT).requires_grad_(False)
    with torch.no_grad():
        dbase.weight.copy_(qbase.dequantized_weight(torch.float32))
        dbase.bias.copy_(qbase.bias)
    q = randomize_(DoRALinear(qbase, RANK, SCALE, detach_norm=False))
    d = DoRALinear(dbase, RANK, SCALE, detach_norm=False)
    d.load_state_dict({k: v for k, v in q.state_dict().items() if not k.startswith("base_layer")}, strict=False)
    x = torch.randn(2, 7, IN, requires_grad=True)
    yq, yd = q(x), d(x)
    torch.testing.assert_close(yq, yd, **FP32)
    grad_out = torch.randn_like(yq)
    for gq, gd in zip(grads_of(yq, grad_out, [q.lora_A, q.lora_B, q.magnitude, x]),
                      grads_of(yd, grad_out, [d.lora_A, d.lora_B, d.magnitude, x])):
        torch.testing.assert_close(gq, gd, **FP32)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_peft_dora(dropout):
    """Same A, B, magnitude as PEFT's DoRA (use_dora=True) → same output and gradients, dropout included.

    PEFT names the magnitude `lora_magnitude_vector.<adapter>.weight` in the model and
    `<module>.lora_magnitude_vector` in adapter_model.safetensors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    ours = DoRALinear(copy.deepcopy(lin).requires_grad_(False), RANK, SCALE, dropout=dropout)
    config = LoraConfig(r=RANK, lora_alpha=SCALE * RANK, target_modules=["0"], use_dora=True, lora_dropout=dropout)
    peft_model = get_peft_model(nn.Sequential(lin), config)
    p = dict(peft_model.named_parameters())
    pA, pB = p["base_model.model.0.lora_A.default.weight"], p["base_model.model.0.lora_B.default.weight"]
    pm = p["base_model.model.0.lora_magnitude_vector.default.weight"]
    torch.testing.assert_close(ours.magnitude, pm, **FP32)  # same init: ‖W‖ per output feature

    randomize_(ours)
    with torch.no_grad():
        pA.copy_(ours.lora_A), pB.copy_(ours.lora_B), pm.copy_(ours.magnitude)
    ours.train(), peft_model.train()
    x = torch.randn(3, 6, IN, requires_grad=True)
    torch.manual_seed(123)  # both draw one dropout mask of x's shape
    y = ours(x)
    torch.manual_seed(123)
    y_peft = peft_model(x)
    torch.testing.assert_close(y, y_peft, **FP32)
    grad_out = torch.randn_like(y)
    for g, w in zip(grads_of(y, grad_out, [ours.lora_A, ours.lora_B, ours.magnitude, x]),
                    grads_of(y_peft, grad_out, [pA, pB, pm, x])):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, **FP32)


@pytest.mark.parametrize("kind", ["quant", "dense"])
def test_merged_weight_is_naive_w_prime_and_merge_is_idempotent(kind):
    base = make_base(kind)
    layer = randomize_(DoRALinear(base, RANK, SCALE))
    W = dense_weight(base)
    merged = layer.merged_weight(W)
    v = W + SCALE * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(merged, layer.magnitude.detach()[:, None] * v / v.norm(dim=1, keepdim=True), **FP32)

    x = torch.randn(4, 3, IN)
    unmerged = layer(x)
    torch.testing.assert_close(F.linear(x, merged, base.bias), unmerged, **FP32)  # merged ≈ unmerged

    # a DoRA layer on the merged weight, fresh (B = 0, m = ‖W'‖), is the same function, and merges to W' again
    merged_base = nn.Linear(IN, OUT).requires_grad_(False)
    with torch.no_grad():
        merged_base.weight.copy_(merged), merged_base.bias.copy_(base.bias)
    fresh = DoRALinear(merged_base, RANK, SCALE)
    torch.testing.assert_close(fresh(x), unmerged, **FP32)
    torch.testing.assert_close(fresh.merged_weight(merged), merged, **FP32)


def test_reset_magnitude_makes_layer_equal_w_plus_delta():
    """What the loader does after PiSSA/LoftQ put non-zero factors in A and B."""
    base = make_base("quant")
    layer = randomize_(DoRALinear(base, RANK, SCALE))
    layer.reset_magnitude()
    x = torch.randn(5, IN)
    want = F.linear(x, dense_weight(base) + layer.lora_delta().detach(), base.bias)
    torch.testing.assert_close(layer(x), want, **FP32)


def test_bf16_activations_close_to_fp32():
    base = make_base("quant")
    layer = randomize_(DoRALinear(base, RANK, SCALE))
    x = torch.randn(4, 8, IN)
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and layer.magnitude.dtype == torch.float32
    torch.testing.assert_close(y16.float(), layer(x), **TOL[torch.bfloat16])


def test_dropout_only_in_training_and_any_input_rank():
    """Eval ignores dropout (same function as dropout 0); a 1-D input works in both modes."""
    base = make_base("quant")
    with_dropout = randomize_(DoRALinear(base, RANK, SCALE, dropout=0.5))
    without = randomize_(DoRALinear(base, RANK, SCALE))
    x = torch.randn(IN)
    torch.testing.assert_close(with_dropout.eval()(x), without(x), **FP32)
    y = with_dropout.train()(x)
    assert y.shape == (OUT,) and not torch.allclose(y, without(x))


@pytest.mark.parametrize("form", ["reference", "fused"])
def test_small_magnitude_changes_reach_a_bf16_output(form):
    """m/n − 1 is kept apart from 1: a 0.3% magnitude change must move bf16 outputs (rounding m/n
    itself to bf16 snaps 1.003 to 1.0, and the magnitude then has no effect at all)."""
    from qtune.adapters.dora import DoRALinear
    from quant import QuantLinear

    torch.manual_seed(0)
    layer = DoRALinear(QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False), compute_dtype=torch.bfloat16),
                       rank=4, scale=1.0)
    x = torch.randn(16, 64, dtype=torch.bfloat16) * 3
    with torch.no_grad():
        before = forward(layer, x, form)
        layer.magnitude.mul_(1.003)
        after = forward(layer, x, form)
    assert (after != before).float().mean() > 0.2


@pytest.mark.parametrize("form", ["reference", "fused"])
@pytest.mark.parametrize("kind", ["quant", "quant_unaligned"])
def test_a_zero_magnitude_keeps_its_gradient(kind, form):
    """The folded path reads dL/dm from y = c ⊙ u as Σ g ⊙ y / m; a row with m = 0 (c = 0 would lose u)
    still gets the naive equation's gradient, and its output stays 0 to fp32 precision."""
    base = make_base(kind)
    layer = randomize_(DoRALinear(base, RANK, SCALE))
    with torch.no_grad():
        layer.magnitude[[0, 5]] = 0.0
    x = torch.randn(4, 6, base.in_features)
    y = forward(layer, x, form)
    A, B, m = (p.detach().clone().requires_grad_(True) for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    y_ref = naive_dora(x, dense_weight(base), base.bias, A, B, m, SCALE, True)
    torch.testing.assert_close(y, y_ref, **FP32)
    grad_out = torch.randn_like(y)
    got = grads_of(y, grad_out, [layer.lora_A, layer.lora_B, layer.magnitude])
    want = grads_of(y_ref, grad_out, [A, B, m])
    assert want[2][[0, 5]].abs().min() > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32)
