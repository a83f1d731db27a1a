"""DoRA on a frozen (quantized) base — QDoRA when the base is NF4.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row          (DoRA, arXiv 2402.09353, eq. 5)
    y  = x W'ᵀ + b = (m/n) ⊙ (x Wᵀ + s·(x Aᵀ)Bᵀ) + b,   n = ‖W + s·BA‖_row ∈ R^{out}

W' is never formed. n comes from the expansion, row i:
    n_i² = ‖W_i‖² + 2s·Σ_k B_ik (A Wᵀ)_ki + s²·Σ_k (B AAᵀ)_ik B_ik
whose pieces are x-independent: ‖W_i‖² is a constant of the frozen base (computed once, (out,)
floats), and A Wᵀ is a side product of the ONE dequantization of W the base GEMM needs anyway
(r extra rows). So no (out, in) temporary beyond that one dequantized W (dropped after the GEMM,
as in QLoRA) and no state that can go stale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quant import QuantLinear
from qtune.adapters.lora import _base_weight, fusable
from qtune.compile import maybe_compile
from qtune.memory import probe


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
    """n = ‖W + s·BA‖_row from the expansion (module docstring); fp32, (out,)."""
    cross = (lora_B * aw.float().T).sum(1)  # <W, BA>_row
    lowrank_sq = ((lora_B @ (lora_A @ lora_A.T)) * lora_B).sum(1)  # ‖BA‖²_row via the (r, r) Gram matrix
    return (w_sq + 2 * scale * cross + scale ** 2 * lowrank_sq).clamp_min(0).sqrt()


class _DoRALinearFn(torch.autograd.Function):
    """y = (m/n) ⊙ (x·D(W)ᵀ + s·(x·Aᵀ)·Bᵀ) + b as one autograd node, for DoRA with the norm detached
    (§4.3) and no dropout (the default). n is a constant of the step (no graph), so backward is
        u = x Wᵀ + s·h Bᵀ,  h = x Aᵀ,  c = m/n:   dL/dm = Σ_tokens g ⊙ u / n,  dL/du = c ⊙ g,
    then LoRA's backward on dL/du. u is formed in place (B's GEMM accumulates into x Wᵀ) and saved
    (one (tokens × out) tensor, where the eager graph kept two); W is dequantized once forward (x Wᵀ
    and A Wᵀ from it) and once backward. y = u + (c − 1) ⊙ u with c − 1 in bf16, as PEFT: c itself in
    bf16 would round to 1 early in training."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, base, scale: float, w_sq):
        dtype = x.dtype
        w, bias = _base_weight(base, dtype)
        a = lora_A.to(dtype)
        u = F.linear(x, w)                       # (..., out), becomes x Wᵀ + s·h Bᵀ below
        aw = F.linear(a, w)                      # (r, out)
        probe()
        del w
        with torch.no_grad():
            n = _row_norms(w_sq, lora_A.detach(), lora_B.detach(), aw, scale)
            delta = magnitude.detach() / n - 1   # (out,) fp32
        b_s = (lora_B * scale).to(dtype)
        h = F.linear(x, a)                       # (..., r)
        u.view(-1, u.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b_s.t())
        delta_c = delta.to(dtype)
        y = torch.addcmul(u, u, delta_c)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x, h, u, lora_A, lora_B, n, delta_c)
        ctx.base, ctx.scale = base, scale
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, h, u, lora_A, lora_B, n, delta_c = ctx.saved_tensors
        dtype, out_f = grad_out.dtype, grad_out.shape[-1]
        g = grad_out.reshape(-1, out_f)
        grad_m = (torch.sum(g * u.view(-1, out_f), 0, dtype=torch.float32) / n) if ctx.needs_input_grad[3] else None
        gu = torch.addcmul(g, g, delta_c)                                 # c ⊙ g
        a, b_s = lora_A.to(dtype), (lora_B * ctx.scale).to(dtype)
        gh = gu @ b_s                                                     # (N, r)
        grad_B = (gu.t() @ h.reshape(-1, h.shape[-1])).float().mul_(ctx.scale) if ctx.needs_input_grad[2] else None
        grad_A = (gh.t() @ x.reshape(-1, x.shape[-1])).float() if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            w, _ = _base_weight(ctx.base, dtype)
            grad_x = gu @ w
            probe()
            del w
            grad_x = grad_x.addmm_(gh, a).view(*grad_out.shape[:-1], -1)
        return grad_x, grad_A, grad_B, grad_m, None, None, None


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

    def _frozen_products(self, x: torch.Tensor, lora_A: torch.Tensor):
        """(x Wᵀ, A Wᵀ, ‖W‖²_row) without bias; gradient flows to x, and to A when it is not detached."""
        self._frozen_row_sq(x)
        if isinstance(self.base_layer, QuantLinear):
            return (*_DequantProductsFn.apply(x, lora_A, self.base_layer.qweight), self._row_sq)
        w = self.base_layer.weight.to(x.dtype)
        return F.linear(x, w), F.linear(lora_A.to(x.dtype), w), self._row_sq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_drop = self.dropout(x)  # identity in eval or with dropout 0
        two_inputs = x_drop is not x
        if self.detach_norm and not two_inputs and fusable(self.base_layer):  # the default: one node
            return _DoRALinearFn.apply(x, self.lora_A, self.lora_B, self.magnitude, self.base_layer,
                                       float(self.scale), self._frozen_row_sq(x))
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
