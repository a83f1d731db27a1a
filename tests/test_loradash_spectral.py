"""LoRA-Dash (arXiv 2409.07999) and the spectral adapter (arXiv 2405.13952) on a 4-bit base.

LoRA-Dash: before its switch it is LoRA exactly; at the switch it picks W₀'s singular directions of largest
change rate δᵢ = |uᵢᵀΔWvᵢ|/(σᵢ + ε), computed here from a full SVD; after it the forward is the dense
W₀ + s·BA + Σ Δσⱼ ūⱼv̄ⱼᵀ; it trains across the switch on a tiny llama, exports merged, is counted by the plan,
and a run resumed before or after the switch ends with the uninterrupted run's adapter.
Spectral: spectral_init splits W into its top triplets and the residual; the layer on the quantized residual is
W up to the residual's quantization (exactly W at 16 bits), its forward is the dense equation for both variants,
the Cayley rotation is orthogonal, and the merge is its forward. Neither method has a PEFT format."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtune.adapters
import qtune.model
from conftest import TOL, dense_weight, make_base
from method_runs import logits, merged_export_error, resumed_checkpoint, run_cfg, started
from qtune.adapters import adapter_layers
from qtune.adapters.lora import LoRALinear
from qtune.adapters.loradash import LoRADashLinear
from qtune.adapters.spectral import SpectralLinear, cayley, spectral_init
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.export import export_peft, load_run
from qtune.plan import plan_memory
from qtune.train import train
from quant import QuantLinear

FP32 = TOL[torch.float32]



def grads(out: torch.Tensor, *tensors: torch.Tensor, seed: int = 2):
    torch.manual_seed(seed)
    return torch.autograd.grad((out * torch.randn_like(out)).sum(), tensors)


def randomized(*params: torch.Tensor, seed: int = 1, std: float = 0.1) -> None:
    """Trained-like values for parameters that start at zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0, std)


# --- LoRA-Dash ------------------------------------------------------------------------------------------

def dash_layer(kind: str = "quant", k: int = 64, d: int = 48, r: int = 4, steps: int = 3, directions: int = 5):
    layer = LoRADashLinear(make_base(kind, k, d), rank=r, scale=2.0, steps=steps, directions=directions)
    randomized(layer.lora_A, layer.lora_B, layer.dash_sigma)
    return layer


def naive_top_directions(w0: torch.Tensor, delta: torch.Tensor, s: int):
    """The paper's δᵢ = |uᵢᵀ·ΔW·vᵢ| / (σᵢ + ε) over W₀'s full SVD, one direction at a time; the s largest."""
    U, S, Vh = torch.linalg.svd(w0.double(), full_matrices=False)
    rate = torch.stack([(U[:, i] @ delta.double() @ Vh[i]).abs() / (S[i] + 1e-6) for i in range(S.numel())])
    index = torch.argsort(rate, descending=True)[:s]
    return index, U[:, index].T.float(), Vh[index].float(), S


def test_loradash_before_the_switch_is_lora_exactly(one_thread):
    dash = dash_layer()
    lora = LoRALinear(dash.base_layer, rank=4, scale=2.0)
    with torch.no_grad():
        lora.lora_A.copy_(dash.lora_A)
        lora.lora_B.copy_(dash.lora_B)
    assert dash.dash_sigma.abs().sum() > 0  # Δσ is set, and must not be read before the switch
    x = torch.randn(2, 5, 64)
    got, want = dash(x), lora(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for g, w in zip(grads(got, dash.lora_A, dash.lora_B), grads(want, lora.lora_A, lora.lora_B)):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    dash(x).sum().backward()
    assert dash.dash_sigma.grad is None  # no gradient: the optimizer leaves Δσ alone until the switch
    torch.testing.assert_close(dash.delta_weight(), lora.delta_weight(), atol=0, rtol=0)


def test_loradash_switch_chooses_the_directions_of_largest_change_rate_of_w0(one_thread):
    layer = dash_layer(steps=3, directions=5)
    w0 = dense_weight(layer.base_layer)
    LoRADashLinear.after_step({"l": layer}, 2)
    assert not layer.dash_switched and layer.dash_U.abs().sum() == 0
    LoRADashLinear.after_step({"l": layer}, 3)
    assert layer.dash_switched and layer.dash_sigma.abs().sum() == 0  # Δσ starts at zero

    delta = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()  # ΔW = s·BA at the switch
    index, u_bar, v_bar, S = naive_top_directions(w0, delta, 5)
    assert layer.dash_index.tolist() == index.tolist()
    assert index.tolist() != list(range(5))  # δ is not the order of σ: these are not W₀'s top directions
    for j in range(5):  # ūⱼv̄ⱼᵀ (the SVD's sign of each pair is arbitrary, their product is not)
        torch.testing.assert_close(torch.outer(layer.dash_U[j], layer.dash_V[j]), torch.outer(u_bar[j], v_bar[j]),
                                   atol=1e-5, rtol=1e-4)
    # they are W₀'s singular pairs: ūⱼᵀ W₀ v̄ⱼ = σ_{iⱼ}
    torch.testing.assert_close((layer.dash_U @ w0 * layer.dash_V).sum(-1), S[index].float(), **FP32)

    kept = layer.dash_U.clone()  # a second call at the same step (a resumed run) changes nothing
    LoRADashLinear.after_step({"l": layer}, 3)
    torch.testing.assert_close(layer.dash_U, kept, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["quant", "dense"])
def test_loradash_after_the_switch_equals_the_dense_equation(kind, one_thread):
    layer = dash_layer(kind)
    LoRADashLinear.after_step({"l": layer}, 3)
    randomized(layer.lora_A, layer.lora_B, layer.dash_sigma, seed=5)  # trained-like after the switch
    w0, bias = dense_weight(layer.base_layer), layer.base_layer.bias.float()
    A, B, sigma = (p.detach().clone().requires_grad_(True) for p in (layer.lora_A, layer.lora_B, layer.dash_sigma))
    dash = sum(sigma[j] * torch.outer(layer.dash_U[j], layer.dash_V[j]) for j in range(5))  # Σ Δσⱼ ūⱼv̄ⱼᵀ
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64, requires_grad=True)
    got = layer(x)
    want = x @ (w0 + 2.0 * B @ A + dash).T + bias
    torch.testing.assert_close(got, want, **FP32)
    for g, w in zip(grads(got, x, layer.lora_A, layer.lora_B, layer.dash_sigma), grads(want, x, A, B, sigma)):
        torch.testing.assert_close(g, w, **FP32)
    torch.testing.assert_close(layer.delta_weight(w0), (2.0 * B @ A + dash).detach(), **FP32)
    torch.testing.assert_close(F.linear(x, layer.merged_weight(w0), bias), got, **FP32)  # merged = forward
    if kind == "dense":
        return
    y = layer(x.detach().bfloat16())  # bf16 activations on the NF4 base, fp32 parameters
    assert y.dtype == torch.bfloat16 and layer.dash_sigma.dtype == torch.float32
    torch.testing.assert_close(y.float(), got.detach(), **TOL[torch.bfloat16])


def test_loradash_counts_its_trainable_tensors_and_refuses_bad_options():
    layer = LoRADashLinear(make_base("dense", 64, 48), rank=4, scale=1.0, steps=5, directions=6)
    sizes = LoRADashLinear.trainable_sizes(layer.base_layer, 4, {"steps": 5, "directions": 6})
    assert sorted(sizes) == sorted(p.numel() for p in layer.adapter_params().values()) == [6, 4 * 48, 4 * 64]
    state = LoRADashLinear.state_sizes(layer.base_layer, 4, {"steps": 5, "directions": 6})  # what the plan adds
    buffers = [b for n, b in layer.named_buffers() if n in ("dash_U", "dash_V", "dash_index")]
    assert 4 * sum(state) == sum(b.nbytes for b in buffers)
    model = nn.ModuleDict({"a": nn.Linear(64, 96), "b": nn.Linear(96, 40)})
    LoRADashLinear.check(model, ["a", "b"], 4, {"steps": 1, "directions": 40})
    too_many = r"--dash-directions 41 .*layer b has \(at most 40.*Pass a smaller --dash-directions"
    with pytest.raises(QtuneError, match=too_many):
        LoRADashLinear.check(model, ["a", "b"], 4, {"steps": 1, "directions": 41})
    with pytest.raises(QtuneError, match=r"--dash-steps must be at least 1.*got 0.*--dash-steps 100"):
        LoRADashLinear.check(model, ["a", "b"], 4, {"steps": 0, "directions": 8})
    with pytest.raises(QtuneError, match=r"--dash-directions must be at least 1, got 0"):
        LoRADashLinear.check(model, ["a", "b"], 4, {"steps": 1, "directions": 0})
    with pytest.raises(QtuneError, match=r"--rank 41 is larger than layer b"):
        LoRADashLinear.check(model, ["a", "b"], 41, {})


@pytest.fixture
def dash_options(monkeypatch):
    """--dash-steps/--dash-directions reach the layers (qtune.adapters.layer_options does not pass them yet)."""
    own = qtune.adapters.layer_options

    def options(method, cfg):
        if method != "loradash":
            return own(method, cfg)
        return {"steps": cfg.dash_steps or 100, "directions": cfg.dash_directions or 8, **own(method, cfg)}

    monkeypatch.setattr(qtune.adapters, "layer_options", options)
    monkeypatch.setattr(qtune.model, "layer_options", options)


def test_loradash_trains_across_the_switch_exports_merged_and_resumes_on_either_side(tiny_llama, corpus, tmp_path,
                                                                                    dash_options):
    from safetensors.torch import load_file

    cfg = run_cfg(tiny_llama, corpus, tmp_path / "run", method="loradash", dash_steps=2, dash_directions=3,
                  save_every=1, keep_checkpoints=4)
    train(cfg, progress=False)
    ckpt = {s: load_file(tmp_path / "run" / "checkpoints" / f"step-{s:06d}" / "adapter.safetensors") for s in (1, 2, 3)}
    flags = [k for k in ckpt[1] if k.endswith("dash_switched")]
    assert len(flags) == 14  # every linear of the tiny llama
    assert not any(ckpt[1][k] for k in flags) and all(ckpt[2][k] for k in flags)  # switched after step 2
    sigmas = [k for k in ckpt[1] if k.endswith("dash_sigma")]
    assert all(ckpt[2][k].abs().sum() == 0 and ckpt[3][k].abs().min() > 0 for k in sigmas)  # learned from step 3

    _, ours, *_ = load_run(tmp_path / "run", progress=False, compute_dtype="float32")
    layers = adapter_layers(ours)
    assert len(layers) == 14 and all(type(m) is LoRADashLinear and m.dash_switched for m in layers.values())
    want = logits(ours)

    assert plan_memory(cfg).trainable_params == started(tmp_path / "run")["trainable_params"] == sum(
        p.numel() for m in layers.values() for p in m.adapter_params().values())

    err = merged_export_error(tmp_path / "run", tmp_path / "merged", want)
    assert err < 2e-3, f"relative logit difference {err:.2e}"
    with pytest.raises(QtuneError, match="PEFT has no format for method 'loradash'"):
        export_peft(tmp_path / "run", tmp_path / "adapter", progress=False)

    # resumed before the switch (from step 1: the switch is recomputed) and after it (from step 3: the saved
    # directions are used): the same step-4 adapter as the uninterrupted run
    final = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "adapter.safetensors")
    for resume_from in (1, 3):
        out = tmp_path / f"resumed-{resume_from}"
        shutil.copytree(tmp_path / "run", out)
        for s in range(resume_from + 1, 5):
            shutil.rmtree(out / "checkpoints" / f"step-{s:06d}")
        train(TrainConfig.from_dict({**cfg.to_dict(), "output": str(out)}), resume=True, progress=False)
        got = load_file(out / "checkpoints" / "step-000004" / "adapter.safetensors")
        assert got.keys() == final.keys()
        for key in final:
            torch.testing.assert_close(got[key], final[key], atol=0, rtol=0, msg=f"{key} from step {resume_from}")


# --- spectral adapter -----------------------------------------------------------------------------------

def spectral_weight(d: int = 48, k: int = 64, seed: int = 0) -> torch.Tensor:
    """A weight with a decaying spectrum (as trained weights have), so a randomized SVD finds its top part."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(k, d, generator=gen))
    return (U * torch.logspace(0, -2, d)) @ V.T  # (d, k), σ from 1 down to 0.01


def spectral_layer(kind: str, variant: str, r: int = 4, seed: int = 0):
    """(layer on the residual of W (NF4 or dense), W, bias) with its factors loaded."""
    w = spectral_weight(seed=seed)
    U1, S1, V1, residual = spectral_init(w, r, niter=0)
    torch.manual_seed(seed)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(residual)
    lin.requires_grad_(False)
    base = QuantLinear.from_linear(lin, "nf4", compute_dtype=torch.float32) if kind == "quant" else lin
    layer = SpectralLinear(base, rank=r, scale=2.0, variant=variant)
    layer.set_spectral_factors(U1, S1, V1)
    return layer, w, lin.bias.detach().float()


def test_spectral_init_splits_w_into_its_top_triplets_and_the_residual(one_thread):
    w = spectral_weight()
    U1, S1, V1, residual = spectral_init(w, 6, niter=0)
    assert U1.shape == (48, 6) and S1.shape == (6,) and V1.shape == (64, 6) and residual.shape == (48, 64)
    torch.testing.assert_close(residual + U1 @ torch.diag(S1) @ V1.T, w, **FP32)
    torch.testing.assert_close(U1.T @ U1, torch.eye(6), **FP32)
    torch.testing.assert_close(V1.T @ V1, torch.eye(6), **FP32)
    exact = torch.linalg.svdvals(w)
    torch.testing.assert_close(S1, exact[:6], **FP32)
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:4], exact[6:10], **FP32)  # U₂S₂V₂ᵀ remains
    # randomized (4 power iterations), its sketch drawn from the generator: reproducible, close to the exact SVD
    a = spectral_init(w, 6, niter=4, generator=torch.Generator().manual_seed(7))
    b = spectral_init(w, 6, niter=4, generator=torch.Generator().manual_seed(7))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    torch.testing.assert_close(a[1], exact[:6], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(a[3] + a[0] @ torch.diag(a[1]) @ a[2].T, w, **FP32)


@pytest.mark.parametrize("variant", ["additive", "rotate"])
def test_a_new_spectral_layer_is_w_up_to_the_residuals_quantization(variant, one_thread):
    x = torch.randn(3, 7, 64)
    dense, w, bias = spectral_layer("dense", variant)  # --bits 16: exactly W
    torch.testing.assert_close(dense(x), x @ w.T + bias, **FP32)
    quant, w, bias = spectral_layer("quant", variant)
    _, _, _, residual = spectral_init(w, 4, niter=0)
    quant_error = dense_weight(quant.base_layer) - residual  # D(Q(W_res)) − W_res
    assert quant_error.abs().max() > 1e-4  # (the NF4 base is not the residual itself)
    torch.testing.assert_close(quant(x), x @ (w + quant_error).T + bias, **FP32)


def naive_cayley(P: torch.Tensor) -> torch.Tensor:
    K = (P - P.T) / 2
    eye = torch.eye(P.shape[0])
    return (eye - K) @ torch.inverse(eye + K)


@pytest.mark.parametrize("variant", ["additive", "rotate"])
def test_spectral_forward_equals_the_dense_equation(variant, one_thread):
    layer, _, bias = spectral_layer("quant", variant)
    names = ("spectral_A_U", "spectral_A_V") if variant == "additive" else ("spectral_P_U", "spectral_P_V")
    params = [getattr(layer, n) for n in names]
    randomized(*params, std=0.1 if variant == "additive" else 0.5)
    w_res = dense_weight(layer.base_layer)
    U1, S1, V1 = layer.spectral_U, layer.spectral_S, layer.spectral_V
    p_u, p_v = (p.detach().clone().requires_grad_(True) for p in params)
    if variant == "additive":  # [U₁ + A_U] S [V₁ + A_V]ᵀ
        top = (U1 + p_u) @ torch.diag(S1) @ (V1 + p_v).T
    else:  # [U₁R_U] S [V₁R_V]ᵀ
        top = U1 @ naive_cayley(p_u) @ torch.diag(S1) @ naive_cayley(p_v).T @ V1.T
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64, requires_grad=True)
    got = layer(x)
    want = x @ (w_res + top).T + bias
    torch.testing.assert_close(got, want, **FP32)
    for g, w in zip(grads(got, x, *params), grads(want, x, p_u, p_v)):
        torch.testing.assert_close(g, w, **FP32)
    torch.testing.assert_close(layer.delta_weight(w_res), top.detach(), **FP32)
    torch.testing.assert_close(F.linear(x, layer.merged_weight(w_res), bias), got, **FP32)  # merged = forward
    y = layer(x.detach().bfloat16())
    assert y.dtype == torch.bfloat16 and params[0].dtype == torch.float32
    torch.testing.assert_close(y.float(), got.detach(), **TOL[torch.bfloat16])


def test_the_cayley_rotation_is_orthogonal_and_keeps_the_singular_vectors_orthonormal(one_thread):
    torch.manual_seed(0)
    P = torch.randn(6, 6)
    R = cayley(P)
    torch.testing.assert_close(R.T @ R, torch.eye(6), **FP32)
    assert abs(torch.linalg.det(R).item() - 1) < 1e-5
    torch.testing.assert_close(R, naive_cayley(P), **FP32)
    torch.testing.assert_close(cayley(torch.zeros(6, 6)), torch.eye(6), atol=0, rtol=0)  # R = I at the start
    layer, _, _ = spectral_layer("dense", "rotate")
    randomized(layer.spectral_P_U, layer.spectral_P_V, std=1.0)
    U, V = layer.tuned_vectors()
    torch.testing.assert_close(U.T @ U, torch.eye(4), **FP32)
    torch.testing.assert_close(V.T @ V, torch.eye(4), **FP32)
    # the rotation keeps the singular values: ΔW's are S₁'s (the additive form does not)
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight())[:4], layer.spectral_S, **FP32)


@pytest.mark.parametrize("variant, sizes", [("additive", [48 * 4, 64 * 4]), ("rotate", [16, 16])])
def test_spectral_counts_its_trainable_tensors(variant, sizes):
    layer = SpectralLinear(make_base("dense", 64, 48), rank=4, scale=1.0, variant=variant)
    assert SpectralLinear.trainable_sizes(layer.base_layer, 4, {"variant": variant}) == sizes
    assert [p.numel() for p in layer.adapter_params().values()] == sizes
    state = SpectralLinear.state_sizes(layer.base_layer, 4, {"variant": variant})  # the frozen U₁, S₁, V₁
    assert 4 * sum(state) == sum(b.nbytes for n, b in layer.named_buffers() if n.startswith("spectral_"))


def test_spectral_refuses_what_it_cannot_run():
    with pytest.raises(QtuneError, match=r"Unknown --spectral-variant 'scaled'.*additive or rotate"):
        SpectralLinear(make_base("dense", 64, 48), rank=4, scale=1.0, variant="scaled")
    model = nn.ModuleDict({"a": nn.Linear(64, 96), "b": nn.Linear(96, 40)})
    with pytest.raises(QtuneError, match=r"Unknown --spectral-variant 'scaled'"):
        SpectralLinear.check(model, ["a"], 4, {"variant": "scaled"})
    with pytest.raises(QtuneError, match=r"--rank 41 is larger than layer b .*at most 40"):
        SpectralLinear.check(model, ["a", "b"], 41, {"variant": "additive"})
    layer = SpectralLinear(make_base("dense", 64, 48), rank=4, scale=1.0)
    with pytest.raises(QtuneError, match=r"shape \(48, 3\) do not fit this layer \(expected \(48, 4\)\)"):
        layer.set_spectral_factors(torch.zeros(48, 3), torch.zeros(3), torch.zeros(64, 3))
    with pytest.raises(QtuneError, match=r"The spectral adapter of q has no singular vectors.*spectral_init"):
        SpectralLinear.start_training({"q": layer}, 10, None)


def test_a_spectral_model_at_16_bits_starts_as_the_original_model(tiny_llama, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from qtune.model import build_model

    cfg = run_cfg(tiny_llama, corpus, tmp_path / "run", method="spectral", bits=16, pissa_niter=0)
    model, *_ = build_model(cfg, None, progress=False)
    layers = adapter_layers(model)
    assert len(layers) == 14 and all(type(m) is SpectralLinear and m.spectral_S.any() for m in layers.values())
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.eval()
    torch.testing.assert_close(logits(model), logits(original), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["additive", "rotate"])
def test_spectral_trains_exports_merged_and_resumes(tiny_llama, corpus, tmp_path, variant):
    pass

    cfg = run_cfg(tiny_llama, corpus, tmp_path / "run", method="spectral", spectral_variant=variant, lr=2e-2)
    train(cfg, progress=False)
    _, ours, *_ = load_run(tmp_path / "run", progress=False, compute_dtype="float32")
    layers = adapter_layers(ours)
    assert len(layers) == 14 and all(m.variant == variant and m.spectral_S.any() for m in layers.values())
    assert all(max(p.abs().max() for p in m.adapter_params().values()) > 1e-3 for m in layers.values())  # all moved
    want = logits(ours)

    assert plan_memory(cfg).trainable_params == started(tmp_path / "run")["trainable_params"] == sum(
        p.numel() for m in layers.values() for p in m.adapter_params().values())

    err = merged_export_error(tmp_path / "run", tmp_path / "merged", want)
    assert err < 2e-3, f"relative logit difference {err:.2e}"
    with pytest.raises(QtuneError, match="PEFT has no format for method 'spectral'"):
        export_peft(tmp_path / "run", tmp_path / "adapter", progress=False)

    # resume from step 2: the saved residual base and factors are reloaded, not recomputed
    a, b = resumed_checkpoint(tmp_path / "run", cfg, 4, tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) == 28
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0)
