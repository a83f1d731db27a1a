"""LoHa (FedPara, arXiv 2108.06098) and LoKr (KronA, arXiv 2212.10650) on an NF4 base: each equals the base
at init and matches its equation written here from the paper (outputs and gradients) and PEFT's layer on
the dequantized base; the merged weight gives the adapter's output; a tiny run trains, resumes exactly,
exports merged (plain transformers) and in PEFT's format (loaded by PEFT on the bitsandbytes 4-bit base folder,
dequantized: PEFT 0.21 cannot run either method on a Linear4bit), and the plan counts its parameters; a
--lokr-factor that does not divide a layer is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from conftest import SENTENCES, TOL, dense_weight, make_base
from qtune.adapters import attach_adapters
from qtune.adapters.loha import LoHaLinear
from qtune.adapters.lokr import LoKrLinear
from qtune.errors import QtuneError

LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
# (factor, rank, decompose_both) on a (out 64, in 96) layer -> the tensors PEFT's rules give:
# in 96 = 8·12, out 64 = 8·8 (most balanced); W₂ is low-rank when r < max(8, 12)/2 = 6, W₁ with
# decompose_both when r < max(8, 8)/2 = 4; factor 4: in 96 = 4·24, out 64 = 4·16.
LOKR_CASES = {
    "full": (-1, 8, False, {"lokr_w1": (8, 8), "lokr_w2": (8, 12)}),
    "w2-low-rank": (-1, 2, False, {"lokr_w1": (8, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 12)}),
    "both-low-rank": (-1, 2, True, {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8),
                                    "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 12)}),
    "factor-4": (4, 2, False, {"lokr_w1": (4, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 24)}),
}


# --- the equations, written from the papers ---------------------------------------------------------

def naive_loha(x, W, bias, w1a, w1b, w2a, w2b, s, x_adapter=None):
    """y = x Wᵀ + b + x̃ ΔWᵀ, ΔW = s·(W1a W1b) ⊙ (W2a W2b) (FedPara: the Hadamard product of two low-rank
    matrices); x̃ = x, or its dropout."""
    delta = s * (w1a @ w1b) * (w2a @ w2b)
    y = x @ W.T + (x if x_adapter is None else x_adapter) @ delta.T
    return y if bias is None else y + bias


def kronecker(w1, w2):
    """(W₁ ⊗ W₂)[i·b + j, k·d + l] = W₁[i, k]·W₂[j, l], by the definition (no torch.kron)."""
    (a, c), (b, d) = w1.shape, w2.shape
    return (w1[:, None, :, None] * w2[None, :, None, :]).reshape(a * b, c * d)


def naive_lokr(x, W, bias, w1, w2, s, x_adapter=None):
    """y = x Wᵀ + b + x̃ ΔWᵀ, ΔW = s·(W₁ ⊗ W₂) (KronA), the Kronecker product formed."""
    y = x @ W.T + (x if x_adapter is None else x_adapter) @ (s * kronecker(w1, w2)).T
    return y if bias is None else y + bias


def loha_eq(x, W, b, p, x_adapter=None):
    return naive_loha(x, W, b, *(p[n] for n in LOHA_NAMES), 2.0, x_adapter)


def lokr_eq(x, W, b, p, x_adapter=None):
    """W₁, W₂ from LoKr's tensors, multiplying out the low-rank ones, then the equation."""
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
    return naive_lokr(x, W, b, w1, w2, 2.0, x_adapter)


def randomize(layer, seed=5):
    """Trained-like (non-zero) values in every trainable tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_params().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def make_layer(method, base, case=None, scale=2.0, dropout=0.0):
    if method == "loha":
        return LoHaLinear(base, rank=3, scale=scale, dropout=dropout)
    factor, rank, both, _ = LOKR_CASES[case or "w2-low-rank"]
    return LoKrLinear(base, rank=rank, scale=scale, dropout=dropout, factor=factor, decompose_both=both)


def check_against_naive(layer, base, x, equation, dropped=None):
    """layer(x) and its gradients (x and every adapter tensor) against equation(x, W, b, params) on fresh
    leaves; `dropped(x)` gives the equation the layer's dropout of x (the same mask)."""
    W, b = dense_weight(base), None if base.bias is None else base.bias.detach().float()
    x1 = x.clone().requires_grad_()
    y = layer(x1)
    y.square().sum().backward()
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.adapter_params().items()}
    x2 = x.clone().requires_grad_()
    ref = equation(x2, W, b, params, None if dropped is None else dropped(x2))
    ref.square().sum().backward()
    torch.testing.assert_close(y.detach(), ref.detach(), **TOL[torch.float32])
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float32])
    for n, p in layer.adapter_params().items():
        torch.testing.assert_close(p.grad, params[n].grad, **TOL[torch.float32], msg=n)
    assert all(p.grad is None for p in base.parameters())


# --- the layers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_loha_equals_base_at_init_and_matches_the_equation(quantized, bias, one_thread):
    base = make_base("quant" if quantized else "dense", 96, 64, bias=bias)
    layer = make_layer("loha", base)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)  # W2b = 0: exactly the base
    assert layer.hada_w2_b.abs().sum() == 0 and all(getattr(layer, n).abs().sum() > 0 for n in LOHA_NAMES[:3])
    randomize(layer)
    check_against_naive(layer, base, x, loha_eq)


@pytest.mark.parametrize("case", list(LOKR_CASES))
@pytest.mark.parametrize("quantized", [True, False])
def test_lokr_equals_base_at_init_and_matches_the_equation(case, quantized, one_thread):
    base = make_base("quant" if quantized else "dense", 96, 64, bias=case != "full")
    layer = make_layer("lokr", base, case)
    assert {n: tuple(p.shape) for n, p in layer.adapter_params().items()} == LOKR_CASES[case][3]
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)  # W₁ (or W1a) = 0: exactly the base
    randomize(layer)
    check_against_naive(layer, base, x, lokr_eq)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_dropout_acts_on_the_adapter_input_only(method, one_thread):
    """y = x Wᵀ + b + drop(x) ΔWᵀ: the same mask (same seed) in the layer and in the equation."""
    base = make_base("quant", 96, 64)
    layer = make_layer(method, base, dropout=0.5).train()
    randomize(layer)
    x = torch.randn(4, 96)
    torch.manual_seed(11)
    eq = loha_eq if method == "loha" else lokr_eq

    def dropped(x2):
        torch.manual_seed(11)
        return nn.functional.dropout(x2, 0.5)

    check_against_naive(layer, base, x, eq, dropped)


@pytest.mark.parametrize("method, case", [("loha", None), *(("lokr", c) for c in LOKR_CASES)])
def test_merged_weight_gives_the_adapters_output(method, case, one_thread):
    base = make_base("quant", 96, 64)
    layer = make_layer(method, base, case)
    randomize(layer)
    W0, b = dense_weight(base), base.bias.detach()
    merged = layer.merge({"weight": W0, "bias": b})
    assert merged.keys() == {"weight", "bias"} and torch.equal(merged["bias"], b)
    x = torch.randn(6, 96)
    torch.testing.assert_close(x @ merged["weight"].T + b, layer(x).detach(), **TOL[torch.float32])
    torch.testing.assert_close(layer.delta_weight(W0), merged["weight"] - W0, **TOL[torch.float32])
    assert layer.delta_weight(W0).abs().max() > 1e-2


# --- PEFT parity on the dequantized base ------------------------------------------------------------

class OneLinear(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.q_proj = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.q_proj.weight.copy_(weight)
            self.q_proj.bias.copy_(bias)

    def forward(self, x):
        return self.q_proj(x)


def peft_config(method, case):
    import peft

    if method == "loha":
        return peft.LoHaConfig(r=3, alpha=6.0, target_modules=["q_proj"])
    factor, rank, both, _ = LOKR_CASES[case]
    return peft.LoKrConfig(r=rank, alpha=2.0 * rank, target_modules=["q_proj"], decompose_factor=factor,
                           decompose_both=both)


@pytest.mark.parametrize("method, case", [("loha", None), *(("lokr", c) for c in LOKR_CASES)])
def test_matches_peft_on_the_dequantized_base(method, case, one_thread):
    """The same tensors (PEFT's names and shapes, built from the same r / factor / decompose_both) and the same
    initial values from the same seed; with trained-like values, the same outputs and gradients (s = α/r = 2)."""
    peft = pytest.importorskip("peft")
    base = make_base("quant", 96, 64)
    plain = OneLinear(dense_weight(base), base.bias.detach())
    torch.manual_seed(3)
    ref = peft.get_peft_model(plain, peft_config(method, case))
    torch.manual_seed(3)
    layer = make_layer(method, base, case)
    peft_layer = ref.base_model.model.q_proj
    peft_params = {n.removesuffix(".default"): p for n, p in peft_layer.named_parameters() if p.requires_grad}
    ours = layer.adapter_params()
    assert {n: p.shape for n, p in peft_params.items()} == {n: p.shape for n, p in ours.items()}
    for n, p in ours.items():
        torch.testing.assert_close(p, peft_params[n], atol=0, rtol=0, msg=n)  # PEFT's init, value for value
    randomize(layer)
    with torch.no_grad():
        for n, p in ours.items():
            peft_params[n].copy_(p)
    x = torch.randn(4, 7, 96)
    y_ref, y = ref(x), layer(x)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for n, p in ours.items():
        torch.testing.assert_close(p.grad, peft_params[n].grad, **TOL[torch.float32], msg=n)


# --- a tiny run: train, resume, export, plan --------------------------------------------------------

def run_config(model_dir, data, out, method):
    from qtune.config import TrainConfig

    return TrainConfig(model=str(model_dir), data=str(data), output=str(out), method=method, seq_len=32,
                       batch_size=2, rank=4, alpha=8, compute_dtype="float32", max_steps=4, eval_every=0,
                       save_every=2, keep_checkpoints=5, lr=1e-2, warmup_steps=0)


@pytest.fixture(scope="module", params=["loha", "lokr"])
def trained_run(request, tiny_llama, tmp_path_factory):
    """A tiny Llama (NF4 base) trained 4 steps in fp32 with checkpoints at steps 2 and 4."""
    from qtune.train import train

    tmp = tmp_path_factory.mktemp(f"run-{request.param}")
    data = tmp / "corpus.txt"
    data.write_text("\n".join(SENTENCES * 40))
    cfg = run_config(tiny_llama, data, tmp / "run", request.param)
    train(cfg, progress=False)
    return request.param, tmp / "run"


def test_tiny_run_trains_resumes_and_the_plan_counts_its_parameters(trained_run, tmp_path):
    from qtune.checkpoint import load_checkpoint
    from qtune.config import TrainConfig, load_run_yaml
    from qtune.export import load_run
    from qtune.plan import plan_memory
    from qtune.train import read_metrics, train

    method, run = trained_run
    cfg, model, *_ = load_run(run, progress=False, compute_dtype="float32")
    layers = [m for m in model.modules() if isinstance(m, (LoHaLinear, LoKrLinear))]
    assert len(layers) == 7 * 2  # every linear of the 2 decoder layers
    assert all(m.delta_weight().abs().max() > 1e-4 for m in layers)  # trained away from ΔW = 0
    if method == "lokr":  # r = 4: gate/up (out 128 = 8·16) and down (in 128 = 8·16) have W₂ low-rank
        assert {"lokr_w2_a" in dict(m.named_parameters()) for m in layers} == {True, False}
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan_memory(cfg).trainable_params == trained

    # resume: a copy of the run without its step-4 checkpoint continues from step 2 to the same adapter
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    train(TrainConfig.from_dict({**load_run_yaml(resumed), "output": str(resumed)}), resume=True, progress=False)
    rows = [r for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r][:2]  # kept, not re-run
    want = load_checkpoint(run / "checkpoints" / "step-000004")["adapter"]
    got = load_checkpoint(resumed / "checkpoints" / "step-000004")["adapter"]
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **TOL[torch.float32], msg=n)


def adapter_logits(run, ids):
    from qtune.export import load_run

    _, model, *_ = load_run(run, progress=False, compute_dtype="float32")
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12]])


def test_merged_export_loads_in_plain_transformers(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from qtune.export import export_merged

    _, run = trained_run
    out = export_merged(run, tmp_path / "merged", progress=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = merged(IDS).logits
    want = adapter_logits(run, IDS)
    err = (got - want).abs().max() / want.abs().max()
    assert err < 2e-3, f"relative logit difference {err:.2e}"  # fp16 rounding of the merged weights


def test_peft_export_loads_in_peft_on_the_dequantized_4bit_base(trained_run, tmp_path):
    """The PEFT-format adapter (PEFT's names, r / alpha / factor / decompose_both, so that PEFT builds the same
    shapes) loads with peft.PeftModel.from_pretrained and gives qtune's logits on the bitsandbytes 4-bit base
    folder, dequantized: PEFT 0.21 cannot run LoHa or LoKr on a Linear4bit itself (it sizes LoHa's tensors, and
    reshapes both methods' ΔW, from the packed weight's shape), so its layers run on the same NF4 weights
    dequantized (transformers' model.dequantize())."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from qtune.export import export_peft, load_run
    from qtune.loader import QuantSpec, quantized_cache_path, resolve_model_dir

    method, run = trained_run
    out = export_peft(run, tmp_path / "adapter", progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["r"] == 4 and config["alpha"] == 8
    assert config["rank_dropout"] == 0 and config["module_dropout"] == 0
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    if method == "lokr":
        assert config["decompose_factor"] == -1 and config["decompose_both"] is False
    _, model, _, model_dir, _ = load_run(run, progress=False, compute_dtype="float32")
    ours = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    base_dir = quantized_cache_path(resolve_model_dir(str(model_dir)), QuantSpec(4), torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # bitsandbytes 4-bit, as saved
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    base = base.dequantize()
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear
    loaded = peft.PeftModel.from_pretrained(base, out)
    theirs = {n.replace("base_model.model.", "", 1).replace(".default", ""): p.detach()
              for n, p in loaded.named_parameters() if "hada_" in n or "lokr_" in n}
    assert theirs.keys() == ours.keys()
    for n in ours:
        torch.testing.assert_close(theirs[n], ours[n], atol=0, rtol=0, msg=n)
    with torch.no_grad():
        got = loaded(IDS).logits
    torch.testing.assert_close(got, adapter_logits(run, IDS), atol=1e-4, rtol=1e-4)


def test_plan_counts_lokr_tensors_for_a_factor_and_a_low_rank(tiny_llama, tmp_path):
    """--lokr-factor 4 and r = 2 make every W₂ low-rank with other shapes than the default split: the plan
    (meta skeleton) counts what the built model trains."""
    from qtune.config import TrainConfig
    from qtune.model import build_model
    from qtune.plan import plan_memory

    cfg = TrainConfig(model=str(tiny_llama), data="x", output=str(tmp_path / "r"), method="lokr", lokr_factor=4,
                      rank=2, compute_dtype="float32")
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    layers = [m for m in model.modules() if isinstance(m, LoKrLinear)]
    assert len(layers) == 14 and all(m.lokr_w1.shape[0] == 4 and hasattr(m, "lokr_w2_a") for m in layers)
    assert plan_memory(cfg).trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- named errors -----------------------------------------------------------------------------------

def two_linears():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(64, 64))
    model.add_module("down_proj", nn.Linear(96, 64))
    return model


def test_a_lokr_factor_that_does_not_divide_a_layer_is_refused_by_name():
    model = two_linears()
    with pytest.raises(QtuneError, match=r"--lokr-factor 64 does not divide layer down_proj of shape "
                                         r"\(out 64, in 96\).*divides every target's dimensions \(2, 4, 8, 16, 32\)"):
        attach_adapters(model, "lokr", ["q_proj", "down_proj"], rank=2, scale=1.0, options={"factor": 64})
    assert type(model.q_proj) is nn.Linear  # refused before any layer was wrapped
    with pytest.raises(QtuneError, match=r"--lokr-factor 3 does not divide layer down_proj"):  # in 96, but not out 64
        attach_adapters(model, "lokr", ["down_proj"], rank=2, scale=1.0, options={"factor": 3})
    with pytest.raises(QtuneError, match="--lokr-factor 0 is not a Kronecker factor.*or -1"):
        attach_adapters(model, "lokr", ["q_proj"], rank=2, scale=1.0, options={"factor": 0})
    attach_adapters(model, "lokr", ["q_proj", "down_proj"], rank=2, scale=1.0, options={"factor": 32})
    assert model.down_proj.lokr_w1.shape == (32, 32)  # out 64 = 32·2, in 96 = 32·3


def test_loha_rank_larger_than_a_layer_is_refused():
    with pytest.raises(QtuneError, match="--rank 65 is larger than layer q_proj allows"):
        attach_adapters(two_linears(), "loha", ["q_proj"], rank=65, scale=1.0)


def test_the_plan_refuses_a_lokr_factor_the_run_would_refuse(tiny_llama):
    from qtune.config import TrainConfig
    from qtune.plan import plan_memory

    with pytest.raises(QtuneError, match=r"--lokr-factor 5 does not divide layer model\.layers\.0\.self_attn\.q_proj "
                                         r"of shape \(out 64, in 64\)"):
        plan_memory(TrainConfig(model=str(tiny_llama), method="lokr", lokr_factor=5, compute_dtype="float32"))
