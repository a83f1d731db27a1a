"""The loss: qtune's chunked cross-entropy equals torch's on the full logits, value and gradient."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import TOL
from qtune.engine import causal_lm_loss
from qtune.engine.loss import ChunkedCrossEntropy, ce_block_rows, ce_chunk_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_full_logits(dtype, chunk):
    torch.manual_seed(0)
    n, h, vocab = 50, 16, 300
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, h, dtype=dtype) * 0.3
    targets = torch.randint(vocab, (n,))
    loss = ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)
    (loss * 0.5).backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(ref_hidden, weight).float(), targets, reduction="sum")
    (ref * 0.5).backward()
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(atol=0.5, rtol=1e-2)  # bf16 GEMM over 300 logits
    torch.testing.assert_close(loss, ref.detach(), **tol)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, **TOL[dtype])


@pytest.mark.parametrize("compiled_loss", [False, True])  # the blocked (compiled) loss hands soft-capping to the chunks
@pytest.mark.parametrize("chunk", [7, 1000])
def test_softcapped_and_scaled_head_equal_the_naive_equation(chunk, compiled_loss, monkeypatch):
    """token_loss with the model's own head transforms (qtune.architectures.Head: Gemma's final soft-capping
    c·tanh(z/c), Granite's 1/logits_scaling) against the equation written here on the full fp32 logits."""
    import qtune.engine.compiled as qc
    from qtune.architectures import Head
    from qtune.engine.loss import token_loss

    monkeypatch.setattr(qc, "_enabled", compiled_loss)
    torch.manual_seed(0)
    b, t, h, vocab = 2, 20, 16, 300
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = torch.randn(vocab, h) * 0.5  # logits of order 2: soft-capping at 1.5 changes them a lot
    labels = torch.randint(vocab, (b, t))
    labels[1, 12:] = -100
    cap, scale = 1.5, 1 / 4.0
    loss, n = token_loss(hidden, weight, labels, chunk, scale=scale, softcap=cap)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    z = (ref_hidden @ weight.T) * scale
    z = cap * torch.tanh(z / cap)
    y = labels[:, 1:].reshape(-1)
    ref = F.cross_entropy(z[:, :-1].reshape(-1, vocab), y, ignore_index=-100, reduction="sum")
    ref.backward()
    assert n == int((y != -100).sum())
    torch.testing.assert_close(loss, ref.detach(), **TOL[torch.float32])
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, **TOL[torch.float32])
    plain, _ = token_loss(hidden.detach(), weight, labels, chunk)  # the transforms matter here
    assert abs(plain.item() - ref.item()) > 0.05 * ref.item()
    assert Head(scale, cap).apply(hidden.detach() @ weight.T).sub(z.detach()).abs().max() < 1e-5


def test_chunk_size_bounds_the_logits():
    assert ce_chunk_tokens(49152) * 49152 * 6 <= 64 * 2**20
    assert ce_chunk_tokens(10) == 4096 and ce_chunk_tokens(10**9) == 32
    # the compiled path: one vocabulary block's logits (4 bytes each) and the rows' sums (10 bytes a unit)
    assert ce_block_rows(49152, 576) * (4096 * 4 + 576 * 10) <= 64 * 2**20 < (ce_block_rows(49152, 576) + 1) * (4096 * 4 + 576 * 10)
    assert ce_block_rows(10, 8) == 4096 and ce_block_rows(10**9, 10**6) == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 32])
def test_vocabulary_blocked_cross_entropy_against_fp64(dtype, chunk, monkeypatch):
    """The compiled path's online softmax over vocabulary blocks (five of 64 columns, the last one of
    44; targets in every block, chunks of 32 rows or one chunk) against the loss and gradient of
    softmax(hWᵀ) − onehot(y) computed in fp64 on the full logits; evaluation (no gradient) gives the
    same loss."""
    import qtune.engine.compiled as qc
    import qtune.engine.loss as qm

    monkeypatch.setattr(qc, "_enabled", True)
    monkeypatch.setattr(qm, "CE_VOCAB_BLOCK", 64)
    torch.manual_seed(0)
    n, h, vocab = 70, 16, 300
    weight = torch.randn(vocab, h, dtype=dtype) * 0.3
    targets = torch.randint(vocab, (n,))
    targets[:5] = torch.tensor([0, 63, 64, 256, 299])  # block edges
    hidden = (torch.randn(n, h) * 2).to(dtype).requires_grad_()
    loss = ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)
    (loss * 0.5).backward()
    assert not qc._failed, "torch.compile failed on this machine; the blocked path was not tested"
    z = hidden.detach().double() @ weight.double().T
    ref = (torch.logsumexp(z, 1) - z[torch.arange(n), targets]).sum()
    p = torch.softmax(z, 1)
    p[torch.arange(n), targets] -= 1
    ref_grad = 0.5 * p @ weight.double()
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(atol=0.5, rtol=1e-2)  # bf16 logits
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(hidden.grad.double(), ref_grad, **(dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32
                                                                  else dict(atol=2e-2, rtol=2e-2)))
    with torch.no_grad():
        torch.testing.assert_close(ChunkedCrossEntropy.apply(hidden.detach(), weight, targets, chunk), loss.detach(),
                                   **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunk_matches_the_eager_one_and_torch(dtype, monkeypatch):
    """The fused (torch.compile) chunk kernel against the eager in-place path and torch's CE."""
    import qtune.engine.compiled as qc

    torch.manual_seed(0)
    n, h, vocab = 70, 16, 300
    weight = torch.randn(vocab, h, dtype=dtype) * 0.3
    targets = torch.randint(vocab, (n,))
    out = {}
    for compiled in (True, False):
        monkeypatch.setattr(qc, "_enabled", compiled)
        hidden = torch.randn(n, h, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
        loss = ChunkedCrossEntropy.apply(hidden, weight, targets, 32)
        loss.backward()
        out[compiled] = (loss.detach(), hidden.grad)
    assert not qc._failed, "torch.compile failed on this machine; the fused path was not tested"
    torch.testing.assert_close(out[True][0], out[False][0], **TOL[torch.float32])
    torch.testing.assert_close(out[True][1], out[False][1], **TOL[dtype])
    ref_hidden = torch.randn(n, h, dtype=dtype, generator=torch.Generator().manual_seed(1)).float().requires_grad_()
    ref = F.cross_entropy(ref_hidden @ weight.float().T, targets, reduction="sum")
    ref.backward()
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(atol=0.5, rtol=1e-2)
    torch.testing.assert_close(out[True][0], ref.detach(), **tol)
    torch.testing.assert_close(out[True][1].float(), ref_hidden.grad, **(TOL[torch.float32] if dtype == torch.float32
                                                                          else dict(atol=2e-2, rtol=2e-2)))


def _step_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss, _ = causal_lm_loss(model, ids, torch.ones_like(ids), ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["qlora", "qrosa"])
def test_recomputation_skips_down_proj_and_gradients_are_unchanged(tiny_llama, tmp_path, method, monkeypatch, compiled):
    """Checkpointing with down_proj's base skipped in the recomputation gives the gradients of a run
    without checkpointing, and dequantizes 7 + 6 + 7 times per layer instead of 7 + 7 + 7 (eager
    layers; compiled ones: tests/test_compiled_layers.py)."""
    from quant.formats import QuantizedWeight
    from qtune.config import TrainConfig
    from qtune.model import build_model
    from qtune.adapters.rosa import RoSALinear

    monkeypatch.setenv("QTUNE_COMPILE_LAYERS", "0")
    cfg = TrainConfig(model=str(tiny_llama), data="x", output=str(tmp_path / "r"), method=method, rank=4,
                      seq_len=32, batch_size=2, compute_dtype="float32", gradient_checkpointing=True)
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    torch.manual_seed(1)
    for m in model.modules():  # non-zero B (and a sparse support) so every adapter term matters
        if hasattr(m, "lora_B"):
            m.lora_B.data.normal_(0, 0.1)
        if isinstance(m, RoSALinear):
            m.set_support(torch.arange(0, m.in_features * m.out_features, 7))
            m.sparse_values.data.normal_(0, 0.1)
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    calls = []
    real = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model.train()
    loss_ckpt, grads_ckpt = _step_grads(model, ids)
    layers = len(model.model.layers)
    # the first layer's q, k, v need no dL/dx in backward (the embeddings are frozen): 3 fewer
    assert len(calls) == layers * (7 + 6 + 7) - 3
    model.qtune_engine.checkpointing = False
    calls.clear()
    loss_plain, grads_plain = _step_grads(model, ids)
    assert len(calls) == layers * (7 + 7) - 3
    torch.testing.assert_close(loss_ckpt, loss_plain, **TOL[torch.float32])
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_ckpt) > 0
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], **TOL[torch.float32], msg=name)


def test_attention_choice_and_eager_equals_sdpa(tiny_llama, tmp_path, compiled):
    """qtune's eager attention (compiled softmax) equals torch's sdpa inside qtune's block (fp32, GQA,
    left padding), and the choice between them follows the scores' size."""
    from qtune.config import TrainConfig
    from qtune.engine.attention import EAGER_ATTENTION_BYTES, choose_attention, eager_scores_bytes
    from qtune.model import build_model

    cfg = TrainConfig(model=str(tiny_llama), data="x", output=str(tmp_path / "r"), rank=4, seq_len=32,
                      batch_size=2, compute_dtype="float32")
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    config = model.config
    assert choose_attention(config, 4, 256, True) == "eager"
    assert choose_attention(config, 4, 256, False) == "sdpa"  # all layers' scores would be kept
    assert choose_attention(config, 4, 256, True, device="cuda") == "sdpa"
    big = next(s for s in (256 * 2 ** k for k in range(12)) if eager_scores_bytes(config, 4, s) > EAGER_ATTENTION_BYTES)
    assert choose_attention(config, 4, big, True) == "sdpa"
    assert model.qtune_engine.attention == "eager"
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the mask must reach both implementations
    labels = torch.where(mask.bool(), ids, -100)
    labels[1, 5] = -100  # predicted from a padded position, whose hidden state is implementation-defined
    out = {}
    for impl in ("eager", "sdpa"):
        model.qtune_engine.attention = impl
        model.zero_grad(set_to_none=True)
        loss, _ = causal_lm_loss(model, ids, mask, labels)
        loss.backward()
        out[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(out["eager"][0], out["sdpa"][0], **TOL[torch.float32])
    for a, b in zip(out["eager"][1], out["sdpa"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_a_failing_compile_falls_back_to_the_same_eager_result(monkeypatch):
    import warnings

    from torch._dynamo.exc import TorchDynamoException

    import qtune.engine.compiled as qc

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise TorchDynamoException("no C++ compiler")
        return run

    monkeypatch.setattr(qc, "_enabled", True)
    monkeypatch.setattr(qc, "_failed", False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    f = qc.maybe_compile(lambda x: x * 2 + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = f(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 3.0)) and qc._failed
    assert any("torch.compile failed" in str(w.message) for w in caught)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a, **k: (_ for _ in ()).throw(ValueError("real bug"))))
    monkeypatch.setattr(qc, "_failed", False)
    with pytest.raises(ValueError, match="real bug"):  # not a compiler failure: it surfaces
        qc.maybe_compile(lambda x: x)(torch.ones(1))


@pytest.mark.parametrize("t", [33, 8, 2])
def test_qtune_eager_attention_matches_naive_softmax_attention(t, compiled):
    """GQA without repeat_kv and the causal halves equal softmax(QKᵀ·s + mask)V written out (fp32),
    values and gradients, with left padding; rows with every key masked are left out (no label)."""
    from qtune.engine.attention import eager_attention

    torch.manual_seed(0)
    b, heads, kv, d = 2, 6, 2, 8
    q, k, v = (torch.randn(b, n, t, d, requires_grad=True) for n in (heads, kv, kv))
    neg = torch.finfo(torch.float32).min
    mask = torch.full((t, t), neg).triu(1).expand(b, 1, t, t).clone()
    pad = min(3, t - 1)
    mask[1, :, :, :pad] = neg  # left padding in the second row: its first `pad` queries see no key
    out = eager_attention(q, k, v, mask, 0.3)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g * _live(b, t, pad)[..., None, None])

    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    kk, vv = (x.repeat_interleave(heads // kv, dim=1) for x in (kr, vr))  # each KV head serves g query heads
    probs = torch.softmax(qr @ kk.transpose(2, 3) * 0.3 + mask, dim=-1)
    ref = (probs @ vv).transpose(1, 2)                                     # (b, t, heads, d)
    want = torch.autograd.grad(ref, (qr, kr, vr), g * _live(b, t, pad)[..., None, None])
    live = _live(b, t, pad).bool()
    torch.testing.assert_close(out[live], ref[live], **TOL[torch.float32])
    for name, got, exp in zip("qkv", grads, want):
        assert exp.abs().max() > 0
        torch.testing.assert_close(got, exp, **TOL[torch.float32], msg=lambda s: f"grad of {name}: {s}")


def _live(b, t, pad):
    """(b, t) 1.0 where a query sees at least one key: all but the second row's first `pad` positions."""
    live = torch.ones(b, t)
    live[1, :pad] = 0
    return live


def _dora_model(tiny_llama, tmp_path, stash: bool):
    from qtune.config import TrainConfig
    from qtune.model import build_model

    cfg = TrainConfig(model=str(tiny_llama), data="x", output=str(tmp_path / "r"), method="qdora", rank=4,
                      seq_len=32, batch_size=2, compute_dtype="float32", gradient_checkpointing=True,
                      recompute="default" if stash else "full")
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    torch.manual_seed(1)
    for m in model.modules():  # non-zero B and m ≠ ‖W‖, so every DoRA term matters
        if hasattr(m, "magnitude"):
            m.lora_B.data.normal_(0, 0.1)
            m.magnitude.data.mul_(1 + 0.1 * torch.randn_like(m.magnitude))
    model.train()
    return model


@pytest.mark.parametrize("stash", [True, False])
def test_dora_recomputation_keeps_down_proj_and_gradients_are_unchanged(tiny_llama, tmp_path, stash, monkeypatch,
                                                                         compiled):
    """QDoRA under eager checkpointing: each forward dequantizes each weight twice (plain for A·Wᵀ and the
    norms, then scaled); the recomputation of down_proj, whose output the forward kept
    (--recompute default), only the plain one for its norms. Gradients equal a run without
    checkpointing. (Eager layers, as on CUDA or with --no-compile; compiled ones: test_compiled_layers.)"""
    from quant.formats import QuantizedWeight

    monkeypatch.setenv("QTUNE_COMPILE_LAYERS", "0")
    model = _dora_model(tiny_llama, tmp_path, stash)
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    calls = {"plain": 0, "scaled": 0}
    real = QuantizedWeight.dequantize

    def counted(self, dtype=None, row_scale=None, scales=None):
        calls["plain" if row_scale is None else "scaled"] += 1
        return real(self, dtype, row_scale, scales)
    monkeypatch.setattr(QuantizedWeight, "dequantize", counted)
    loss_ckpt, grads_ckpt = _step_grads(model, ids)
    layers = len(model.model.layers)
    # forward: 7 plain + 7 scaled; recomputation: the same (down_proj: 1 plain, no scaled, when kept);
    # backward: 7 scaled
    assert calls == {"plain": layers * 14, "scaled": layers * (7 + (6 if stash else 7) + 7) - 3}
    model.qtune_engine.checkpointing = False
    calls.update(plain=0, scaled=0)
    loss_plain, grads_plain = _step_grads(model, ids)
    assert calls == {"plain": layers * 7, "scaled": layers * (7 + 7) - 3}
    torch.testing.assert_close(loss_ckpt, loss_plain, **TOL[torch.float32])
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_ckpt) > 0
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], **TOL[torch.float32], msg=name)


def test_dora_norms_once_per_optimizer_step_inside_parameters_fixed(tiny_llama, tmp_path):
    """Gradient accumulation: inside Engine.parameters_fixed() (train_step's micro-batches of one step)
    only the first forward computes eager QDoRA's norms (one plain dequantization per linear for all
    micro-batches and their recomputations), the gradients equal those computed without it, and
    leaving it forgets the norms, so an update that bumps no version counter (.data) is seen next."""
    from quant.formats import QuantizedWeight

    model = _dora_model(tiny_llama, tmp_path, stash=True)
    engine, L = model.qtune_engine, len(model.model.layers)
    batches = [torch.randint(3, model.config.vocab_size, (2, 32)) for _ in range(3)]
    calls = {"plain": 0}
    real = QuantizedWeight.dequantize

    def counted(self, dtype=None, row_scale=None, scales=None):
        calls["plain"] += row_scale is None
        return real(self, dtype, row_scale, scales)

    def accumulate(fixed: bool) -> dict:
        model.zero_grad(set_to_none=True)
        calls["plain"] = 0
        with engine.parameters_fixed() if fixed else contextlib.nullcontext():
            for ids in batches:
                loss, n = causal_lm_loss(model, ids, torch.ones_like(ids), ids)
                (loss / n).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    QuantizedWeight.dequantize = counted
    try:
        fixed, plain_fixed = accumulate(True), calls["plain"]
        free, plain_free = accumulate(False), calls["plain"]
    finally:
        QuantizedWeight.dequantize = real
    assert plain_fixed == L * 7  # the first micro-batch's forward only
    assert plain_free == L * 7 * 2 * len(batches)  # every forward and every recomputation
    for name in free:
        torch.testing.assert_close(fixed[name], free[name], **TOL[torch.float32], msg=name)
    ids = batches[0]
    with engine.parameters_fixed(), torch.no_grad():
        causal_lm_loss(model, ids, torch.ones_like(ids), ids)  # norms stored
    for m in model.modules():
        if hasattr(m, "magnitude"):
            m.lora_B.data.mul_(3.0)  # no version bump
    with engine.parameters_fixed(), torch.no_grad():
        got, _ = causal_lm_loss(model, ids, torch.ones_like(ids), ids)
    with torch.no_grad():
        want, _ = causal_lm_loss(model, ids, torch.ones_like(ids), ids)  # outside: norms computed afresh
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_dora_stash_is_freed_by_its_backward_and_a_second_backward_is_refused(tiny_llama, tmp_path):
    """The kept down_proj outputs go with their layer's backward, not with the graph (which lives as
    long as the loss does); a retain_graph second backward, which would need them, gets a clear error."""
    import weakref

    import qtune.engine.linear as engine_linear
    from qtune.engine.fused import KEEP

    model = _dora_model(tiny_llama, tmp_path, stash=True)
    kept = []
    real = engine_linear.dora_node

    def recording(layer, x, mode):
        out = real(layer, x, mode)
        if mode == KEEP:
            kept.append(weakref.ref(out))
        return out

    engine_linear.dora_node = recording
    try:
        _dora_stash_run(model, kept)
    finally:
        engine_linear.dora_node = real


def _dora_stash_run(model, kept):
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    loss, _ = causal_lm_loss(model, ids, torch.ones_like(ids), ids)
    assert len(kept) == len(model.model.layers) and all(r() is not None for r in kept)  # held for backward
    loss.backward(retain_graph=True)
    assert all(r() is None for r in kept)  # the loss and its graph are still alive
    with pytest.raises(RuntimeError, match="--recompute full"):
        loss.backward()


def test_a_retain_graph_second_backward_recomputes_again(tiny_llama, tmp_path):
    """The checkpoint enters the recomputation context it got once per backward: a second backward
    (retain_graph) recomputes with the down_proj skip again and doubles the gradients."""
    from qtune.config import TrainConfig
    from qtune.model import build_model

    cfg = TrainConfig(model=str(tiny_llama), data="x", output=str(tmp_path / "r"), rank=4, seq_len=32, batch_size=2,
                      compute_dtype="float32", gradient_checkpointing=True)
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            m.lora_B.data.normal_(0, 0.1)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    loss, _ = causal_lm_loss(model, ids, torch.ones_like(ids), ids)
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * once[n], **TOL[torch.float32], msg=n)
