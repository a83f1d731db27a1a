"""DoRA on a frozen (quantized) base — QDoRA when the base is NF4.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row          (DoRA, arXiv 2402.09353, eq. 5)
    y  = x W'ᵀ + b = (m/n) ⊙ (x Wᵀ + s·(x Aᵀ)Bᵀ) + b,   n = ‖W + s·BA‖_row ∈ R^{out}

W' is never formed. n comes from the expansion, row i:
    n_i² = ‖W_i‖² + 2s·Σ_k B_ik (A Wᵀ)_ki + s²·Σ_k (B AAᵀ)_ik B_ik
whose pieces are x-independent: ‖W_i‖² is a constant of the frozen base (computed once, (out,)
floats), and A Wᵀ comes from a dequantized W (r extra rows of GEMM). So no (out, in) temporary
beyond one dequantized W at a time (dropped after its GEMM, as in QLoRA).

The default path (_DoRALinearFn) folds c = m/n into the GEMMs' weights, reuses the forward's n in a
checkpoint's recomputation, and keeps down_proj's output for backward instead of recomputing it
(qtune.recompute); tools/bench_methods.py measures it against our QLoRA.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from quant import QuantLinear
from quant.formats import can_scale_rows
from qtune.adapters.lora import _base_weight, fusable, linear_lora_traced, lora_down, traced_base_weight
from qtune.compile import SAVED_OPS, keep, maybe_compile
from qtune.memory import probe
from qtune.recompute import recomputing


class _DequantProductsFn(torch.autograd.Function):
    """From one dequantization of the frozen W (out, in): (x Wᵀ, A Wᵀ).

    Like quant's dequant_linear it saves only the packed weight for backward and dequantizes again
    there."""

    @staticmethod
    def forward(ctx, x, lora_A, qweight):
        ctx.qweight = qweight
        w = qweight.dequantize(x.dtype)  # (out, in), freed on return
        out = F.linear(x, w), F.linear(lora_A.to(x.dtype), w)
        probe()  # a memory meter samples while w is alive
        return out

    @staticmethod
    def backward(ctx, grad_xw, grad_aw):
        w = ctx.qweight.dequantize(grad_xw.dtype)
        grad_x = grad_xw @ w if ctx.needs_input_grad[0] else None  # (..., out) @ (out, in)
        grad_a = (grad_aw.to(w.dtype) @ w).float() if ctx.needs_input_grad[1] else None  # (r, in)
        probe()
        return grad_x, grad_a, None


def _row_norms(w_sq, lora_A, lora_B, aw, scale):
    """n = ‖W + s·BA‖_row from the expansion (module docstring); fp32, (out,):
        n_i² = ‖W_i‖² + Σ_k B_ik·t_ik,   t = 2s·(A Wᵀ)ᵀ + s²·B·(A Aᵀ)   (out, r)
    (the cross term 2s<W, BA>_row and ‖s·BA‖²_row through the (r, r) Gram matrix): one addmm and one
    row-wise dot, few small ops, as this runs once per linear and step."""
    t = torch.addmm(aw.t().float(), lora_B, lora_A @ lora_A.t(), beta=2 * scale, alpha=scale * scale)
    return (w_sq + torch.linalg.vecdot(lora_B, t)).clamp_min(0).sqrt()


@maybe_compile
def _column_dots(g: torch.Tensor, u: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Σ_tokens g ⊙ u / den per output feature, (out,) fp32: compiled, one pass over both (tokens × out)
    inputs with fp32 products, where eager torch.sum(g * u, 0, dtype=float32) writes the bf16 product
    and then an fp32 copy of it (3× slower at out = 1536, and every product rounded to bf16)."""
    return (g.float() * u.float()).sum(0) / den


def _magnitude_scale(magnitude: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, m̃) with c = m̃/n, fp32 (out,). m̃ is m with exact zeros (and |m| < 1e-20) moved to ±1e-20:
    the folded path recovers dL/dm from y = c ⊙ u as Σ g ⊙ y / m̃, which needs c ≠ 0; such a row's
    output is then 1e-20·u/n instead of 0."""
    m = torch.copysign(magnitude.abs().clamp_min(1e-20), magnitude)
    return m / n, m


@torch.no_grad()
def _fused_norms(w, a, w_sq, lora_A, lora_B, magnitude, scale: float, fold: bool):
    """(c, m̃) for the folded path, (c, n) for the other (what _DoRALinearFn saves), from a dequantized W."""
    n = _row_norms(w_sq, lora_A, lora_B, F.linear(a, w), scale)  # F.linear(a, w) = A Wᵀ
    c, m_safe = _magnitude_scale(magnitude, n)
    return c, m_safe if fold else n


STASH_KEEP, STASH_REUSE = 1, 2


# parameters_fixed(): how deep inside it we are, and a number that changes on every entry and exit
_FIXED = {"depth": 0, "generation": 0}


@contextlib.contextmanager
def parameters_fixed():
    """Declares that the adapters' parameters do not change inside (the micro-batches of one optimizer
    step: qtune.train wraps them in it), so each DoRA layer computes its norms n = ‖W + s·BA‖ once and
    every forward reuses them, not only a checkpoint's recomputation: with --grad-accum k the plain
    dequantization, A·Wᵀ and the norm ops run once instead of k times. Entering and leaving it forget
    all norms, so an update between scopes that bumps no version counter cannot leave them stale."""
    _FIXED["depth"] += 1
    _FIXED["generation"] += 1
    try:
        yield
    finally:
        _FIXED["depth"] -= 1
        _FIXED["generation"] += 1


def foldable(base: nn.Module) -> bool:
    """A QuantLinear whose block scales can carry DoRA's row scale c (quant's dequantize(row_scale=)),
    in memory or offloaded (quant.offload: read once for the forward's two dequantizations)."""
    return isinstance(base, QuantLinear) and can_scale_rows(base.qweight.shape, base.qweight.blocksize)


class _DoRALinearFn(torch.autograd.Function):
    """y = c ⊙ (x·D(W)ᵀ + s·(x·Aᵀ)·Bᵀ) + b, c = m/n, as one autograd node, for DoRA with the norm
    detached (§4.3) and no dropout (the default). n is a constant of the step (no graph), so backward is
        u = x Wᵀ + s·h Bᵀ,  h = x Aᵀ:   dL/dm = Σ_tokens g ⊙ u / n,  dL/du = c ⊙ g,
    then LoRA's backward on dL/du.

    On a QuantLinear whose blocks lie within rows (`foldable`) c is folded into the weights instead
    of scaling (tokens × out) activations: D(W) is dequantized as diag(c)·W (c applied to the fp32
    block scales: one rounding, so a c within 2⁻⁹ of 1 still moves the bf16 weight) and B as
    diag(c)·s·B, so y comes out of the two GEMMs, and backward's dL/dx = g·diag(c)D(W) + (g·diag(c)sB)·A
    needs no c ⊙ g pass either; dL/dm = Σ g ⊙ y / m (c·n = m), from the saved y. Otherwise u is saved
    and y = u + (c − 1) ⊙ u with c − 1 in bf16, as PEFT: c itself in bf16 would round to 1 early in
    training.

    `norms` = (c, m̃ or n) from the forward this recomputation repeats (DoRALinear keeps them), so a
    recomputation skips A·D(W)ᵀ and the row norms; `sink` (a list) receives them when they are
    computed. Without norms a folded forward dequantizes W twice: plain for A·D(W)ᵀ (n needs it
    before c is known), then scaled."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, base, scale: float, w_sq, norms, sink, stash: int = 0):
        dtype, out_f = x.dtype, base.out_features
        fold = foldable(base)
        a = lora_A.to(dtype)
        if stash == STASH_REUSE:  # a recomputation whose output feeds nothing: backward reads the stash
            h = F.linear(x, a)
            if norms is None:
                norms = _fused_norms(_base_weight(base, dtype)[0], a, w_sq, lora_A, lora_B, magnitude, scale, fold)
            # a stand-in of the output's metadata, no memory: the checkpoint checks what is saved
            y = torch.zeros((), dtype=dtype, device=x.device).expand(*x.shape[:-1], out_f)
            b_c = (lora_B * (scale * norms[0])[:, None]).to(dtype)
            ctx.save_for_backward(x, h, y, lora_A, b_c, *norms)
            ctx.base, ctx.scale, ctx.fold = base, scale, fold
            return y
        w = None
        qweight = base.qweight.resident() if fold else None  # an offloaded weight: one read for both
        scales = qweight.block_scales() if fold else None     # decoded once for both dequantizations
        if norms is None:
            w, bias = (qweight.dequantize(dtype, scales=scales), base.bias) if fold else _base_weight(base, dtype)
            probe()
            norms = _fused_norms(w, a, w_sq, lora_A, lora_B, magnitude, scale, fold)
            if fold:
                del w
                w = None
        if sink is not None:
            sink.append(norms)
        c, den = norms
        b_c = (lora_B * (scale * c)[:, None]).to(dtype)  # (out, r) = diag(c)·s·B, also backward's
        h = F.linear(x, a)                       # (..., r)
        h2 = h.reshape(-1, h.shape[-1])
        if fold:
            bias = base.bias
            w = qweight.dequantize(dtype, row_scale=c, scales=scales)  # diag(c)·D(W)
            y = F.linear(x, w)
            probe()
            del w
            y.view(-1, out_f).addmm_(h2, b_c.t())
            kept = y                             # dL/dm = Σ g ⊙ y / m
        else:
            if w is None:
                w, bias = _base_weight(base, dtype)
            u = F.linear(x, w)                   # (..., out), becomes x Wᵀ + s·h Bᵀ below
            probe()
            del w
            u.view(-1, out_f).addmm_(h2, (lora_B * scale).to(dtype).t())
            y = torch.addcmul(u, u, (c - 1).to(dtype))
            kept = u                             # dL/dm = Σ g ⊙ u / n
        ctx.save_for_backward(x, h, kept, lora_A, b_c, c, den)
        ctx.base, ctx.scale, ctx.fold = base, scale, fold
        if stash == STASH_KEEP:  # a plain attribute: the checkpoint does not drop it
            ctx.stashed = kept
        return y if bias is None else y + bias.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, h, kept, lora_A, b_c, c, den = ctx.saved_tensors
        stashed = ctx.__dict__.pop("stashed", None)  # freed now: the graph's nodes outlive their backward
        if stashed is not None:
            kept = stashed
        elif kept.numel() and not any(kept.stride()):  # the recomputation's stand-in, and the stash is gone
            raise RuntimeError("A second backward through a QDoRA graph (retain_graph=True) cannot reuse the "
                               "down_proj outputs kept for the first one; train with --no-dora-stash.")
        dtype, out_f = grad_out.dtype, grad_out.shape[-1]
        g = grad_out.reshape(-1, out_f)
        grad_m = _column_dots(g, kept.view(-1, out_f), den) if ctx.needs_input_grad[3] else None
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
                w, _ = _base_weight(ctx.base, dtype)
                grad_x = torch.addcmul(g, g, (c - 1).to(dtype)) @ w      # (c ⊙ g)·D(W)
            probe()
            del w
            grad_x = grad_x.addmm_(gh, lora_A.to(dtype)).view(*grad_out.shape[:-1], -1)
        return grad_x, grad_A, grad_B, grad_m, None, None, None, None, None, None


@torch.library.custom_op("qtune::dora_row_norms", mutates_args=())
def dora_row_norms(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, w_sq: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """n = ‖W + s·BA‖_row (fp32, (out,)) from the dequantized W, without gradient (DoRA §4.3). One
    operator, so that a compiled layer's checkpoint keeps its output from the forward (an (out,)
    vector; qtune.compile.SAVED_OPS) instead of recomputing A·Wᵀ and the norms."""
    with torch.no_grad():
        return _row_norms(w_sq, lora_A, lora_B, F.linear(lora_A.to(w.dtype), w), scale)


@dora_row_norms.register_fake
def _(w, lora_A, lora_B, w_sq, scale):
    return w_sq.new_empty(w.shape[0], dtype=torch.float32)


SAVED_OPS.add(torch.ops.qtune.dora_row_norms.default)  # kept from the forward by a compiled layer's checkpoint


def dora_traced(layer: "DoRALinear", x: torch.Tensor, w_sq: torch.Tensor | None = None,
                h: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA with the norm detached and no dropout as plain differentiable ops, for a compiled decoder
    layer (qtune.compile.compile_decoder_layers; the compiler derives the backward):
        u = x·D(W)ᵀ + s·(x Aᵀ)Bᵀ (one addmm accumulating the adapter into the base GEMM's output),
        y = c ⊙ u + b,  c = m/n,  n = ‖W + s·BA‖_row from _row_norms, without gradient (§4.3).
    c multiplies u in fp32 (one fused pass when compiled): c rounded to bf16 would snap to 1 early in
    training. A·Wᵀ comes from the forward's dequantized W; n is one operator (dora_row_norms) whose
    output the compiled checkpoint keeps from the forward, so the recomputation does not redo it, as
    the eager node reuses the forward's n; dL/dm = Σ g ⊙ u / n and dL/du = c ⊙ g come out of the graph.
    dL/dm reads u, so where the layer's output is otherwise not needed in backward (down_proj, whose
    output only feeds the residual sum: stash_output_for_recompute) or is kept anyway (q, k, v under
    --keep-qkv: keep_product, in place of the attention's own copies, same bytes), u itself is kept
    (qtune.compile.keep) and the recomputation skips the base GEMM, as QLoRA's does.
    w_sq: ‖W‖²_row when the layer has it for x's dtype (DoRALinear.prepare_row_sq), else computed here;
    h = x·Aᵀ when already formed (qtune.adapters.lora.group_forward), else one lora_down."""
    base, dtype = layer.base_layer, x.dtype
    w = traced_base_weight(base, dtype)
    with torch.no_grad():
        if w_sq is None:
            w_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
    n = dora_row_norms(w, layer.lora_A.detach(), layer.lora_B.detach(), w_sq, float(layer.scale))
    if h is None:
        h = lora_down(x, layer.lora_A.to(dtype))
    u = linear_lora_traced(x, w, h, layer.lora_B, layer.scale)
    if layer.keep_product or layer.stash_output_for_recompute:
        u = keep(u)  # the checkpoint keeps u: the recomputation skips this base GEMM (dL/dm reads only u)
    y = (u.float() * (layer.magnitude / n)).to(dtype)
    bias = base.bias
    return y if bias is None else y + bias.to(dtype)


@maybe_compile
def _dora_combine(xw, xdw, lora, delta):
    """y = x Wᵀ + (m/n − 1) ⊙ x̃ Wᵀ + (m/n) ⊙ lora, one fused kernel (and one for its backward)."""
    return xw + (delta * xdw + (1 + delta) * lora)


class DoRALinear(nn.Module):
    """The frozen base linear (QuantLinear or nn.Linear) re-parameterised as magnitude ⊙ direction:

        y = (m/n) ⊙ (x Wᵀ + s·(x Aᵀ)Bᵀ) + b,  n = ‖W + s·BA‖_row     (DoRA, arXiv 2402.09353)

    A (r, in) Kaiming-uniform, B (out, r) zeros, m (out,) = ‖W‖_row of the dequantized base, so the
    layer equals the base at step 0. With detach_norm (DoRA §4.3) n is a constant in backward: no
    graph is kept through it. Dropout follows PEFT: the base term x Wᵀ (+ b) sees the clean x, the
    magnitude correction (m/n − 1) ⊙ (x̃ Wᵀ) and the low-rank term see the dropped-out x̃; that costs a
    second GEMM with W, so only while training with dropout > 0.
    """

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 detach_norm: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.scale, self.detach_norm = rank, scale, detach_norm
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT and the LoRA reference code
        self.magnitude = nn.Parameter(torch.empty(self.out_features, dtype=torch.float32))  # (out,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._row_sq = None  # ‖W‖²_row of the frozen base, (out,) fp32, filled on first use
        self._row_sq_key = None  # the (device, dtype) it was computed for
        self._norms = None  # (key, (c, m̃ or n)) of the last forward with grad, for its recomputation
        self.stash_output_for_recompute = False  # set by qtune.recompute where the output only feeds a sum
        self.keep_product = False  # a compiled layer keeps u from the forward (qtune.kernels.set_keep_qkv: q, k, v)
        self.reset_magnitude()

    def base_weight(self) -> torch.Tensor:
        """The dequantized base weight W (out, in), fp32 — one layer's copy, for init and export."""
        base = self.base_layer
        return base.dequantized_weight(torch.float32) if isinstance(base, QuantLinear) else base.weight.detach().float()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m ← ‖W + s·BA‖_row, so the layer equals W + s·BA. Call it again after loading PiSSA/LoftQ
        factors into A and B (at construction B = 0, so m = ‖W‖)."""
        self.magnitude.copy_(torch.linalg.vector_norm(self.merged_direction(self.base_weight()), dim=1))

    def _frozen_row_sq(self, x: torch.Tensor) -> torch.Tensor:
        """‖W‖²_row, a constant of the frozen base: computed once, from the dequantized W as the GEMMs
        see it (in x's dtype)."""
        if self._row_sq is None or self._row_sq_key != (x.device, x.dtype):
            with torch.no_grad():
                w = self.base_weight().to(device=x.device, dtype=x.dtype)
                self._row_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
                self._row_sq_key = (x.device, x.dtype)
        return self._row_sq

    def prepare_row_sq(self, dtype: torch.dtype) -> None:
        """Compute ‖W‖²_row for activations of `dtype` now (what the first forward would), so that a
        compiled layer reads it as an input instead of reducing W in every forward and recomputation."""
        self._frozen_row_sq(torch.empty(0, dtype=dtype, device=self.lora_A.device))

    def _norms_key(self, x: torch.Tensor, w_sq: torch.Tensor) -> tuple:
        """What c and n depend on. Only a recomputation reuses them, right after the forward it repeats,
        or a forward inside parameters_fixed() (whose entry and exit change the key), so an update that
        bumps no version counter (a raw-pointer optimizer kernel) cannot make them stale; the versions
        are a second guard."""
        base = self.base_layer
        w = base.qweight if isinstance(base, QuantLinear) else base.weight
        ps = (self.lora_A, self.lora_B, self.magnitude)
        return ((_FIXED["generation"], x.dtype, x.device, id(w), id(w_sq), getattr(w, "_version", None))
                + tuple((id(p), p._version) for p in ps))

    def _frozen_products(self, x: torch.Tensor, lora_A: torch.Tensor):
        """(x Wᵀ, A Wᵀ, ‖W‖²_row) without bias; gradient flows to x, and to A when it is not detached."""
        self._frozen_row_sq(x)
        if isinstance(self.base_layer, QuantLinear):
            return (*_DequantProductsFn.apply(x, lora_A, self.base_layer.qweight), self._row_sq)
        w = self.base_layer.weight.to(x.dtype)
        return F.linear(x, w), F.linear(lora_A.to(x.dtype), w), self._row_sq

    def traceable(self) -> bool:
        """Whether this layer has a compiled form (`traced`): the norm detached, no dropout, a fused base."""
        return self.detach_norm and isinstance(self.dropout, nn.Identity) and fusable(self.base_layer)

    def traced(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """The compiled layer's form of forward (dora_traced); h = x·Aᵀ when already formed."""
        known = self._row_sq is not None and self._row_sq_key == (x.device, x.dtype)
        return dora_traced(self, x, self._row_sq if known else None, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.traceable():  # a compiled decoder layer (qtune.compile)
            return self.traced(x)
        x_drop = self.dropout(x)  # identity in eval or with dropout 0
        two_inputs = x_drop is not x
        if self.detach_norm and not two_inputs and fusable(self.base_layer):  # the default: one node
            w_sq = self._frozen_row_sq(x)
            key = self._norms_key(x, w_sq)
            # a checkpoint's recomputation repeats the forward just made, and inside parameters_fixed()
            # the parameters are those of the last forward: reuse its c and n
            reuse = (recomputing() or _FIXED["depth"] > 0) and self._norms is not None and self._norms[0] == key
            norms = self._norms[1] if reuse else None
            sink = [] if norms is None and torch.is_grad_enabled() else None
            stash = 0
            if self.stash_output_for_recompute and torch.is_grad_enabled():
                stash = STASH_REUSE if recomputing() else STASH_KEEP
            y = _DoRALinearFn.apply(x, self.lora_A, self.lora_B, self.magnitude, self.base_layer,
                                    float(self.scale), w_sq, norms, sink, stash)
            if sink:
                self._norms = (key, sink[0])
            return y
        lora_A = self.lora_A.detach() if self.detach_norm else self.lora_A  # the A inside n only
        xw_all, aw, w_sq = self._frozen_products(torch.stack([x, x_drop]) if two_inputs else x, lora_A)
        xw, xdw = xw_all.unbind(0) if two_inputs else (xw_all, xw_all)  # (..., out) each: x Wᵀ, x̃ Wᵀ

        # DoRA §4.3: with detach_norm, n is a constant in backward, so build no graph for it at all
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):
            n = _row_norms(w_sq, lora_A, self.lora_B, aw, self.scale)  # (out,); aw = A Wᵀ (r, out)
        # m/n − 1, not m/n: early in training m/n is within 0.4% of 1, and rounding m/n itself to
        # bf16 would snap it to exactly 1.0 (the magnitude would have no effect); the small
        # difference keeps its relative precision in bf16, as PEFT computes it.
        delta = (self.magnitude / n - 1).to(x.dtype)  # (out,), broadcasts over (..., out)

        lora = self.scale * F.linear(F.linear(x_drop, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))  # (..., out)
        # PEFT's DoRA with dropout: the clean base plus corrections computed on the dropped-out input
        y = _dora_combine(xw, xdw, lora, delta)
        bias = self.base_layer.bias
        return y if bias is None else y + bias.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·BA, (out, in) fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def merged_direction(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W + s·BA (fp32), the un-normalised direction."""
        return base_weight.float() + self.delta_weight()

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row for the dequantized base weight (fp32), what export writes."""
        v = self.merged_direction(base_weight)  # (out, in)
        return (self.magnitude.float() / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1) * v
