"""Whole decoder blocks as compiled graphs (qtune.engine: BlockRunner, the execution report): the traceable
dequantization equals bitsandbytes' own; a compiled, checkpointed block gives the loss and gradients of
the adapters' reference forwards (transformers' own forward); the execution line counts what really
compiled (a graph break or a compiler failure shows as eager layers with their reason); the
recomputation policy's kept outputs skip their GEMMs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TOL
from qtune.adapters.base import Adapter
from qtune.engine import causal_lm_loss


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_traced_is_dequantize_bit_for_bit(quant_type, double_quant):
    """Through the registered operators only, eagerly and inside a fullgraph compile, for shapes whose
    rows do and do not align with the 64-value blocks (in_features % 64 of 0, 16, 32, 48)."""
    from quant.formats import quantize

    torch.manual_seed(0)
    for shape in [(64, 80), (24, 96), (33, 112), (16, 64)]:
        q = quantize(torch.randn(*shape), quant_type, double_quant, torch.bfloat16)
        for dtype in (torch.bfloat16, torch.float32):
            ref = q.dequantize(dtype)
            got = q.dequantize_traced(dtype)
            assert got.shape == ref.shape and got.dtype == dtype and torch.equal(got, ref), (shape, dtype)
    traced = torch.compile(lambda: q.dequantize_traced(torch.bfloat16), fullgraph=True, backend="eager")
    assert torch.equal(traced(), q.dequantize(torch.bfloat16))


def _model(tiny_llama, tmp_path, **kw):
    from qtune.config import TrainConfig
    from qtune.model import build_model

    cfg = TrainConfig(model=str(tiny_llama), data="x", output=str(tmp_path / "r"), rank=4, seq_len=32, batch_size=2,
                      **{"gradient_checkpointing": True, **kw})
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    torch.manual_seed(1)
    for m in model.modules():  # non-zero B so that every adapter term matters
        if isinstance(m, Adapter):
            m.lora_B.data.normal_(0, 0.1)
    model.train()
    return model


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    loss, _ = causal_lm_loss(model, ids, mask, torch.where(mask.bool(), ids, -100))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference_loss_and_grads(model, ids, mask):
    """transformers' own forward with the adapters' reference forwards: the sum of the token losses."""
    model.zero_grad(set_to_none=True)
    labels = torch.where(mask.bool(), ids, -100)
    n = int((labels[:, 1:] != -100).sum())
    with model.qtune_engine.reference_forwards():  # backward too: transformers' checkpointing recomputes
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss * n
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fix_rosa_support(model):
    from qtune.adapters.rosa import RoSALinear

    for m in model.modules():
        if isinstance(m, RoSALinear):
            m.set_support(torch.arange(0, m.in_features * m.out_features, 7))
            m.sparse_values.data.normal_(0, 0.1)


def test_linear_lora_group_is_each_linears_product_with_their_gradients():
    """qtune::linear_lora_group, y = x·[W₁; W₂; W₃]ᵀ with h_i·B_iᵀ added to each linear's own columns, against the
    equation written per linear (x·W_iᵀ + h_i·B_iᵀ, h = [h₁, h₂, h₃]) in plain torch, and its gradients for x, h
    and each B_i (unequal widths and ranks, a 3-D input) against autograd's of that reference."""
    from qtune.engine.ops import linear_lora_group

    torch.manual_seed(0)
    outs, ranks = (24, 8, 8), (4, 2, 6)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(sum(outs), 16, dtype=torch.float64)
    h = torch.randn(2, 5, sum(ranks), dtype=torch.float64, requires_grad=True)
    bs = [torch.randn(o, r, dtype=torch.float64, requires_grad=True) for o, r in zip(outs, ranks)]
    g = torch.randn(2, 5, sum(outs), dtype=torch.float64)
    y = linear_lora_group(x, w, h, bs)
    grads = torch.autograd.grad(y, [x, h, *bs], g)
    ref = torch.cat([x @ w_i.t() + h_i @ b.t()
                     for w_i, h_i, b in zip(w.split(outs), h.split(ranks, -1), bs)], dim=-1)
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, [x, h, *bs], g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method,compute_dtype", [("qlora", "float32"), ("qlora", "bfloat16"), ("qdora", "float32"),
                                                  ("qdora", "bfloat16"), ("qrosa", "float32"), ("qrosa", "bfloat16")])
def test_compiled_blocks_match_the_reference_forwards(tiny_llama, tmp_path, method, compute_dtype, monkeypatch,
                                                      compiled):
    """QLoRA, QDoRA and QRoSA, right padding: compiled checkpointed blocks against transformers' forward
    over the adapters' reference forwards. The compiled step calls no eager dequantize(), dequantizes
    7 weights per layer forward and 7 in backward (its recomputation shares them with the gradient
    products; the first layer's q, k, v need none there), and the execution report says every layer
    compiled."""
    from torch.profiler import ProfilerActivity, profile

    from quant.formats import QuantizedWeight

    model = _model(tiny_llama, tmp_path, method=method, compute_dtype=compute_dtype)
    if method == "qdora":  # magnitudes away from the norms, so that m/n matters
        for m in model.modules():
            if hasattr(m, "magnitude"):
                m.magnitude.data.mul_(1 + 0.2 * torch.rand_like(m.magnitude))
    if method == "qrosa":  # a fixed support with non-zero values (RoSA compiles once it is fixed)
        _fix_rosa_support(model)
    layers = model.model.layers
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    mask = torch.ones_like(ids)
    mask[1, 27:] = 0
    _loss_and_grads(model, ids, mask)  # compiles
    assert model.qtune_engine.execution_report(1)["layers"] == {"compiled": len(layers), "eager": 0}
    eager_calls = []
    real = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda self, *a, **k: eager_calls.append(1) or real(self, *a, **k))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss_c, grads_c = _loss_and_grads(model, ids, mask)
    decoded = sum(e.count for e in prof.key_averages() if e.key == "bitsandbytes::dequantize_4bit")
    assert eager_calls == []
    assert decoded == len(layers) * (7 + 7) - 3  # the first layer's q, k, v need no dL/dx (frozen embeddings)
    if method == "qdora":  # the checkpoint keeps the forward's row norms: their A·Wᵀ products run once per step
        config = model.config
        r, h, kv = 4, config.hidden_size, config.num_key_value_heads * config.head_dim
        shapes = {tuple(map(tuple, e.input_shapes[:2])): e.count
                  for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::mm"}
        # A_k·W_kᵀ and A_v·W_vᵀ: (r, h)·(h, kv), a shape no other product of the step has (asserted: kv ≠ h)
        assert kv != h and shapes.get(((r, h), (h, kv))) == 2 * len(layers), shapes
    monkeypatch.undo()
    loss_r, grads_r = _reference_loss_and_grads(model, ids, mask)
    tol = TOL[torch.float32] if compute_dtype == "float32" else dict(atol=2e-1, rtol=2e-2)
    torch.testing.assert_close(loss_c, loss_r, **tol)
    assert grads_c.keys() == grads_r.keys() and len(grads_c) == (2 if method == "qlora" else 3) * 7 * len(layers)
    for name in grads_r:
        if compute_dtype == "float32":
            torch.testing.assert_close(grads_c[name], grads_r[name], **tol, msg=name)
        else:  # bf16: rounding differs in places; the gradient as a whole must agree
            cos = torch.nn.functional.cosine_similarity(grads_c[name].flatten(), grads_r[name].flatten(), dim=0)
            assert cos > 0.99, (name, float(cos))


@pytest.mark.parametrize("kw,reason", [(dict(method="qdora", dora_detach_norm=False), "dora norm gradient"),
                                       (dict(method="qlora", dropout=0.1), "dropout"),
                                       (dict(method="qlora", compile=False), "compile off")])
def test_layers_that_are_not_compiled_say_why(tiny_llama, tmp_path, kw, reason, compiled):
    """DoRA with the norm's gradient, dropout and --no-compile run eager blocks, and the execution line
    names the reason; so does a RoSA layer until its support is fixed, and a layer whose linears carry
    hooks (as while RoSA selects its support)."""
    from qtune.engine.block import block_compile_reason

    model = _model(tiny_llama, tmp_path, compute_dtype="float32", **kw)
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    _loss_and_grads(model, ids, torch.ones_like(ids))
    report = model.qtune_engine.execution_report(1)
    assert report["layers"] == {"compiled": 0, "eager": len(model.model.layers)}
    assert report["reasons"] == {reason: len(model.model.layers)}
    rosa = _model(tiny_llama, tmp_path, method="qrosa")
    layer = rosa.model.layers[0]
    assert block_compile_reason(layer) == "rosa support not chosen"
    _fix_rosa_support(rosa)
    assert block_compile_reason(layer) is None
    handle = layer.self_attn.q_proj.base_layer.register_forward_hook(lambda *a: None)
    assert block_compile_reason(layer) == "hooks"
    handle.remove()


def test_plan_counts_what_compiled_blocks_keep(tiny_llama, tmp_path, compiled):
    """The plan counts one linear's dequantized buffer for eager blocks, one layer's for compiled QLoRA
    and QDoRA, QDoRA's kept down_proj product, and --recompute default's kept attention products."""
    from qtune.config import TrainConfig
    from qtune.loader import load_config
    from qtune.model import compiles_layers
    from qtune.plan import plan_memory

    config = load_config(tiny_llama, False)
    common = dict(model=str(tiny_llama), data="x", compute_dtype="bfloat16", output=str(tmp_path / "p"), rank=4,
                  seq_len=32, batch_size=2, gradient_checkpointing=True)
    eager = TrainConfig(**common, dropout=0.1)
    plain = TrainConfig(**common)
    dora = TrainConfig(**common, method="qdora")
    assert not compiles_layers(eager) and compiles_layers(plain) and compiles_layers(dora)
    assert not compiles_layers(plain, device="cuda")
    L, h, i = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    stash = L * 2 * 32 * h * 2  # compiled QDoRA keeps down_proj's u too: L·b·t·h bf16
    kept_o = stash  # QLoRA keeps the attention's output (L·b·t·h bf16), QDoRA o_proj's product u: the same bytes
    assert plan_memory(dora).layer_inputs == plan_memory(plain).layer_inputs + stash
    dora_no_o = dataclasses.replace(dora, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    assert plan_memory(dora_no_o).layer_inputs == plan_memory(plain).layer_inputs - kept_o + stash - (
        L * 2 * 32 * 4 * 2)  # and o_proj's h = x·Aᵀ (L·b·t·r) is not there
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    kept_qkv = L * 2 * 32 * (h + 2 * kv) * 2
    full = dataclasses.replace(plain, recompute="full")
    assert plan_memory(plain).layer_inputs - plan_memory(full).layer_inputs == kept_qkv + kept_o
    assert plan_memory(dataclasses.replace(plain, keep_qkv=False)).layer_inputs == plan_memory(full).layer_inputs
    assert plan_memory(plain).dequant_buffers == (2 * h * h + 2 * h * kv + 3 * h * i) * 2
    assert plan_memory(eager).dequant_buffers == h * i * 2  # the largest linear, bf16


def test_a_failing_compile_falls_back_to_eager_layers_and_says_so(tiny_llama, tmp_path, monkeypatch, compiled):
    """A compiler failure (no C++ compiler, say): the step runs eager blocks with the loss and gradients
    of the reference forwards, the execution line counts every layer eager with the failure as the
    reason, and qtune warns once."""
    from torch._dynamo.exc import TorchDynamoException

    import qtune.engine.compiled as qc

    model = _model(tiny_llama, tmp_path, compute_dtype="float32")
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    mask = torch.ones_like(ids)

    def broken(fn, **kw):
        def run(*a, **k):
            raise TorchDynamoException("no compiler here")
        return run
    monkeypatch.setattr(qc.torch, "compile", broken)
    loss_f, grads_f = _loss_and_grads(model, ids, mask)
    L = len(model.model.layers)
    with pytest.warns(UserWarning, match=f"{L} of {L} decoder layers did not run compiled"):
        report = model.qtune_engine.execution_report(1)
    assert report["layers"] == {"compiled": 0, "eager": L}
    assert report["reasons"] == {"compile failed: TorchDynamoException: no compiler here": L}
    monkeypatch.undo()
    loss_r, grads_r = _reference_loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss_f, loss_r, **TOL[torch.float32])
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], **TOL[torch.float32], msg=name)


def test_an_injected_graph_break_shows_every_layer_eager(tiny_llama, tmp_path, monkeypatch, compiled):
    """What failed silently before: a graph break inside the block (as transformers' kernels hub caused
    inside its layers). The blocks compile with fullgraph, so the break cannot split a layer into
    pieces unseen: every layer runs eager, the execution line says so, with the reason, and qtune warns."""
    import qtune.engine.block as block

    real_mlp = block.mlp

    def mlp_with_break(*args, **kwargs):
        torch._dynamo.graph_break()
        return real_mlp(*args, **kwargs)

    monkeypatch.setattr(block, "mlp", mlp_with_break)
    model = _model(tiny_llama, tmp_path, compute_dtype="float32")
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    _loss_and_grads(model, ids, torch.ones_like(ids))
    L = len(model.model.layers)
    with pytest.warns(UserWarning, match="did not run compiled"):
        report = model.qtune_engine.execution_report(1)
    assert report["layers"] == {"compiled": 0, "eager": L}
    (reason,) = report["reasons"]
    assert reason.startswith("compile failed") and report["reasons"][reason] == L


def test_the_default_run_compiles_every_layer_at_the_embedded_models_shapes(tmp_path, compiled):
    """The embedded SmolLM2's block shapes (hidden 576, 9 heads over 3 KV heads, MLP 1536; 2 layers of
    random weights) at the default run's batch and sequence length, through train_step: the execution
    line must say every layer compiled, or the fast path is off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import make_tokenizer
    from qtune.config import TrainConfig
    from qtune.embedded import smollm2_gguf_path
    from qtune.model import build_model
    from qtune.train import make_optimizer, train_step

    gguf = smollm2_gguf_path()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    defaults = TrainConfig()
    cfg = TrainConfig(model=str(tmp_path / "m"), data="x", output=str(tmp_path / "r"), max_steps=1)
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ids = torch.randint(3, config.vocab_size, (defaults.batch_size, defaults.seq_len))
    batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids), "labels": ids.clone()}
    result = train_step(model, optimizer, scheduler, [batch], cfg.max_grad_norm)
    assert result["loss"] > 0
    report = model.qtune_engine.execution_report(1)
    assert report["layers"] == {"compiled": 2, "eager": 0} and report["reasons"] == {}
    assert report["recompute"] == {"level": "default", "checkpointing": True, "keep_attention": True,
                                   "keep_down": True, "keep_mlp": False, "keep_weights": False, "held_layers": 0}


def _profiled_step(model, ids, mask):
    from torch.profiler import ProfilerActivity, profile

    _loss_and_grads(model, ids, mask)  # compiles
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, grads = _loss_and_grads(model, ids, mask)
    return loss, grads, {e.key: e.count for e in prof.key_averages()}


def test_kept_attention_skips_its_gemms_in_the_recomputation(tiny_llama, tmp_path, compiled):
    """--recompute default: a compiled block's checkpoint keeps the attention's q, k (after the rotary
    embedding), v (copies: qtune.engine.ops.keep) and output (o_proj's own, linear_lora_kept: no copy) from the
    forward, so its recomputation runs neither q/k/v/o's base GEMMs nor their adapters' up-projections: 4 + 4
    fewer GEMM calls per layer and step, the same dequantizations, and the loss and gradients of --recompute full."""
    def run(recompute: str):
        model = _model(tiny_llama, tmp_path, compute_dtype="float32", recompute=recompute)
        ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        loss, grads, counts = _profiled_step(model, ids, mask)
        gemms = sum(counts.get(k, 0) for k in ("aten::mm", "aten::addmm", "aten::addmm_"))
        return loss, grads, gemms, counts.get("bitsandbytes::dequantize_4bit", 0), (
            counts.get("qtune::keep", 0), counts.get("qtune::linear_lora_kept", 0))

    loss_k, grads_k, gemms_k, deq_k, kept = run("default")
    loss_r, grads_r, gemms_r, deq_r, none = run("full")
    from qtune.loader import load_config

    L = load_config(tiny_llama, False).num_hidden_layers
    assert kept == (3 * L, L) and none == (0, 0)  # forward only: the recomputation reads what was kept
    assert gemms_r - gemms_k == 8 * L, (gemms_r, gemms_k)
    # the first layer's q, k, v need no dL/dx (frozen embeddings): kept, they are not dequantized in
    # backward at all; recomputed, their recomputation dequantizes them
    assert deq_r == L * (7 + 7) and deq_k == deq_r - 3
    torch.testing.assert_close(loss_k, loss_r, **TOL[torch.float32])
    assert grads_k.keys() == grads_r.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_k[name], grads_r[name], **TOL[torch.float32], msg=name)


def _count(counts: dict, *names: str) -> int:
    """Calls of qtune's operators `names` and of their kept twins (qtune::NAME_kept: the checkpoint keeps the
    output)."""
    return sum(counts.get(f"qtune::{n}", 0) + counts.get(f"qtune::{n}_kept", 0) for n in names)


def _kept(counts: dict) -> int:
    """Values a checkpointed block kept from its forward: copies (qtune::keep) and kept GEMM outputs."""
    return counts.get("qtune::keep", 0) + counts.get("qtune::linear_lora_kept", 0) + counts.get(
        "qtune::linear_lora_group_kept", 0)


def _policy_step(tiny_llama, tmp_path, method: str, recompute: str, **kw):
    """A compiled fp32 model of `method` under --recompute `recompute` (DoRA's magnitudes moved away from the norms,
    so that m/n matters), compiled by one step and profiled in the next: (model, loss, grads, op counts, execution line)."""
    torch.manual_seed(2)
    model = _model(tiny_llama, tmp_path, method=method, compute_dtype="float32", recompute=recompute, **kw)
    for m in model.modules():
        if hasattr(m, "magnitude"):
            m.magnitude.data.mul_(1 + 0.2 * torch.rand_like(m.magnitude))
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    loss, grads, counts = _profiled_step(model, ids, torch.ones_like(ids))
    return model, loss, grads, counts, model.qtune_engine.execution_report(1)


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_recompute_max_keeps_gate_up_and_skips_their_gemms(tiny_llama, tmp_path, compiled, method):
    """--recompute max: the checkpoint also keeps gate/up's outputs (QDoRA: their products u), so the
    recomputation runs neither their base GEMMs nor (QLoRA) their adapters' up-projections, with the loss and
    gradients of --recompute default. The dequantizations stay as many: the compiled backward dequantizes each
    weight once for the recomputed forward and dL/dx together."""
    from qtune.loader import load_config

    def run(recompute: str):
        _, loss, grads, counts, report = _policy_step(tiny_llama, tmp_path, method, recompute)
        return (loss, grads, sum(counts.get(k, 0) for k in ("aten::mm", "aten::addmm", "aten::addmm_")),
                counts.get("bitsandbytes::dequantize_4bit", 0), _kept(counts), report)

    loss_m, grads_m, gemms_m, deq_m, kept_m, report = run("max")
    loss_d, grads_d, gemms_d, deq_d, kept_d, _ = run("default")
    L = load_config(tiny_llama, False).num_hidden_layers
    assert report["layers"]["compiled"] == L and report["recompute"]["keep_mlp"] is True
    assert kept_m - kept_d == 2 * L  # gate and up, in the forward only
    assert deq_d == deq_m, (deq_d, deq_m)
    if method == "qlora":
        assert gemms_d - gemms_m == 4 * L, (gemms_d, gemms_m)  # base GEMM + adapter up-projection, each
    torch.testing.assert_close(loss_m, loss_d, **TOL[torch.float32])
    assert grads_m.keys() == grads_d.keys()
    for name in grads_d:
        torch.testing.assert_close(grads_m[name], grads_d[name], **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_recompute_weights_holds_the_dequantized_base_and_dequantizes_nothing(tiny_llama, tmp_path, compiled, method):
    """--recompute weights: max, and each quantized linear holds its dequantized weight from its layer's first
    training forward on. A later step then dequantizes nothing (forward, recomputation and backward read the
    held copy), with the loss and gradients of --recompute max; the copies equal the codes' dequantization and
    stay out of the state dict (nothing new is saved)."""
    from qtune.engine.linear import DENSE, DENSE_GROUP, drop_dense_weights
    from qtune.loader import load_config
    from quant import QuantLinear

    def run(recompute: str, **kw):
        model, loss, grads, counts, report = _policy_step(tiny_llama, tmp_path, method, recompute, **kw)
        run.grouped = _count(counts, "linear_lora_group")
        return model, loss, grads, counts.get("bitsandbytes::dequantize_4bit", 0), report

    model, loss_w, grads_w, deq_w, report = run("weights")
    grouped_w = run.grouped
    _, loss_m, grads_m, deq_m, _ = run("max")
    assert run.grouped == 0
    L = load_config(tiny_llama, False).num_hidden_layers
    assert report["layers"]["compiled"] == L and report["recompute"]["keep_weights"] is True
    assert report["recompute"]["level"] == "weights" and report["recompute"]["keep_mlp"] is True
    assert deq_m >= 7 * L and deq_w == 0, (deq_m, deq_w)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 7 * L
    for m in quantized:
        held = getattr(m, DENSE)
        assert held.dtype == torch.float32
        torch.testing.assert_close(held, m.qweight.dequantize(torch.float32), rtol=0, atol=0)
    # q/k/v and gate/up: their copies are rows of one stacked weight each, which one GEMM a group reads (the
    # forward only: max keeps q/k/v's and gate/up's outputs), with max's loss and gradients (one GEMM each there)
    for layer in model.model.layers:
        for group in ([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                      [layer.mlp.gate_proj, layer.mlp.up_proj]):
            stacked = getattr(group[0].base_layer, DENSE_GROUP)
            torch.testing.assert_close(stacked, torch.cat([m.base_layer.qweight.dequantize(torch.float32) for m in group]),
                                       rtol=0, atol=0)
            assert sum(getattr(m.base_layer, DENSE).numel() for m in group) == stacked.numel()
            storages = {getattr(m.base_layer, DENSE).untyped_storage().data_ptr() for m in group}
            assert storages == {stacked.untyped_storage().data_ptr()}  # views of the stack: no second copy
    assert grouped_w == 2 * L, grouped_w
    assert not any(DENSE in k for k in model.state_dict())
    torch.testing.assert_close(loss_w, loss_m, **TOL[torch.float32])
    assert grads_w.keys() == grads_m.keys()
    for name in grads_m:
        torch.testing.assert_close(grads_w[name], grads_m[name], **TOL[torch.float32], msg=name)
    assert drop_dense_weights(model) == 7 * L
    assert not any(DENSE in m._buffers or DENSE_GROUP in m._buffers for m in quantized)
    # --hold-layers 1: the first layer holds its copies, the second dequantizes as under max; both layers compiled
    # (the second's graph is a new signature, not a recompilation), with max's loss and gradients
    model, loss_h, grads_h, deq_h, report = run("weights", hold_layers=1)
    assert report["layers"] == {"compiled": L, "eager": 0} and report["reasons"] == {}
    assert report["recompute"]["held_layers"] == 1 and report["recompute"]["keep_weights"] is True
    holds = [sum(DENSE in m._buffers for m in layer.modules() if isinstance(m, QuantLinear))
             for layer in model.model.layers]
    assert holds == [7] + [0] * (L - 1), holds
    assert run.grouped == 2  # the first layer's two groups, on its stacked copies; the second's linears one by one
    assert deq_m == 14 * L - 3 and deq_h == 14 * (L - 1), (deq_h, deq_m)  # 7 forward + 7 backward a layer; the
    # first layer's q, k, v need none for dL/dx (the embeddings are frozen), and that layer holds its copies here
    torch.testing.assert_close(loss_h, loss_m, **TOL[torch.float32])
    for name in grads_m:
        torch.testing.assert_close(grads_h[name], grads_m[name], **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_recompute_none_compiles_uncheckpointed_blocks_that_recompute_nothing(tiny_llama, tmp_path, compiled, method):
    """--recompute none: the layers run as compiled graphs without a checkpoint, holding the dequantized base as
    weights does. A later step then runs each linear's forward once (no recomputation: per layer, o's and down's
    linear_lora and q/k/v's and gate/up's one linear_lora_group each, on their held stacked weights; nothing kept
    but QDoRA's row norms, no dequantization), with the loss and gradients of --recompute weights; the
    execution line says checkpointing is off. --no-gradient-checkpointing compiles its blocks the same way, without
    the held base: each weight is dequantized in the forward and saved by the graph for its dL/dx."""
    from qtune.loader import load_config

    def run(recompute: str, **kw):
        model, loss, grads, counts, report = _policy_step(tiny_llama, tmp_path, method, recompute, **kw)
        return (loss, grads, (_count(counts, "linear_lora"), _count(counts, "linear_lora_group")),
                counts.get("bitsandbytes::dequantize_4bit", 0), _kept(counts), report)

    loss_n, grads_n, fused_n, deq_n, kept_n, report = run("none")
    loss_w, grads_w, *_ = run("weights")
    # checkpointed, full would recompute all 7 linears (14 calls per layer): without a checkpoint it runs each once
    loss_o, grads_o, fused_o, deq_o, kept_o, report_o = run("full", gradient_checkpointing=False)
    L = load_config(tiny_llama, False).num_hidden_layers
    assert report["layers"]["compiled"] == L and report_o["layers"]["compiled"] == L
    assert report["recompute"] == {"level": "none", "checkpointing": False, "keep_attention": False, "keep_down": False,
                                   "keep_mlp": False, "keep_weights": True, "held_layers": 0}
    assert report_o["recompute"]["checkpointing"] is False and report_o["recompute"]["keep_weights"] is False
    assert fused_n == (2 * L, 2 * L) and fused_o == (7 * L, 0), (fused_n, fused_o)  # without held weights: 7 each
    assert kept_n == kept_o == (7 * L if method == "qdora" else 0) and deq_n == 0  # DoRA's row norms: a copy each
    assert deq_o == 7 * L  # in the forward only: the graph saves each dequantized weight for its dL/dx
    for loss, grads in ((loss_n, grads_n), (loss_o, grads_o)):
        torch.testing.assert_close(loss, loss_w, **TOL[torch.float32])
        assert grads.keys() == grads_w.keys()
        for name in grads_w:
            torch.testing.assert_close(grads[name], grads_w[name], **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("recompute", ["full", "default", "max", "weights", "none"])
def test_step_flops_counts_the_base_gemms_each_policy_runs(tiny_llama, tmp_path, compiled, recompute):
    """tools/harness.step_flops, given what the policy reruns (recomputed_linears of the run's execution line),
    against the FLOPs of the base linears' GEMMs that a compiled QLoRA step records (the profiler's input
    shapes, tools/profile_step's classifier): the same, save dL/dx of the first layer's q/k/v, which the frozen
    embeddings do not need. Without the policy (recomputed=None: every linear rerun, the peer's step) the
    formula counts more than full runs: down_proj's recomputation, which qtune skips."""
    import json

    from torch.profiler import ProfilerActivity, profile

    from tools import harness, profile_step

    model = _model(tiny_llama, tmp_path, compute_dtype="float32", recompute=recompute)
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    _loss_and_grads(model, ids, mask)  # compiles
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _loss_and_grads(model, ids, mask)
    config = json.loads((tiny_llama / "config.json").read_text())
    rank, vocab, hidden = 4, config["vocab_size"], config["hidden_size"]
    measured = sum(profile_step.mm_flops(e.key, [list(s) for s in e.input_shapes])
                   for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm", "aten::addmm_")
                   and profile_step.gemm_kind(e.key, [list(s) for s in e.input_shapes], rank, vocab) == "base linears"
                   for _ in range(e.count))
    rec = model.qtune_engine.execution_report(1)["recompute"]
    assert model.qtune_engine.execution_report(1)["layers"]["eager"] == 0
    flops = harness.step_flops(config, 2, 32, rank, recomputed=harness.recomputed_linears(rec),
                               checkpointing=rec["checkpointing"])
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    first_qkv_dx = 2 * 2 * 32 * hidden * (hidden + 2 * kv)
    assert measured == flops["step"]["linears"] - first_qkv_dx, (measured, flops["step"]["linears"])
    down = 2 * 2 * 32 * hidden * config["intermediate_size"] * config["num_hidden_layers"]
    everything = harness.step_flops(config, 2, 32, rank)["step"]["linears"]
    if recompute == "full":
        assert everything == flops["step"]["linears"] + down


def test_qdora_kept_products_skip_their_gemms_in_the_recomputation(tiny_llama, tmp_path, compiled):
    """QDoRA in a compiled block: the magnitude's gradient reads each product u = x·Wᵀ + s·hBᵀ, so with
    --recompute default q/k/v/o and down_proj keep their u; the recomputation then runs only gate and
    up's linear_lora where --recompute full runs all 7, with the loss and gradients of that run and the
    same dequantizations."""
    from qtune.loader import load_config

    def run(recompute: str):
        _, loss, grads, counts, _ = _policy_step(tiny_llama, tmp_path, "qdora", recompute)
        return (loss, grads, _count(counts, "linear_lora"), counts.get("bitsandbytes::dequantize_4bit", 0),
                (counts.get("qtune::keep", 0), counts.get("qtune::linear_lora_kept", 0)))

    loss_k, grads_k, fused_k, deq_k, kept = run("default")
    loss_r, grads_r, fused_r, deq_r, kept_full = run("full")
    L = load_config(tiny_llama, False).num_hidden_layers
    # forward only: the recomputation reads the kept products (and, under both, the 7 row norms)
    assert kept == (7 * L, 5 * L) and kept_full == (7 * L, 0)  # the row norms' copies; the products, no copy
    assert fused_r == (7 + 7) * L and fused_k == (7 + 2) * L, (fused_r, fused_k)
    assert deq_r == L * (7 + 7) and deq_k == deq_r - 3  # as in the QLoRA test above
    torch.testing.assert_close(loss_k, loss_r, **TOL[torch.float32])
    assert grads_k.keys() == grads_r.keys() and len(grads_k) == 3 * 7 * L
    for name in grads_r:
        torch.testing.assert_close(grads_k[name], grads_r[name], **TOL[torch.float32], msg=name)
