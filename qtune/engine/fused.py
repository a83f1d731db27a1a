"""The eager fast path: each adapted linear as one autograd node (fewer nodes, fewer full passes over
(tokens × out) tensors than autograd of the reference forward), never saving a dequantized weight:
backward dequantizes again. Tested against the adapters' reference forwards (tests/test_engine.py).

`keep` (qtune.engine.recompute): in a checkpoint's recomputation, a linear whose output backward does
not read skips its base GEMM (LoRA, RoSA), or takes the output it kept in the forward (DoRA, whose
magnitude gradient reads it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.rosa import RoSALinear
from qtune.engine.compiled import maybe_compile
from qtune.engine.ops import row_norms, sddmm, tokens_last
from qtune.memory import probe
from quant import QuantLinear
from quant.formats import can_scale_rows


def fusable(base: nn.Module) -> bool:
    """A frozen QuantLinear or nn.Linear without hooks (RoSA's mask selection taps the base's output)."""
    return (isinstance(base, (QuantLinear, nn.Linear)) and not base._forward_hooks and not base._forward_pre_hooks
            and not any(p.requires_grad for p in base.parameters()))


def dense_base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base's weight (out, in) in `dtype`, always a fresh tensor (dequantized, or a cast copy)."""
    if isinstance(base, QuantLinear):
        return base.qweight.dequantize(dtype)
    w = base.weight.to(dtype)
    return w.clone() if w.data_ptr() == base.weight.data_ptr() else w


class LoRANode(torch.autograd.Function):
    """y = x·(D(W) + S)ᵀ + b + s·(x_d·Aᵀ)·Bᵀ as one node (S: RoSA's sparse term, optional; x_d: x after
    dropout). The adapter's GEMM accumulates into the base GEMM's output (addmm_), and backward does the
    same for dL/dx = g·(D(W) + S) + (s·g·B)·A. Saved: x_d, h = x_d·Aᵀ, A, B (and x where dropout made
    x_d differ and S needs it). `skip_base`: only the adapter's part (a recomputation whose output
    backward does not read); the same tensors are saved. dL/dS's values come from one SDDMM."""

    @staticmethod
    def forward(ctx, x, x_d, lora_A, lora_B, base, scale: float, skip_base: bool, values=None, support=None):
        dtype = x.dtype
        a, b_s = lora_A.to(dtype), (lora_B * scale).to(dtype)  # (r, in), (out, r)
        h = F.linear(x_d, a)                                     # (..., r)
        if skip_base:
            y = F.linear(h, b_s)
        else:
            w = _weight(base, dtype, values, support)
            y = F.linear(x, w, None if base.bias is None else base.bias.to(dtype))
            probe()
            del w
            y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b_s.t())
        ctx.save_for_backward(x_d, h, lora_A, lora_B, values, x if support is not None and x_d is not x else None)
        ctx.base, ctx.scale, ctx.same_input, ctx.support = base, scale, x_d is x, support
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_d, h, lora_A, lora_B, values, x_sparse = ctx.saved_tensors
        dtype, out_f = grad_out.dtype, grad_out.shape[-1]
        g = grad_out.reshape(-1, out_f)
        a, b_s = lora_A.to(dtype), (lora_B * ctx.scale).to(dtype)
        gh = g @ b_s                                                      # (N, r) = s·g·B
        grad_B = (g.t() @ h.reshape(-1, h.shape[-1])).float().mul_(ctx.scale) if ctx.needs_input_grad[3] else None
        grad_A = (gh.t() @ x_d.reshape(-1, x_d.shape[-1])).float() if ctx.needs_input_grad[2] else None
        grad_x = grad_x_d = grad_values = None
        if ctx.needs_input_grad[0]:
            w = _weight(ctx.base, dtype, values, ctx.support)
            grad_x = g @ w                                                # (N, in)
            probe()
            del w
            if ctx.same_input:
                grad_x.addmm_(gh, a)
            grad_x = grad_x.view(*grad_out.shape[:-1], -1)
        if ctx.needs_input_grad[1] and not ctx.same_input:
            grad_x_d = (gh @ a).view(*grad_out.shape[:-1], -1)
        if ctx.needs_input_grad[7]:  # Σ_t g[t, row]·x[t, col] at S's support
            xs = x_d if x_sparse is None else x_sparse
            crow, cols, _ = ctx.support
            grad_values = sddmm(crow, cols, tokens_last(g, out_f), tokens_last(xs, xs.shape[-1]))
        return grad_x, grad_x_d, grad_A, grad_B, None, None, None, grad_values, None


def _weight(base, dtype, values, support) -> torch.Tensor:
    """D(W) in `dtype`, with S's values added in place (each sum formed in fp32) when given."""
    w = dense_base_weight(base, dtype)
    if support is not None:
        flat, indices = w.view(-1), support[2]
        flat.index_put_((indices,), (flat[indices].float() + values.float()).to(dtype))
    return w


def lora_node(layer: nn.Module, x: torch.Tensor, skip_base: bool) -> torch.Tensor:
    """A LoRALinear (or a RoSALinear, with its support) as one LoRANode."""
    values = support = None
    if isinstance(layer, RoSALinear) and layer.nnz:
        values, support = layer.sparse_values, (layer.csr_crow, layer.csr_cols, layer.sparse_indices)
    return LoRANode.apply(x, layer.dropout(x), layer.lora_A, layer.lora_B, layer.base_layer, float(layer.scale),
                          bool(skip_base), values, support)


# --- DoRA ------------------------------------------------------------------------------------------

ROW_SQ = "_qtune_row_sq"  # a non-persistent buffer the engine adds to a DoRA layer: ‖W‖²_row


def frozen_row_sq(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """‖W‖²_row (out,) fp32 of a DoRA layer's frozen base, as the GEMMs see W (in `dtype`): computed once,
    kept as a buffer so that a compiled block reads it as an input."""
    cached = getattr(layer, ROW_SQ, None)
    if cached is None or getattr(layer, ROW_SQ + "_dtype", None) != dtype or cached.device != layer.lora_A.device:
        with torch.no_grad():
            w = dense_base_weight(layer.base_layer, dtype).to(layer.lora_A.device)
            cached = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
        layer.register_buffer(ROW_SQ, cached, persistent=False)
        setattr(layer, ROW_SQ + "_dtype", dtype)
    return cached


def foldable(base: nn.Module) -> bool:
    """A QuantLinear whose block scales can carry a row scale c (quant's dequantize(row_scale=))."""
    return isinstance(base, QuantLinear) and can_scale_rows(base.qweight.shape, base.qweight.blocksize)


@maybe_compile
def _column_dots(g: torch.Tensor, u: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Σ_tokens g ⊙ u / den per output feature (out,), with fp32 products."""
    return (g.float() * u.float()).sum(0) / den


KEEP, REUSE = "keep", "reuse"  # a kept output: kept by the forward, reused by the recomputation


class DoRANode(torch.autograd.Function):
    """y = c ⊙ (x·D(W)ᵀ + s·(x·Aᵀ)·Bᵀ) + b, c = m/n, one node, for DoRA with the norm detached (§4.3)
    and no dropout. With u = x·Wᵀ + s·h·Bᵀ: dL/dm = Σ g ⊙ u / n, dL/du = c ⊙ g, then LoRA's backward.
    Where the base's blocks lie within rows (`foldable`), c is folded into the dequantized weight and
    into B, so y comes out of the GEMMs (dL/dm = Σ g ⊙ y / m̃, from y); otherwise y = u + (c − 1) ⊙ u,
    c − 1 in the compute dtype (c itself in bf16 would round to 1 early in training).
    `kept`: KEEP holds the output for backward; REUSE (the recomputation) skips the GEMM.
    `norms`: (c, m̃ or n) of an earlier forward with the same parameters (Engine.parameters_fixed),
    else computed here and appended to `sink` (a list) when one is given."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, base, scale: float, w_sq, kept: str | None = None,
                norms=None, sink=None):
        dtype, out_f = x.dtype, base.out_features
        fold = foldable(base)
        a = lora_A.to(dtype)
        w = None
        if norms is None:
            with torch.no_grad():
                w = dense_base_weight(base, dtype)
                n = row_norms(w_sq, lora_A, lora_B, F.linear(a, w), scale)      # (out,)
                m = torch.copysign(magnitude.abs().clamp_min(1e-20), magnitude)  # c ≠ 0 for the folded dL/dm
                norms = (m / n, m if fold else n)
            if sink is not None:
                sink.append(norms)
        c, den = norms
        h = F.linear(x, a)
        h2 = h.reshape(-1, h.shape[-1])
        b_c = (lora_B * (scale * c)[:, None]).to(dtype)  # (out, r) = diag(c)·s·B, also backward's
        if kept == REUSE:  # the recomputation: backward reads the output the forward kept
            del w
            y = torch.zeros((), dtype=dtype, device=x.device).expand(*x.shape[:-1], out_f)
            ctx.save_for_backward(x, h, y, lora_A, b_c, c, den)
            ctx.base, ctx.scale, ctx.fold = base, scale, fold
            return y
        if fold:
            w = base.qweight.dequantize(dtype, row_scale=c)               # diag(c)·D(W)
            y = F.linear(x, w)
            probe()
            del w
            y.view(-1, out_f).addmm_(h2, b_c.t())
            saved = y
        else:
            w = dense_base_weight(base, dtype) if w is None else w
            u = F.linear(x, w)
            probe()
            del w
            u.view(-1, out_f).addmm_(h2, (lora_B * scale).to(dtype).t())
            y = torch.addcmul(u, u, (c - 1).to(dtype))
            saved = u
        ctx.save_for_backward(x, h, saved, lora_A, b_c, c, den)
        ctx.base, ctx.scale, ctx.fold = base, scale, fold
        if kept == KEEP:  # a plain attribute: the checkpoint does not drop it
            ctx.kept = saved
        return y if base.bias is None else y + base.bias.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, h, saved, lora_A, b_c, c, den = ctx.saved_tensors
        kept = ctx.__dict__.pop("kept", None)  # freed now: the graph's nodes outlive their backward
        if kept is not None:
            saved = kept
        elif saved.numel() and not any(saved.stride()):
            raise RuntimeError("A second backward through a QDoRA graph (retain_graph=True) cannot reuse the "
                               "outputs kept for the first one; train with --recompute full.")
        dtype, out_f = grad_out.dtype, grad_out.shape[-1]
        g = grad_out.reshape(-1, out_f)
        grad_m = _column_dots(g, saved.view(-1, out_f), den) if ctx.needs_input_grad[3] else None
        gh = g @ b_c                                                      # (N, r) = s·(c ⊙ g)·B
        grad_B = ((g.t() @ h.reshape(-1, h.shape[-1])).float().mul_((ctx.scale * c)[:, None])
                  if ctx.needs_input_grad[2] else None)
        grad_A = (gh.t() @ x.reshape(-1, x.shape[-1])).float() if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.fold:
                w = ctx.base.qweight.dequantize(dtype, row_scale=c)      # diag(c)·D(W)
                grad_x = g @ w
            else:
                w = dense_base_weight(ctx.base, dtype)
                grad_x = torch.addcmul(g, g, (c - 1).to(dtype)) @ w      # (c ⊙ g)·D(W)
            probe()
            del w
            grad_x = grad_x.addmm_(gh, lora_A.to(dtype)).view(*grad_out.shape[:-1], -1)
        return grad_x, grad_A, grad_B, grad_m, None, None, None, None, None, None


STEP_NORMS = "_qtune_step_norms"  # a dict on a DoRA layer while its engine holds the parameters fixed


def dora_node(layer: nn.Module, x: torch.Tensor, kept: str | None) -> torch.Tensor:
    """A DoRALinear as one DoRANode. Inside Engine.parameters_fixed() (the micro-batches of one optimizer
    step, their recomputations included) its norms are computed once and reused."""
    store = getattr(layer, STEP_NORMS, None)
    norms = store.get(x.dtype) if store is not None else None
    sink = [] if store is not None and norms is None else None
    y = DoRANode.apply(x, layer.lora_A, layer.lora_B, layer.magnitude, layer.base_layer, float(layer.scale),
                       frozen_row_sq(layer, x.dtype), kept, norms, sink)
    if sink:
        store[x.dtype] = sink[0]
    return y
