"""AdaLoRA (arXiv 2303.10512): the reference forward equals x·W₀ᵀ + b + (α/r₀)·x·(P·diag(λ)·Q)ᵀ on the dequantized
NF4 weight and PEFT's SVDLinear (outputs, gradients); the orthogonality penalty, the importance scores on hand-made
gradients and the cubic budget equal the paper's formulas written here; fed the same gradients, PEFT's
RankAllocator (AdaLoraModel.update_and_allocate) makes the same masks, EMAs and λ, and its penalty is ours; a tiny
run prunes to the budget, reports and saves its ranks, exports merged and as a PEFT adapter that loads on the
bitsandbytes 4-bit base with the same logits, is counted by the plan, resumes mid-budget exactly, and refuses what
it cannot run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtune.adapters
import qtune.model
import method_runs
from conftest import TOL, dense_weight, make_base
from method_runs import logits, merged_export_error, resumed_checkpoint, started
from qtune.adapters import adapter_layers
from qtune.adapters.adalora import (BETA1, BETA2, ORTH_WEIGHT, RANKS_FILE, AdaLoRALinear, budget_at,
                                    default_rank_init, resolve_schedule)
from qtune.errors import QtuneError
from qtune.export import export_peft, load_run
from qtune.loader import QuantSpec, quantized_cache_path
from qtune.plan import plan_memory
from qtune.train import read_metrics, train

FP32 = TOL[torch.float32]
# PEFT 0.21 warns so on loading any AdaLoRA adapter with a rank_pattern, its own saves too (LoraModel's check of
# rank_pattern keys runs before AdaLoraModel resizes the layers by it, which it then does)
pytestmark = pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning")



def adalora_options(cfg) -> dict:
    """The options qtune.adapters.layer_options should pass for adalora (the diff asked of the lead)."""
    return {"rank_init": cfg.rank_init, "budget_start": cfg.budget_start, "budget_end": cfg.budget_end,
            "rslora": cfg.rslora}


@pytest.fixture
def options_passed(monkeypatch):
    """qtune.adapters.layer_options with adalora's options (model.py imported the name: patch both)."""
    real = qtune.adapters.layer_options

    def layer_options(method, cfg):
        return {**real(method, cfg), **adalora_options(cfg)} if method == "adalora" else real(method, cfg)

    monkeypatch.setattr(qtune.adapters, "layer_options", layer_options)
    monkeypatch.setattr(qtune.model, "layer_options", layer_options)


def trained_like(layer: AdaLoRALinear, seed: int = 1, masked: tuple[int, ...] = ()) -> AdaLoRALinear:
    """Random Q, P, λ (λ of the masked triplets zero, as after an allocation)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.3)
        layer.lora_B.normal_(0, 0.3)
        layer.lora_E.normal_(0, 1.0)
        layer.rank_mask[list(masked)] = False
    layer.apply_mask()
    return layer


def grads(out: torch.Tensor, *tensors: torch.Tensor, seed: int = 2):
    torch.manual_seed(seed)
    return torch.autograd.grad((out * torch.randn_like(out)).sum(), tensors)


# --- the equations ------------------------------------------------------------------------------

def test_forward_equals_p_diag_lambda_q_on_the_dequantized_weight(one_thread):
    alpha, r, r0 = 8.0, 4, 6
    layer = AdaLoRALinear(make_base("quant", 64, 48), rank=r, scale=alpha / r, rank_init=r0)
    trained_like(layer, masked=(1, 4))
    w0, bias = dense_weight(layer.base_layer), layer.base_layer.bias.float()
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64, requires_grad=True)
    got = layer(x)
    P = layer.lora_B.detach().clone().requires_grad_(True)    # (out, r₀)
    lam = layer.lora_E.detach()[:, 0].clone().requires_grad_(True)  # (r₀,)
    Q = layer.lora_A.detach().clone().requires_grad_(True)    # (r₀, in)
    delta = alpha / r0 * P @ torch.diag(lam) @ Q               # ΔW = (α/r₀)·P·diag(λ)·Q
    want = x @ (w0 + delta).T + bias
    torch.testing.assert_close(got, want, **FP32)
    g_ours = grads(got, x, layer.lora_B, layer.lora_E, layer.lora_A)
    g_want = grads(want, x, P, lam, Q)
    for g, w in zip(g_ours, g_want):
        torch.testing.assert_close(g.reshape(w.shape), w, **FP32)
    torch.testing.assert_close(layer.delta_weight(w0), delta.detach(), **FP32)
    torch.testing.assert_close(F.linear(x, layer.merged_weight(w0), bias), got, **FP32)  # merged = forward
    assert layer.current_rank == 4 and layer.lora_E[[1, 4]].abs().sum() == 0


def test_a_new_layer_is_the_base_and_has_rank_init_rows():
    layer = AdaLoRALinear(make_base("quant", 64, 48), rank=4, scale=2.0)
    assert layer.rank_init == 6 and layer.lora_A.shape == (6, 64) and layer.lora_B.shape == (48, 6)
    assert layer.lora_E.shape == (6, 1) and layer.lora_E.abs().sum() == 0 and layer.lora_A.abs().sum() > 0
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)
    assert sum(p.numel() for p in layer.adapter_params().values()) == sum(
        AdaLoRALinear.trainable_sizes(layer.base_layer, 4, {}))
    ema = [getattr(layer, b) for b in AdaLoRALinear.checkpoint_buffers if b.startswith(("sensitivity", "uncertainty"))]
    assert sum(t.numel() for t in ema) == sum(AdaLoRALinear.state_sizes(layer.base_layer, 4, {}))


def test_bf16_activations_use_fp32_parameters():
    layer = trained_like(AdaLoRALinear(make_base("quant", 64, 48), rank=4, scale=1.0))
    x = torch.randn(4, 64)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and layer.lora_E.dtype == torch.float32
    torch.testing.assert_close(y.float(), layer(x), **TOL[torch.bfloat16])


def test_orthogonality_penalty_is_the_mean_frobenius_norm_over_the_2n_matrices():
    layers = {n: trained_like(AdaLoRALinear(make_base("dense", k, d), rank=2, scale=1.0, rank_init=3), seed=s)
              for s, (n, k, d) in enumerate([("a", 16, 24), ("b", 24, 16), ("c", 8, 40)])}
    AdaLoRALinear.start_training(layers, total_steps=10, run_dir=None)
    got = sum(m.extra_loss() for m in layers.values())
    norms = []
    for m in layers.values():
        P, Q = m.lora_B, m.lora_A
        norms.append(((P.T @ P - torch.eye(3)) ** 2).sum().sqrt())  # ‖PᵀP − I‖_F
        norms.append(((Q @ Q.T - torch.eye(3)) ** 2).sum().sqrt())  # ‖QQᵀ − I‖_F
    want = ORTH_WEIGHT * sum(norms) / len(norms)
    torch.testing.assert_close(got, want, **FP32)
    params = [p for m in layers.values() for p in (m.lora_A, m.lora_B)]
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, **FP32)


def test_triplet_scores_on_hand_made_gradients():
    """Two steps of hand-made gradients on a 3→2 layer with r₀ = 2: Ī, Ū and S_i written out entry by entry."""
    layer = AdaLoRALinear(make_base("dense", 3, 2), rank=1, scale=1.0, rank_init=2)
    values = {"A": [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], "B": [[1.0, -2.0], [0.5, 3.0]], "E": [[2.0], [-1.0]]}
    steps = [{"A": [[0.1, 0.2, -0.3], [0.0, 1.0, 0.5]], "B": [[-1.0, 0.5], [2.0, 0.25]], "E": [[0.5], [4.0]]},
             {"A": [[1.0, -1.0, 0.0], [0.2, 0.2, 0.2]], "B": [[0.0, 1.0], [-3.0, 1.0]], "E": [[-2.0], [0.5]]}]
    avg = {f: [[0.0] * len(row) for row in values[f]] for f in values}
    unc = {f: [[0.0] * len(row) for row in values[f]] for f in values}
    with torch.no_grad():
        for f in values:
            getattr(layer, f"lora_{f}").copy_(torch.tensor(values[f]))
    for grad in steps:
        for f in values:
            getattr(layer, f"lora_{f}").grad = torch.tensor(grad[f])
            for i, row in enumerate(values[f]):
                for j, w in enumerate(row):
                    sens = abs(w * grad[f][i][j])                                    # I = |w·∇w|
                    avg[f][i][j] = BETA1 * avg[f][i][j] + (1 - BETA1) * sens        # Ī
                    unc[f][i][j] = BETA2 * unc[f][i][j] + (1 - BETA2) * abs(sens - avg[f][i][j])  # Ū
        layer.update_importance()
    s = {f: [[a * u for a, u in zip(ra, ru)] for ra, ru in zip(avg[f], unc[f])] for f in values}  # s = Ī·Ū
    # S_i = s(λ_i) + mean over P's column i + mean over Q's row i   (P = lora_B (out, r₀), Q = lora_A (r₀, in))
    want = [s["E"][i][0] + sum(s["B"][j][i] for j in range(2)) / 2 + sum(s["A"][i]) / 3 for i in range(2)]
    torch.testing.assert_close(layer.sensitivity_A, torch.tensor(avg["A"]), **FP32)
    torch.testing.assert_close(layer.uncertainty_B, torch.tensor(unc["B"]), **FP32)
    torch.testing.assert_close(layer.triplet_scores(), torch.tensor(want), **FP32)


def paper_budget(t: int, b0: int, bT: int, ti: int, te: int) -> int:
    """The paper's cubic schedule (§3.3): b⁰ for t ≤ t_i, bᵀ + (b⁰ − bᵀ)(1 − (t − t_i)/(T − t_i − t_f))³ in
    between (floored to whole triplets), bᵀ from T − t_f = t_e on."""
    if t <= ti:
        return b0
    if t >= te:
        return bT
    return int(bT + (b0 - bT) * (1 - (t - ti) / (te - ti)) ** 3)


def test_budget_follows_the_cubic_schedule_and_the_masks_keep_it():
    assert [budget_at(t, 60, 40, 5, 25) for t in range(31)] == [paper_budget(t, 60, 40, 5, 25) for t in range(31)]
    assert budget_at(6, 60, 40, 5, 25) == 57 and budget_at(15, 60, 40, 5, 25) == 42
    assert resolve_schedule(100, None, None) == (10, 70) and resolve_schedule(1, None, None) == (0, 1)
    assert resolve_schedule(100, 20, None) == (20, 70) and resolve_schedule(100, 80, None) == (80, 81)
    assert [default_rank_init(r) for r in (1, 3, 4, 8, 16)] == [2, 5, 6, 12, 24]
    # three layers, r₀ = 6 → r = 3: after every step the layers keep exactly b(t) triplets, λ zero elsewhere
    layers = {n: AdaLoRALinear(make_base("dense", k, d), rank=3, scale=1.0, rank_init=6, budget_start=2, budget_end=9)
              for n, k, d in [("a", 16, 24), ("b", 24, 16), ("c", 8, 40)]}
    AdaLoRALinear.start_training(layers, total_steps=12, run_dir=None)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 13):
        for m in layers.values():
            for p in m.adapter_params().values():
                p.grad = torch.randn(p.shape, generator=gen)
                with torch.no_grad():
                    p.sub_(0.1 * p.grad)  # an optimizer step
        AdaLoRALinear.after_step(layers, step)
        assert sum(m.current_rank for m in layers.values()) == paper_budget(step, 18, 9, 2, 9), step
        for m in layers.values():
            assert m.lora_E[~m.rank_mask].abs().sum() == 0 if step > 2 else m.rank_mask.all()
    assert AdaLoRALinear.report(layers)["ranks"] == {n: m.current_rank for n, m in layers.items()}


# --- PEFT --------------------------------------------------------------------------------------

def test_matches_peft_svdlinear_outputs_and_gradients(one_thread):
    from peft.tuners.adalora import AdaLoraConfig, SVDLinear

    alpha, r, r0 = 8.0, 4, 6
    ours = trained_like(AdaLoRALinear(make_base("quant", 64, 48), rank=r, scale=alpha / r, rank_init=r0), masked=(2,))
    dense = nn.Linear(64, 48)  # PEFT on the dequantized base
    with torch.no_grad():
        dense.weight.copy_(dense_weight(ours.base_layer))
        dense.bias.copy_(ours.base_layer.bias)
    config = AdaLoraConfig(init_r=r0, target_r=r, lora_alpha=alpha, total_step=10)
    theirs = SVDLinear(dense, "default", config=config, r=r0, lora_alpha=alpha)
    for f in ("A", "B", "E"):
        assert getattr(theirs, f"lora_{f}")["default"].shape == getattr(ours, f"lora_{f}").shape
        with torch.no_grad():
            getattr(theirs, f"lora_{f}")["default"].copy_(getattr(ours, f"lora_{f}"))
    torch.manual_seed(4)
    x = torch.randn(2, 6, 64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, want = ours(xa), theirs(xb)
    torch.testing.assert_close(got, want, **FP32)
    ours_g = grads(got, xa, ours.lora_A, ours.lora_B, ours.lora_E)
    theirs_g = grads(want, xb, *(getattr(theirs, f"lora_{f}")["default"] for f in ("A", "B", "E")))
    for g, w in zip(ours_g, theirs_g):
        torch.testing.assert_close(g, w, **FP32)
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), **FP32)


class ThreeLinears(nn.Module):
    """A bare model for PEFT's AdaLoraModel: its loss is 0, so PEFT's loss is its orthogonality penalty alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(64, 48), nn.Linear(48, 64), nn.Linear(32, 96)

    def forward(self):
        return SimpleNamespace(loss=torch.zeros(()))


def test_rank_allocator_and_penalty_match_peft_fed_the_same_gradients(one_thread):
    """PEFT's AdaLoraModel (RankAllocator and update_and_allocate: init 2 steps, budget to step 7, final 3) and our
    layers get the same parameters, the same hand-made gradients and updates for 10 steps: the same EMAs, masks
    (PEFT's rank_pattern), λ after masking, and PEFT's loss (its penalty) is the sum of our extra losses."""
    from peft.tuners.adalora import AdaLoraConfig, AdaLoraModel

    alpha, r, r0, names = 8.0, 4, 6, ("a", "b", "c")
    config = AdaLoraConfig(init_r=r0, target_r=r, lora_alpha=alpha, target_modules=list(names), tinit=2, tfinal=3,
                           total_step=10, deltaT=1, orth_reg_weight=ORTH_WEIGHT)
    assert (config.beta1, config.beta2) == (BETA1, BETA2)
    peft_model = AdaLoraModel(ThreeLinears(), config, "default")
    theirs = {n: getattr(peft_model.model, n) for n in names}
    ours = {}
    for n in names:
        base = nn.Linear(theirs[n].in_features, theirs[n].out_features)
        base.load_state_dict(theirs[n].get_base_layer().state_dict())
        ours[n] = AdaLoRALinear(base.requires_grad_(False), rank=r, scale=alpha / r, rank_init=r0,
                                budget_start=2, budget_end=7)
        with torch.no_grad():
            for f in ("A", "B", "E"):
                getattr(ours[n], f"lora_{f}").copy_(getattr(theirs[n], f"lora_{f}")["default"])
    AdaLoRALinear.start_training(ours, total_steps=10, run_dir=None)
    gen = torch.Generator().manual_seed(0)
    masks_seen = set()
    for step in range(1, 11):
        loss = peft_model()  # PEFT's penalty on this step's parameters
        torch.testing.assert_close(loss.loss, sum(m.extra_loss() for m in ours.values()), **FP32)
        for n in names:
            for f in ("A", "B", "E"):
                theirs_p, ours_p = getattr(theirs[n], f"lora_{f}")["default"], getattr(ours[n], f"lora_{f}")
                g = torch.randn(ours_p.shape, generator=gen)
                with torch.no_grad():
                    updated = ours_p - 0.1 * g  # the same optimizer step on both
                    theirs_p.copy_(updated)
                    ours_p.copy_(updated)
                theirs_p.grad, ours_p.grad = g.clone(), g.clone()
        peft_model.update_and_allocate(step)
        AdaLoRALinear.after_step(ours, step)
        pattern = config.rank_pattern
        for n in names:
            assert torch.equal(ours[n].lora_E, theirs[n].lora_E["default"]), (step, n)
            if step < 7:  # PEFT resets its EMAs at the final allocation (step 7) and stops updating them
                for f in ("A", "B", "E"):
                    key = f"{n}.lora_{f}.default"
                    assert torch.equal(getattr(ours[n], f"sensitivity_{f}"), peft_model.rankallocator.exp_avg_ipt[key])
                    assert torch.equal(getattr(ours[n], f"uncertainty_{f}"), peft_model.rankallocator.exp_avg_unc[key])
            if step > 2:
                assert ours[n].rank_mask.tolist() == pattern[f"{n}.lora_E.default"], (step, n)
                masks_seen.add((n, tuple(ours[n].rank_mask.tolist())))
            else:
                assert pattern is None and ours[n].rank_mask.all()
    assert sum(m.current_rank for m in ours.values()) == 3 * r
    assert len(masks_seen) > 3  # the allocation changed along the way


# --- a run ---------------------------------------------------------------------------------------

def run_cfg(model_dir, corpus, out, **kw):
    return method_runs.run_cfg(model_dir, corpus, out, **{**dict(
        method="adalora", rank=2, rank_init=4, budget_start=1, budget_end=4, max_steps=6, eval_every=3, save_every=3,
        lr=2e-2), **kw})


def test_trains_prunes_to_the_budget_exports_merged_and_peft_on_the_4bit_base_and_resumes(
        tiny_llama, corpus, tmp_path, options_passed):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg = run_cfg(tiny_llama, corpus, tmp_path / "run")
    train(cfg, progress=False)
    _, ours, *_ = load_run(tmp_path / "run", progress=False, compute_dtype="float32")
    layers = adapter_layers(ours)
    assert len(layers) == 14 and all(type(m) is AdaLoRALinear for m in layers.values())
    # the budget fell from 14·4 to 14·2 triplets; the pruned λ are zero; the ranks differ between layers
    ranks = {n: m.current_rank for n, m in layers.items()}
    assert sum(ranks.values()) == 28 and len(set(ranks.values())) > 1
    assert all(m.lora_E[~m.rank_mask].abs().sum() == 0 for m in layers.values())
    assert all(m.lora_E.abs().max() > 1e-3 for m in layers.values() if m.current_rank)  # the kept λ moved
    saved = json.loads((tmp_path / "run" / RANKS_FILE).read_text())
    assert saved["final"] and saved["step"] == 6 and saved["ranks"] == ranks and saved["budget"] == 28
    reports = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "method"]
    assert [(r["step"], r["budget"]) for r in reports] == [(3, budget_at(3, 56, 28, 1, 4)), (6, 28)]
    assert reports[0]["rank_total"] == reports[0]["budget"] == 29 and reports[1]["ranks"] == ranks
    want = logits(ours)

    # plan: the same trainable count as the run (rank_init rows in every layer)
    assert plan_memory(cfg).trainable_params == started(tmp_path / "run")["trainable_params"] == sum(
        4 * m.in_features + m.out_features * 4 + 4 for m in layers.values())

    # merged fp16 model in plain transformers
    err = merged_export_error(tmp_path / "run", tmp_path / "merged", want)
    assert err < 2e-3, f"relative logit difference {err:.2e}"

    # PEFT's AdaLoRA (pruned by rank_pattern) on the bitsandbytes 4-bit base
    out = export_peft(tmp_path / "run", tmp_path / "adapter", progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and (config["init_r"], config["target_r"]) == (4, 2)
    assert (config["tinit"], config["tfinal"], config["total_step"]) == (1, 2, 6)
    assert {k: sum(v) for k, v in config["rank_pattern"].items()} == {f"{n}.lora_E": r for n, r in ranks.items()}
    base = AutoModelForCausalLM.from_pretrained(quantized_cache_path(tiny_llama, QuantSpec(4), torch.float32),
                                                dtype=torch.float32)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = peft.PeftModel.from_pretrained(base, out)
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert type(down).__name__ == "SVDLinear4bit"
    assert down.lora_E["default"].shape == (ranks["model.layers.0.mlp.down_proj"], 1)
    model.train()  # bitsandbytes' CPU eval path repacks weights; train mode dequantizes as we do (no dropout)
    torch.testing.assert_close(logits(model), want, atol=1e-4, rtol=1e-4)

    # resume from the mid-budget checkpoint (step 3 of a budget falling over steps 2…4; step 6's deleted)
    a, b = resumed_checkpoint(tmp_path / "run", cfg, 6, tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) == 14 * (3 + len(AdaLoRALinear.checkpoint_buffers))
    for key in a:
        assert torch.equal(b[key], a[key]), key
    assert json.loads((tmp_path / "resumed" / RANKS_FILE).read_text())["ranks"] == ranks


# --- what it refuses -------------------------------------------------------------------------------

def test_refuses_rank_init_below_rank_and_a_budget_end_before_its_start_at_start(tiny_llama, corpus, tmp_path,
                                                                                options_passed):
    with pytest.raises(QtuneError, match=r"--rank-init 2 is below --rank 4.*--rank-init 4 or more"):
        train(run_cfg(tiny_llama, corpus, tmp_path / "a", rank=4, rank_init=2), progress=False)
    with pytest.raises(QtuneError, match=r"--budget-end 3 is not after --budget-start 3"):
        train(run_cfg(tiny_llama, corpus, tmp_path / "b", budget_start=3, budget_end=3), progress=False)
    with pytest.raises(QtuneError, match=r"--budget-end 9 is past the run's last step 6.*--budget-end 6 or less"):
        train(run_cfg(tiny_llama, corpus, tmp_path / "c", budget_end=9), progress=False)
    with pytest.raises(QtuneError, match=r"--rslora does not apply.*Drop --rslora"):
        plan_memory(run_cfg(tiny_llama, corpus, tmp_path / "d", rslora=True))


def test_check_names_a_layer_too_small_for_rank_init_and_a_default_schedule_past_its_start():
    model = nn.ModuleDict({"a": nn.Linear(64, 96), "b": nn.Linear(96, 5)})
    with pytest.raises(QtuneError, match=r"starting rank 6 \(--rank-init \(default 1\.5 × --rank 4\)\) is larger than "
                                         r"layer b \(out 5, in 96\).*--rank-init 5 or less"):
        AdaLoRALinear.check(model, ["a", "b"], 4, {})
    AdaLoRALinear.check(model, ["a", "b"], 4, {"rank_init": 5})
    with pytest.raises(QtuneError, match=r"--budget-end \(default\) 81 is past the run's last step 80"):
        resolve_schedule(80, 80, None)
    with pytest.raises(QtuneError, match=r"--budget-start must be 0 or more"):
        AdaLoRALinear.check(model, ["a"], 4, {"budget_start": -1})
