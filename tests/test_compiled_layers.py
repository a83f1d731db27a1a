"""Whole decoder layers as compiled graphs (qtune.compile.CompiledLayerCheckpoint): the traceable
dequantization equals bitsandbytes' own, and a compiled, checkpointed layer gives the loss and
gradients of the eager fused nodes without checkpointing, dequantizing 7 + 7 times per layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TOL
from qtune.model import causal_lm_loss


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
                      gradient_checkpointing=True, **kw)
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    torch.manual_seed(1)
    for m in model.modules():  # non-zero B so that every adapter term matters
        if hasattr(m, "lora_B"):
            m.lora_B.data.normal_(0, 0.1)
    model.train()
    return model


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    loss, _ = causal_lm_loss(model, ids, mask, torch.where(mask.bool(), ids, -100))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,compute_dtype", [("qlora", "float32"), ("qlora", "bfloat16"), ("qdora", "float32"),
                                                  ("qdora", "bfloat16"), ("qrosa", "float32"), ("qrosa", "bfloat16")])
def test_compiled_layers_match_the_eager_fused_nodes(tiny_llama, tmp_path, method, compute_dtype, monkeypatch,
                                                     compiled):
    """QLoRA, QDoRA and QRoSA, left padding: compiled checkpointed layers against the same model without
    checkpointing (each linear one eager _LoRALinearFn / _DoRALinearFn node, no compiled layer). The
    compiled step calls no eager dequantize() and runs bitsandbytes' 4-bit decoder 7 times per layer
    forward and 7 in backward: its recomputation shares the weights with the gradient products (and
    for QLoRA leaves out down_proj's base GEMM, whose output backward never reads), where eager
    checkpointing needs 7 + 6 + 7 (QLoRA)."""
    from torch.profiler import ProfilerActivity, profile

    import qtune.compile as qc
    from quant.formats import QuantizedWeight
    from qtune.model import compilable_layer

    model = _model(tiny_llama, tmp_path, method=method, compute_dtype=compute_dtype)
    if method == "qdora":  # magnitudes away from the norms, so that m/n matters
        for m in model.modules():
            if hasattr(m, "magnitude"):
                m.magnitude.data.mul_(1 + 0.2 * torch.rand_like(m.magnitude))
    if method == "qrosa":  # a fixed support with non-zero values (RoSA compiles once it is fixed)
        from qtune.adapters.rosa import RoSALinear

        for m in model.modules():
            if isinstance(m, RoSALinear):
                m.set_support(torch.arange(0, m.in_features * m.out_features, 7))
                m.sparse_values.data.normal_(0, 0.1)
    layers = model.model.layers
    assert all(isinstance(layer._gradient_checkpointing_func, qc.CompiledLayerCheckpoint) for layer in layers)
    assert all(compilable_layer(layer) for layer in layers)
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    _loss_and_grads(model, ids, mask)  # compiles
    eager_calls = []
    real = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda self, *a, **k: eager_calls.append(1) or real(self, *a, **k))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_c, grads_c = _loss_and_grads(model, ids, mask)
    decoded = sum(e.count for e in prof.key_averages() if e.key == "bitsandbytes::dequantize_4bit")
    assert not qc._layers_failed and eager_calls == []
    assert decoded == len(layers) * (7 + 7)
    if method == "qdora":  # the checkpoint keeps the forward's row norms: not recomputed
        norms = sum(e.count for e in prof.key_averages() if e.key == "qtune::dora_row_norms")
        assert norms == len(layers) * 7
    model.gradient_checkpointing_disable()
    loss_e, grads_e = _loss_and_grads(model, ids, mask)
    assert len(eager_calls) >= len(layers) * (7 + 7)  # the eager reference did run eagerly
    tol = TOL[torch.float32] if compute_dtype == "float32" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss_c, loss_e, **tol)
    assert grads_c.keys() == grads_e.keys() and len(grads_c) == (2 if method == "qlora" else 3) * 7 * len(layers)
    for name in grads_e:
        if compute_dtype == "float32":
            torch.testing.assert_close(grads_c[name], grads_e[name], **tol, msg=name)
        else:  # bf16: rounding differs in places; the gradient as a whole must agree
            cos = torch.nn.functional.cosine_similarity(grads_c[name].flatten(), grads_e[name].flatten(), dim=0)
            assert cos > 0.999, (name, float(cos))


@pytest.mark.parametrize("kw", [dict(method="qdora", dora_detach_norm=False), dict(method="qlora", dropout=0.1),
                                dict(method="qlora", compile=False)])
def test_layers_that_are_not_compiled(tiny_llama, tmp_path, kw, compiled):
    """DoRA with the norm's gradient, dropout, and --no-compile keep transformers' eager checkpoint
    function (so does a RoSA layer until its support is fixed, and any layer whose linears carry
    hooks, as while RoSA selects it); the plan counts one linear's dequantized buffer for them, one
    layer's for compiled QLoRA and QDoRA (and QDoRA's down_proj stash, kept as its product u)."""
    import qtune.compile as qc
    from qtune.config import TrainConfig
    from qtune.model import compilable_layer, compiles_layers
    from qtune.plan import plan_memory

    model = _model(tiny_llama, tmp_path, **kw)
    assert not any(isinstance(layer._gradient_checkpointing_func, qc.CompiledLayerCheckpoint)
                   and compilable_layer(layer) for layer in model.model.layers)
    rosa = _model(tiny_llama, tmp_path, method="qrosa")
    layer = rosa.model.layers[0]
    assert not compilable_layer(layer)  # no support yet
    for m in layer.modules():
        if hasattr(m, "set_support"):
            m.set_support(torch.arange(0, m.in_features * m.out_features, 7))
    assert compilable_layer(layer)
    handle = layer.self_attn.q_proj.base_layer.register_forward_hook(lambda *a: None)
    assert not compilable_layer(layer)
    handle.remove()
    cfg = TrainConfig(model=str(tiny_llama), data="x", compute_dtype="bfloat16", output=str(tmp_path / "p"), rank=4, seq_len=32, batch_size=2,
                      gradient_checkpointing=True, **kw)
    assert not compiles_layers(cfg)
    plain = TrainConfig(model=str(tiny_llama), data="x", compute_dtype="bfloat16", output=str(tmp_path / "p"), rank=4, seq_len=32, batch_size=2,
                        gradient_checkpointing=True)
    assert compiles_layers(plain) and not compiles_layers(plain, device="cuda")
    dora = TrainConfig(model=str(tiny_llama), data="x", compute_dtype="bfloat16", output=str(tmp_path / "p"), rank=4, seq_len=32, batch_size=2,
                       gradient_checkpointing=True, method="qdora")
    assert compiles_layers(dora)
    dora_plan = plan_memory(dora)
    h, i = model.config.hidden_size, model.config.intermediate_size
    stash = model.config.num_hidden_layers * 2 * 32 * h * 2  # compiled QDoRA keeps down_proj's u too: L·b·t·h bf16
    kept_o = stash  # QLoRA keeps the attention's output (L·b·t·h bf16), QDoRA o_proj's product u: the same bytes
    assert dora_plan.layer_inputs == plan_memory(plain).layer_inputs + stash
    dora_no_o = dataclasses.replace(dora, target_modules=[m for m in dora.target_modules if m != "o_proj"])
    assert plan_memory(dora_no_o).layer_inputs == plan_memory(plain).layer_inputs - kept_o + stash - (
        model.config.num_hidden_layers * 2 * 32 * 4 * 2)  # and o_proj's h = x·Aᵀ (L·b·t·r) is not there
    kv = model.config.num_key_value_heads * (h // model.config.num_attention_heads)
    kept_qkv = model.config.num_hidden_layers * 2 * 32 * (h + 2 * kv) * 2
    recomputed = dataclasses.replace(plain, keep_qkv=False)
    assert plan_memory(plain).layer_inputs - plan_memory(recomputed).layer_inputs == kept_qkv + kept_o
    assert plan_memory(plain).dequant_buffers == (2 * h * h + 2 * h * kv + 3 * h * i) * 2
    assert plan_memory(cfg).dequant_buffers == h * i * 2  # the largest linear, bf16


def test_a_failing_compile_falls_back_to_eager_layers(tiny_llama, tmp_path, monkeypatch, compiled):
    """A compiler failure (no C++ compiler, say) warns once and the step runs the eager checkpoint,
    with the loss and gradients of the model without checkpointing."""
    import qtune.compile as qc
    from torch._dynamo.exc import TorchDynamoException

    model = _model(tiny_llama, tmp_path, compute_dtype="float32")
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    mask = torch.ones_like(ids)

    def broken(*a, **k):
        raise TorchDynamoException("no compiler here")
    monkeypatch.setattr(qc, "_compiled_checkpoint", broken)
    with pytest.warns(UserWarning, match="decoder layers failed"):
        loss_f, grads_f = _loss_and_grads(model, ids, mask)
    assert qc._layers_failed
    _loss_and_grads(model, ids, mask)  # once failed, the eager layers without trying again
    monkeypatch.setattr(qc, "_layers_failed", False)  # for the fixture's check: the failure was the test's
    model.gradient_checkpointing_disable()
    loss_e, grads_e = _loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss_f, loss_e, **TOL[torch.float32])
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], **TOL[torch.float32], msg=name)


def test_kept_qkv_skip_their_gemms_in_the_recomputation(tiny_llama, tmp_path, compiled):
    """--keep-qkv (default): a compiled layer's checkpoint keeps the attention's q, k (after the
    rotary embedding), v and output (o_proj's) from the forward (qtune.compile.keep), so its
    recomputation runs neither q/k/v/o's base GEMMs nor their adapters' up-projections: 4 + 4 fewer
    GEMM calls per layer and step, the same dequantizations (backward's input gradients still read
    the weights), and the loss and gradients of --no-keep-qkv."""
    from torch.profiler import ProfilerActivity, profile

    from qtune import kernels

    def run(keep: bool):
        model = _model(tiny_llama, tmp_path, compute_dtype="float32", keep_qkv=keep)
        assert all(getattr(layer.self_attn, kernels.KEEP_QKV) is keep for layer in model.model.layers)
        ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        _loss_and_grads(model, ids, mask)  # compiles
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss, grads = _loss_and_grads(model, ids, mask)
        counts = {e.key: e.count for e in prof.key_averages()}
        gemms = sum(counts.get(k, 0) for k in ("aten::mm", "aten::addmm", "aten::addmm_"))
        return loss, grads, gemms, counts.get("bitsandbytes::dequantize_4bit", 0), counts.get("qtune::keep", 0)

    loss_k, grads_k, gemms_k, deq_k, kept = run(True)
    loss_r, grads_r, gemms_r, deq_r, none = run(False)
    from qtune.loader import load_config

    L = load_config(tiny_llama, False).num_hidden_layers
    assert kept == 4 * L and none == 0  # forward only: the recomputation reads the kept copies
    assert gemms_r - gemms_k == 8 * L, (gemms_r, gemms_k)
    assert deq_k == deq_r == L * (7 + 7)
    torch.testing.assert_close(loss_k, loss_r, **TOL[torch.float32])
    assert grads_k.keys() == grads_r.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_k[name], grads_r[name], **TOL[torch.float32], msg=name)


def test_qdora_kept_products_skip_their_gemms_in_the_recomputation(tiny_llama, tmp_path, compiled):
    """QDoRA in a compiled layer: the magnitude's gradient reads each product u = x·Wᵀ + s·hBᵀ, so
    with --keep-qkv q/k/v/o keep their u (not the attention's copies: DoRALinear.keep_product) and with
    the down_proj stash (default) down_proj keeps its u; the recomputation then runs only gate and
    up's linear_lora (base GEMM + up-projection) where --no-keep-qkv --no-dora-stash runs all 7, with
    the loss and gradients of that run and the same dequantizations."""
    from torch.profiler import ProfilerActivity, profile

    from qtune import kernels
    from qtune.loader import load_config

    def run(keep: bool):
        model = _model(tiny_llama, tmp_path, method="qdora", compute_dtype="float32", keep_qkv=keep, dora_stash=keep)
        for m in model.modules():  # magnitudes away from the norms, so that m/n matters
            if hasattr(m, "magnitude"):
                m.magnitude.data.mul_(1 + 0.2 * torch.rand_like(m.magnitude))
        attn = [layer.self_attn for layer in model.model.layers]
        assert all(getattr(a, kernels.KEEP_QKV) is False for a in attn)
        assert all(getattr(a, p).keep_product is keep for a in attn for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        _loss_and_grads(model, ids, mask)  # compiles
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss, grads = _loss_and_grads(model, ids, mask)
        counts = {e.key: e.count for e in prof.key_averages()}
        return (loss, grads, counts.get("qtune::linear_lora", 0), counts.get("bitsandbytes::dequantize_4bit", 0),
                counts.get("qtune::keep", 0))

    torch.manual_seed(2)
    loss_k, grads_k, fused_k, deq_k, kept = run(True)
    torch.manual_seed(2)
    loss_r, grads_r, fused_r, deq_r, none = run(False)
    L = load_config(tiny_llama, False).num_hidden_layers
    assert kept == 5 * L and none == 0  # forward only: the recomputation reads the kept products
    assert fused_r == (7 + 7) * L and fused_k == (7 + 2) * L, (fused_r, fused_k)
    assert deq_k == deq_r == L * (7 + 7)
    torch.testing.assert_close(loss_k, loss_r, **TOL[torch.float32])
    assert grads_k.keys() == grads_r.keys() and len(grads_k) == 3 * 7 * L
    for name in grads_r:
        torch.testing.assert_close(grads_k[name], grads_r[name], **TOL[torch.float32], msg=name)
