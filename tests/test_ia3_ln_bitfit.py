"""IA3, LN tuning and BitFit on a frozen (4-bit) base: each method's reference forward against its equation
written here on the dequantized weight, against PEFT's layer (IA3, LN tuning), its merge, the layers it
chooses and what it refuses; and short trained runs (Llama, Qwen2 with q/k/v biases, Phi-3's fused qkv)
whose merged fp16 export loads in plain transformers, whose PEFT adapter loads on transformers' 4-bit base,
whose plan counts the trainable parameters exactly, and one that resumes from a checkpoint exactly."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SENTENCES, TOL, dense_weight, make_base, make_tokenizer, tiny_config
from qtune.adapters import attach_adapters, adapter_layers, target_candidates
from qtune.adapters.bitfit import ADDED, NO_BIAS, TRAINED, BitFitLinear
from qtune.adapters.ia3 import IA3Linear
from qtune.adapters.lntuning import LNTuning
from qtune.checkpoint import complete_checkpoints, load_checkpoint
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.export import export_merged, export_peft, load_run
from qtune.plan import plan_memory
from qtune.train import read_metrics, train

F32 = TOL[torch.float32]
pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")  # PEFT on a bare norm
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12, 60, 3]])


def grads_of(y: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """d(Σ g ⊙ y)/d inputs for a fixed random g (so every output element's gradient counts)."""
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad((y * g).sum(), inputs))


def same_forward_and_grads(ours, theirs, x: torch.Tensor, ours_params, theirs_params):
    """ours(x) == theirs(x) and the gradients of x and of the corresponding parameters agree (fp32)."""
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, **F32)
    for ga, gb in zip(grads_of(ya, [xa, *ours_params]), grads_of(yb, [xb, *theirs_params])):
        torch.testing.assert_close(ga, gb.reshape(ga.shape), **F32)  # PEFT keeps IA3 vectors as (out, 1) or (1, in)


def in_memory_model(arch: str):
    """A tiny random model of the family, not saved (for what a method selects and refuses)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)


# --- IA3 --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["quant", "dense"])
def test_ia3_scales_the_output_bias_included_as_k_equals_l_times_xw_plus_b(kind, one_thread):
    base = make_base(kind, 32, 24, bias=True)
    layer = IA3Linear(base, rank=4, scale=1.0)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), base(x), **F32)  # ones at init: the base
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    w, b = dense_weight(base), base.bias.detach().float()
    l_k = layer.ia3_l.detach().clone().requires_grad_(True)
    same_forward_and_grads(layer, lambda x: l_k * (x @ w.T + b), x, [layer.ia3_l], [l_k])


@pytest.mark.parametrize("kind", ["quant", "dense"])
def test_ia3_feedforward_scales_down_projs_input_and_not_its_bias(kind, one_thread):
    base = make_base(kind, 48, 16, bias=True)
    layer = IA3Linear(base, rank=4, scale=1.0, feedforward=True)
    assert layer.ia3_l.shape == (48,)
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    w, b = dense_weight(base), base.bias.detach().float()
    gate, up = torch.randn(2, 6, 48), torch.randn(2, 6, 48)
    h = F.silu(gate) * up                                 # act(W_gate x) ⊙ W_up x
    l_ff = layer.ia3_l.detach().clone().requires_grad_(True)
    same_forward_and_grads(layer, lambda h: (l_ff * h) @ w.T + b, h, [layer.ia3_l], [l_ff])


def test_ia3_on_a_fused_qkv_scales_and_trains_only_the_k_and_v_rows(one_thread):
    q, kv = 32, 16
    base = make_base("quant", 24, q + 2 * kv, bias=False)
    layer = IA3Linear(base, rank=4, scale=1.0, rows=(q, q + 2 * kv))
    assert layer.ia3_l.shape == (2 * kv,)
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    w = dense_weight(base)
    l_kv = layer.ia3_l.detach().clone().requires_grad_(True)

    def naive(x):
        qkv = x @ w.T
        return torch.cat([qkv[..., :q], l_kv * qkv[..., q:]], -1)  # q unscaled; [l_k ⊙ k, l_v ⊙ v]

    same_forward_and_grads(layer, naive, torch.randn(2, 7, 24), [layer.ia3_l], [l_kv])
    assert torch.equal(layer.vector()[:q].detach(), torch.ones(q))


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_matches_pefts_ia3_layer_on_the_dequantized_weight(feedforward, one_thread):
    from peft import IA3Config
    from peft.tuners.ia3.layer import Linear as PeftIA3

    base = make_base("quant", 40, 24, bias=True)
    dense = nn.Linear(40, 24)
    with torch.no_grad():
        dense.weight.copy_(dense_weight(base))
        dense.bias.copy_(base.bias)
    dense.requires_grad_(False)
    ours = IA3Linear(base, rank=4, scale=1.0, feedforward=feedforward)
    peft_cfg = IA3Config(target_modules=["x"], feedforward_modules=["x"] if feedforward else [])
    theirs = PeftIA3(dense, "default", peft_cfg, is_feedforward=feedforward)
    with torch.no_grad():
        ours.ia3_l.uniform_(0.5, 1.5)
        theirs.ia3_l["default"].copy_(ours.peft_tensors("p")["p.ia3_l"])  # (out, 1) or (1, in)
    assert theirs.ia3_l["default"].shape == ((1, 40) if feedforward else (24, 1))
    same_forward_and_grads(ours, theirs, torch.randn(3, 4, 40), [ours.ia3_l], [theirs.ia3_l["default"]])
    theirs.merge()  # PEFT's merge (on its dense layer) scales the bias of a non-feedforward layer too
    merged = ours.merge({"weight": dense_weight(base), "bias": base.bias.float()})
    torch.testing.assert_close(merged["weight"], theirs.base_layer.weight, **F32)
    torch.testing.assert_close(merged["bias"], theirs.base_layer.bias, **F32)


@pytest.mark.parametrize("feedforward, rows", [(False, None), (True, None), (False, (8, 24))])
def test_ia3_merged_weight_and_bias_give_the_adapters_forward(feedforward, rows, one_thread):
    base = make_base("quant", 40, 24, bias=True)
    layer = IA3Linear(base, rank=4, scale=1.0, feedforward=feedforward, rows=rows)
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    w0, b0 = dense_weight(base), base.bias.float()
    merged = layer.merge({"weight": w0, "bias": b0})
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, merged["weight"], merged["bias"]), layer(x), **F32)
        torch.testing.assert_close(F.linear(x, w0 + layer.delta_weight(w0), merged["bias"]), layer(x), **F32)
    assert torch.equal(merged["bias"], b0) == feedforward  # l_ff leaves down_proj's bias alone


def test_ia3_all_linear_means_k_v_and_down_proj_and_a_list_is_honoured():
    model = in_memory_model("llama")
    names = attach_adapters(model, "ia3", ["all-linear"], rank=4, scale=1.0)
    assert sorted({n.rpartition(".")[2] for n in names}) == ["down_proj", "k_proj", "v_proj"] and len(names) == 6
    layers = adapter_layers(model)
    assert [n for n, m in layers.items() if m.feedforward] == [n for n in names if n.endswith("down_proj")]
    model = in_memory_model("llama")
    names = attach_adapters(model, "ia3", ["q_proj", "o_proj"], rank=4, scale=1.0)
    assert sorted({n.rpartition(".")[2] for n in names}) == ["o_proj", "q_proj"]
    assert not any(m.feedforward for m in adapter_layers(model).values())


def test_ia3_on_phi3_scales_the_k_and_v_rows_of_qkv_proj_from_the_config():
    model = in_memory_model("phi3")
    names = attach_adapters(model, "ia3", ["all-linear"], rank=4, scale=1.0)
    assert sorted({n.rpartition(".")[2] for n in names}) == ["down_proj", "qkv_proj"]
    qkv = model.model.layers[0].self_attn.qkv_proj
    q, kv = 4 * 16, 2 * 16  # 4 heads and 2 key/value heads of 64 / 4
    assert qkv.rows == (q, q + 2 * kv) and qkv.ia3_l.shape == (2 * kv,)


def test_ia3_refuses_a_model_without_the_projections_it_scales():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config)  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    with pytest.raises(QtuneError, match=r"keys and values .*--target-modules"):
        attach_adapters(model, "ia3", ["all-linear"], rank=4, scale=1.0)
    names = attach_adapters(model, "ia3", ["dense_4h_to_h"], rank=4, scale=1.0)  # named: honoured
    assert len(names) == 2 and all(m.feedforward for m in adapter_layers(model).values())


# --- LN tuning ----------------------------------------------------------------------------------------------

def rms_norms():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def standardized(x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)

    # kind -> (the norm, its equation y(x, γ, β))
    return {"llama": (LlamaRMSNorm(32, eps=1e-6), lambda x, w, b: w * rms(x)),
            "gemma": (GemmaRMSNorm(32, eps=1e-6), lambda x, w, b: (1 + w) * rms(x)),
            "layernorm": (nn.LayerNorm(32, eps=1e-5), lambda x, w, b: w * standardized(x) + b)}


@pytest.mark.parametrize("kind", ["llama", "gemma", "layernorm"])
def test_ln_tuning_is_the_norm_with_its_trained_weights(kind, one_thread):
    norm, naive = rms_norms()[kind]
    norm.requires_grad_(False)
    layer = LNTuning(norm, rank=4, scale=1.0)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), norm(x), **F32)  # the base's own weights at init
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        if layer.bias is not None:
            layer.bias.uniform_(-0.5, 0.5)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    same_forward_and_grads(layer, lambda x: naive(x, copies[0], copies[-1]), x, params, copies)
    merged = layer.merge({k: v.float() for k, v in norm.state_dict().items()})
    assert merged.keys() == norm.state_dict().keys()
    for k, p in zip(("weight", "bias"), params):
        assert torch.equal(merged[k], p.detach())


@pytest.mark.parametrize("kind", ["llama", "layernorm"])
def test_ln_tuning_matches_pefts_ln_tuning_layer(kind, one_thread):
    from peft import LNTuningConfig
    from peft.tuners.ln_tuning.layer import LNTuningLayer

    norm, _ = rms_norms()[kind]
    norm.requires_grad_(False)
    ours = LNTuning(norm, rank=4, scale=1.0)
    theirs = LNTuningLayer(norm, "default", LNTuningConfig(target_modules=["x"]))
    copy = theirs.ln_tuning_layers["default"]
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        if ours.bias is not None:
            ours.bias.uniform_(-0.5, 0.5)
        for name, t in ours.peft_tensors("p").items():  # p.ln_tuning_layers.weight (.bias)
            getattr(copy, name.rpartition(".")[2]).copy_(t)
    ours_p = [p for p in (ours.weight, ours.bias) if p is not None]
    theirs_p = [copy.weight] + ([copy.bias] if ours.bias is not None else [])
    same_forward_and_grads(ours, theirs, torch.randn(3, 5, 32), ours_p, theirs_p)


def test_ln_tuning_targets_the_norms_as_pefts_default_for_llama_and_a_list_narrows():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model = in_memory_model("llama")
    names = attach_adapters(model, "lntuning", ["all-linear"], rank=4, scale=1.0)
    assert sorted(names) == sorted(["model.norm"] + [f"model.layers.{i}.{n}" for i in range(2)
                                                     for n in ("input_layernorm", "post_attention_layernorm")])
    assert sorted({n.rpartition(".")[2] for n in names}) == sorted(PEFT_TARGETS["llama"])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5 * 64
    model = in_memory_model("llama")
    assert attach_adapters(model, "lntuning", ["input_layernorm"], rank=4, scale=1.0) == [
        "model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    with pytest.raises(QtuneError, match="No norm layer matches --target-modules q_proj"):
        attach_adapters(in_memory_model("llama"), "lntuning", ["q_proj"], rank=4, scale=1.0)


def test_ln_tuning_finds_layernorms_with_bias_and_skips_weightless_ones():
    stablelm = in_memory_model("stablelm")  # nn.LayerNorm with weight and bias
    assert LNTuning.trainable_sizes(stablelm.model.norm, 4, {}) == [64, 64]
    assert "model.norm" in target_candidates(stablelm, LNTuning)
    olmo = in_memory_model("olmo")  # OlmoLayerNorm: no weight
    assert not isinstance(olmo.model.norm, LNTuning.targets)


# --- BitFit -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_bitfit_is_the_linear_with_its_trained_bias(bias, one_thread):
    base = make_base("quant", 32, 24, bias=bias)
    layer = BitFitLinear(base, rank=4, scale=1.0)
    assert layer.kind == (TRAINED if bias else ADDED)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), base(x), **F32)
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
    w = dense_weight(base)
    b = layer.bias.detach().clone().requires_grad_(True)
    same_forward_and_grads(layer, lambda x: x @ w.T + b, x, [layer.bias], [b])
    merged = layer.merge({"weight": w} | ({"bias": base.bias.float()} if bias else {}))
    assert torch.equal(merged["weight"], w) and torch.equal(merged["bias"], layer.bias.detach())
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, merged["weight"], merged["bias"]), layer(x), **F32)


def test_bitfit_gives_llama_biases_everywhere_and_qwen2_its_own_q_k_v_only():
    llama = in_memory_model("llama")
    attach_adapters(llama, "bitfit", ["all-linear"], rank=4, scale=1.0)
    layers = adapter_layers(llama)
    assert len(layers) == 14 and all(m.kind == ADDED for m in layers.values())
    assert {m.config_flag for n, m in layers.items() if "self_attn" in n} == {"attention_bias"}  # o_proj too
    assert {m.config_flag for n, m in layers.items() if "mlp" in n} == {"mlp_bias"}
    qwen2 = in_memory_model("qwen2")
    attach_adapters(qwen2, "bitfit", ["all-linear"], rank=4, scale=1.0)
    trained = {tuple(n.split(".")[-2:]) for n, p in qwen2.named_parameters() if p.requires_grad}
    assert trained == {("q_proj", "bias"), ("k_proj", "bias"), ("v_proj", "bias")}  # their own biases, nothing else
    assert all(m.kind == NO_BIAS and m.bias is None for n, m in adapter_layers(qwen2).items()
               if n.rpartition(".")[2] not in ("q_proj", "k_proj", "v_proj"))


@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_bitfit_refuses_architectures_whose_linears_cannot_carry_a_bias(arch):
    with pytest.raises(QtuneError, match=rf"'{arch}'.*--method qlora"):
        attach_adapters(in_memory_model(arch), "bitfit", ["all-linear"], rank=4, scale=1.0)


def test_bitfit_refuses_a_bias_the_merged_model_could_not_load():
    with pytest.raises(QtuneError, match="cannot give o_proj a bias"):  # Qwen2 has no flag for o_proj
        attach_adapters(in_memory_model("qwen2"), "bitfit", ["q_proj", "o_proj"], rank=4, scale=1.0)
    with pytest.raises(QtuneError, match="attention_bias .* k_proj, o_proj, q_proj, v_proj"):  # a flag's group in part
        attach_adapters(in_memory_model("llama"), "bitfit", ["q_proj", "v_proj"], rank=4, scale=1.0)
    mlp = ["gate_proj", "up_proj", "down_proj"]  # mlp_bias's whole group: accepted
    assert len(attach_adapters(in_memory_model("llama"), "bitfit", mlp, rank=4, scale=1.0)) == 6


# --- short trained runs: merged and PEFT exports, plan, resume -----------------------------------------------

def write_model_with_biases(folder, arch: str):
    """A tiny random model saved with non-zero biases (transformers initialises them to zero), so that a
    method that scales or trains them is seen doing so."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tok) + 8), dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tiny_model_factory, tmp_path_factory):
    """runs(method, arch) -> (cfg, run folder): 4 steps in fp32 with a large lr, checkpoints at 2 and 4."""
    made = {}

    def run(method: str, arch: str):
        if (method, arch) not in made:
            tmp = tmp_path_factory.mktemp(f"{method}-{arch}")
            model_dir = write_model_with_biases(tmp / "model", arch) if arch == "qwen2" else tiny_model_factory(arch)
            data = tmp / "corpus.txt"
            data.write_text("\n".join(SENTENCES * 40))
            cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(tmp / "run"), method=method, seq_len=32,
                              batch_size=2, rank=4, compute_dtype="float32", max_steps=4, eval_every=0, save_every=2,
                              lr=5e-2, warmup_steps=0)
            train(cfg, progress=False)
            made[method, arch] = cfg, tmp / "run"
        return made[method, arch]

    return run


def adapter_logits(run):
    _, model, *_ = load_run(run, progress=False, compute_dtype="float32")
    with torch.no_grad():
        return model(IDS).logits, model


def started(run) -> dict:
    return next(r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "start")


# (method, arch, its trainable parameters by hand: hidden 64, k/v 32, intermediate 128, 2 layers)
RUNS = [("ia3", "llama", 2 * (32 + 32 + 128)), ("ia3", "qwen2", 2 * (32 + 32 + 128)),
        ("ia3", "phi3", 2 * (2 * 32 + 128)), ("lntuning", "llama", 5 * 64),
        ("bitfit", "llama", 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)), ("bitfit", "qwen2", 2 * (64 + 32 + 32))]


@pytest.mark.parametrize("method, arch, trainable", RUNS)
def test_the_plan_counts_the_trained_parameters_exactly(runs, method, arch, trainable):
    cfg, run = runs(method, arch)
    assert started(run)["trainable_params"] == trainable
    assert plan_memory(cfg).trainable_params == trainable


@pytest.mark.parametrize("method, arch, trainable", RUNS)
def test_trained_run_exports_merged_with_the_adapters_logits(runs, tmp_path, method, arch, trainable):
    from transformers import AutoModelForCausalLM

    cfg, run = runs(method, arch)
    want, model = adapter_logits(run)
    moved = [(p - 1 if method == "ia3" else p).abs().max() for p in model.parameters() if p.requires_grad]
    assert max(moved) > 1e-2  # trained away from the start (IA3's ones; BitFit's zero new biases)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert model.qtune_engine.unsupported is None  # trained on qtune's own block (a wrapped norm keeps its layout)
    with torch.no_grad():  # which runs the same model as transformers' forward
        torch.testing.assert_close(model.qtune_engine.logits(IDS, torch.ones_like(IDS)), want, **F32)
    out = export_merged(run, tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = merged(IDS).logits
    err = (got - want).abs().max() / want.abs().max()
    assert err < 2e-3, f"relative logit difference {err:.2e}"  # fp16 weights
    config = json.loads((out / "config.json").read_text())
    if method == "bitfit":  # Llama's new biases are in the config's flags; Qwen2 keeps its own q/k/v biases only
        flags = arch == "llama"
        assert config.get("attention_bias", False) == flags and config.get("mlp_bias", False) == flags
        layer = merged.model.layers[0]
        assert (layer.self_attn.o_proj.bias is not None) == flags and (layer.mlp.down_proj.bias is not None) == flags
        assert layer.self_attn.k_proj.bias is not None


@pytest.mark.parametrize("method, arch", [("ia3", "llama"), ("ia3", "qwen2"), ("ia3", "phi3"), ("lntuning", "llama")])
def test_peft_adapter_loads_on_the_bnb_4bit_base_with_the_adapters_logits(runs, tmp_path, method, arch):
    import warnings

    import peft
    from transformers import AutoModelForCausalLM

    from qtune.loader import QuantSpec, quantized_cache_path, resolve_model_dir

    cfg, run = runs(method, arch)
    out = export_peft(run, tmp_path / "adapter", progress=False)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == {"ia3": "IA3", "lntuning": "LN_TUNING"}[method]
    if method == "ia3":
        assert adapter_config["feedforward_modules"] == ["down_proj"]
    base_dir = quantized_cache_path(resolve_model_dir(cfg.model), QuantSpec(4), torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # bitsandbytes 4-bit, as saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, out)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    model.train()  # bitsandbytes' CPU eval path repacks weights; train mode uses the plain dequantize path
    with torch.no_grad():
        got = model(IDS).logits
    want, _ = adapter_logits(run)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bitfit_has_no_peft_format_and_export_says_so(runs, tmp_path):
    _, run = runs("bitfit", "llama")
    with pytest.raises(QtuneError, match="PEFT has no format for method 'bitfit'.*--format merged"):
        export_peft(run, tmp_path / "adapter", progress=False)


def test_a_resumed_ia3_run_ends_with_the_uninterrupted_runs_vectors(runs, tmp_path):
    cfg, run = runs("ia3", "llama")
    part = tmp_path / "part"
    shutil.copytree(run, part)
    shutil.rmtree(complete_checkpoints(part)[-1])  # killed after its step-2 checkpoint
    assert complete_checkpoints(part)[-1].name == "step-000002"
    train(dataclasses.replace(cfg, output=str(part)), resume=True, progress=False)
    want = load_checkpoint(complete_checkpoints(run)[-1])["adapter"]
    got = load_checkpoint(complete_checkpoints(part)[-1])["adapter"]
    assert got.keys() == want.keys() and len(want) == 6
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)
