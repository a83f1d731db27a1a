"""LoRA on a frozen (quantized) base — QLoRA when the base is NF4.

    y = x · D(Q(W))ᵀ + s · (dropout(x) · Aᵀ) · Bᵀ          (LoRA, arXiv 2106.09685; QLoRA, arXiv 2305.14314)

A ∈ R^{r×in} Kaiming-uniform, B ∈ R^{out×r} zeros, so the layer equals the base at step 0.
s = α/r, or α/√r with rsLoRA (arXiv 2312.03732). A and B are kept in fp32 (the optimizer's master
copy) and cast to the activation dtype (bf16) for the two thin GEMMs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtune.compile import FLEXIBLE, SAVED_OPS
from qtune.memory import probe
from qtune.recompute import can_skip
from quant import QuantLinear


class _LoRALinearFn(torch.autograd.Function):
    """y = x·D(W)ᵀ (+ bias) + s·(x_d·Aᵀ)·Bᵀ as one autograd node (x_d: x after dropout).

    Eager autograd runs a LoRA linear as ~8 nodes (two casts, three GEMMs, a scale, an add) with
    two full (tokens × out) passes for the scale and the add, and sums dL/dx's two parts in a third.
    Here the adapter's output GEMM accumulates into the base GEMM's output (addmm_, the scale folded
    into the r-column B) and backward does the same for dL/dx: dL/dx = g·D(W) + (s·g·B)·A. Saved:
    x_d and h = x_d·Aᵀ (as eager LoRA saves) and A, B; never the dequantized weight, which backward
    dequantizes again. `skip_base` (the recomputation of an output that only feeds a sum, see
    qtune.recompute) leaves out the base GEMM and saves the same tensors.
    With RoSA's sparse term (`sparse_values`, `sparse`) the base weight becomes W + S (see
    _base_weight), and backward adds dL/dvalues by an SDDMM; x is saved too when dropout makes x_d
    differ from it."""

    @staticmethod
    def forward(ctx, x, x_d, lora_A, lora_B, base, scale: float, skip_base: bool, sparse_values=None, sparse=None):
        dtype = x.dtype
        a, b_s = lora_A.to(dtype), (lora_B * scale).to(dtype)  # (r, in), (out, r): tiny
        h = F.linear(x_d, a)                                     # (..., r)
        if skip_base:  # the sparse term x·Sᵀ (RoSA) only feeds the same unused sum: skipped with the base
            y = F.linear(h, b_s)
        else:
            w, bias = _base_weight(base, dtype, sparse, sparse_values)
            y = F.linear(x, w, None if bias is None else bias.to(dtype))
            probe()
            del w
            y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b_s.t())
        # the same tensors with or without skip_base: a recomputation must save what the forward saved
        ctx.save_for_backward(x_d, h, lora_A, lora_B, sparse_values, x if sparse is not None and x_d is not x else None)
        ctx.base, ctx.scale, ctx.same_input, ctx.sparse = base, scale, x_d is x, sparse
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_d, h, lora_A, lora_B, sparse_values, x_sparse = ctx.saved_tensors
        dtype, out_f = grad_out.dtype, grad_out.shape[-1]
        g = grad_out.reshape(-1, out_f)
        a, b_s = lora_A.to(dtype), (lora_B * ctx.scale).to(dtype)
        gh = g @ b_s                                                      # (N, r) = s·g·B
        grad_B = (g.t() @ h.reshape(-1, h.shape[-1])).float().mul_(ctx.scale) if ctx.needs_input_grad[3] else None
        grad_A = (gh.t() @ x_d.reshape(-1, x_d.shape[-1])).float() if ctx.needs_input_grad[2] else None
        grad_x = grad_x_d = grad_values = None
        if ctx.needs_input_grad[0]:
            w, _ = _base_weight(ctx.base, dtype, ctx.sparse, sparse_values)
            grad_x = g @ w                                                # (N, in)
            probe()
            del w
            if ctx.same_input:
                grad_x.addmm_(gh, a)
            grad_x = grad_x.view(*grad_out.shape[:-1], -1)
        if ctx.needs_input_grad[1] and not ctx.same_input:
            grad_x_d = (gh @ a).view(*grad_out.shape[:-1], -1)
        if ctx.needs_input_grad[7]:  # RoSA: dL/dS at S's support, Σ_t g[t, row]·x[t, col] (SDDMM)
            xs = x_d if x_sparse is None else x_sparse
            grad_values = ctx.sparse.values_grad(g, xs.reshape(-1, xs.shape[-1]))
        return grad_x, grad_x_d, grad_A, grad_B, None, None, None, grad_values, None


def _base_weight(base: nn.Module, dtype: torch.dtype, sparse=None,
                 sparse_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen base's weight in `dtype` (dequantized for a QuantLinear) and its bias; with a
    sparse term (RoSA), W + S: S's nnz values added into that (out, in) weight, which the GEMM forms
    anyway, so x·(W + S)ᵀ is one GEMM (never a copy of the base's own parameter)."""
    if isinstance(base, QuantLinear):
        w = base.qweight.dequantize(dtype)  # a fresh tensor
    else:
        w = base.weight.to(dtype)
        if sparse is not None and w.data_ptr() == base.weight.data_ptr():
            w = w.clone()
    if sparse is not None:
        sparse.fold_(w, sparse_values)
    return w, base.bias


def fusable(base: nn.Module) -> bool:
    """A base the fused LoRA node can compute: a QuantLinear or a frozen nn.Linear, without hooks
    (RoSA's support selection taps the base's output)."""
    return (isinstance(base, (QuantLinear, nn.Linear)) and not base._forward_hooks and not base._forward_pre_hooks
            and not any(p.requires_grad for p in base.parameters()))


def traced_base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The fused node's frozen base weight (out, in) in `dtype`, traceable: a QuantLinear's through
    bitsandbytes' registered operators (QuantizedWeight.dequantize_traced), an nn.Linear's cast."""
    return base.qweight.dequantize_traced(dtype) if isinstance(base, QuantLinear) else base.weight.to(dtype)


def add_lora_traced(y: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """y + h·(s·B)ᵀ in one addmm (the adapter accumulated into the base GEMM's output, as the eager
    fused nodes do), y (..., out), h (..., r); traceable."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), (lora_B * scale).to(y.dtype).t())
    return out.view(y.shape)


@torch.library.custom_op("qtune::linear_lora", mutates_args=(), tags=FLEXIBLE)
def linear_lora(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """y = x·wᵀ + h·b_sᵀ, (..., in) x (out, in) and (..., r) x (out, r) -> (..., out): a frozen base's
    GEMM with the adapter's up-projection accumulated into its output in place (addmm_), as the eager
    node does, for a compiled layer. Written as F.linear then addmm, inductor gives the addmm a fresh
    output and first copies the base GEMM's (tokens × out) result into it: one full pass per linear,
    forward and recomputation (7 + 3 per Llama layer). Its backward (traced into the compiled
    backward) is the products autograd would form: dL/dx = g·w, dL/dh = g·b_s, dL/db_s = gᵀ·h (and
    dL/dw = gᵀ·x, never asked for a frozen base)."""
    y = F.linear(x, w)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b_s.t())
    return y


@linear_lora.register_fake
def _(x, w, h, b_s):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _linear_lora_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _linear_lora_backward(ctx, g):
    x, w, h, b_s = ctx.saved_tensors
    g2 = g.reshape(-1, g.shape[-1])
    need = ctx.needs_input_grad
    grad_x = (g2 @ w).view(x.shape) if need[0] else None
    grad_w = g2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    grad_h = (g2 @ b_s).view(h.shape) if need[2] else None
    grad_b = g2.t() @ h.reshape(-1, h.shape[-1]) if need[3] else None
    return grad_x, grad_w, grad_h, grad_b


linear_lora.register_autograd(_linear_lora_backward, setup_context=_linear_lora_setup)


def linear_lora_traced(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """x·wᵀ + h·(s·B)ᵀ for a compiled layer: one linear_lora (the adapter accumulated in place into the
    base GEMM's output); traceable."""
    return linear_lora(x, w, h, (lora_B * scale).to(x.dtype))


@torch.library.custom_op("qtune::lora_down", mutates_args=(), tags=FLEXIBLE)
def lora_down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """h = x·aᵀ, (..., in) x (r, in) -> (..., r): the adapters' down-projection in a compiled layer.
    One operator so that the layer's checkpoint keeps h from the forward (qtune.compile.SAVED_OPS:
    r columns per linear, 7 MB a step for SmolLM2's 210 linears at r = 16) instead of redoing the
    skinny GEMM in the recomputation; its backward (traced into the compiled backward) is the two
    products autograd would form, dL/dx = g_h·a and dL/da = g_hᵀ·x."""
    return F.linear(x, a)


@lora_down.register_fake
def _(x, a):
    return x.new_empty(*x.shape[:-1], a.shape[0])


def _lora_down_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _lora_down_backward(ctx, g_h):
    x, a = ctx.saved_tensors
    g2 = g_h.reshape(-1, g_h.shape[-1])
    grad_x = (g2 @ a).view(x.shape) if ctx.needs_input_grad[0] else None
    grad_a = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    return grad_x, grad_a


lora_down.register_autograd(_lora_down_backward, setup_context=_lora_down_setup)
SAVED_OPS.add(torch.ops.qtune.lora_down.default)  # kept from the forward by a compiled layer's checkpoint


def lora_traced(layer: nn.Module, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """The fused node's forward as plain differentiable ops, for a compiled decoder layer
    (qtune.compile.compile_decoder_layers): torch.compile traces it into the layer's graph and
    derives the backward, and its partitioner drops from the recomputation what backward never
    reads (down_proj's base GEMM: qtune.recompute's skip, found by the compiler). Same products
    and the same accumulation as _LoRALinearFn: y = x·D(W)ᵀ, then y += h·(s·B)ᵀ in one addmm_
    (linear_lora), with h = x·Aᵀ from lora_down (kept from the forward), or given: the slice of one
    product for the linears that read the same x (group_forward)."""
    base, dtype = layer.base_layer, x.dtype
    if h is None:
        h = lora_down(layer.dropout(x), layer.lora_A.to(dtype))
    if not isinstance(base, (QuantLinear, nn.Linear)):
        return base(x) + layer.scale * F.linear(h, layer.lora_B.to(dtype))
    y = linear_lora_traced(x, traced_base_weight(base, dtype), h, layer.lora_B, layer.scale)
    return y if base.bias is None else y + base.bias.to(dtype)


def group_forward(modules: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """[m(x) for m in modules], for linears that read the same x (a layer's q/k/v, gate/up).
    In a compiled decoder layer, when each is an adapter with a compiled form (`traced(x, h)`) and
    no dropout, their down-projections are one GEMM, h = x·[A₁; A₂; …]ᵀ (one lora_down, split by
    columns), and so are their backward's dL/dx and dL/dA products: per Llama layer 5 + 5 + 5 + 5
    skinny GEMMs (forward, recomputation, two in backward) become 2 + 0 + 2 + 2. The base GEMMs and
    the up-projections stay one per linear. Elsewhere each module runs its own forward."""
    if (len(modules) > 1 and torch.compiler.is_compiling()
            and all(callable(getattr(m, "traced", None)) and isinstance(getattr(m, "dropout", None), nn.Identity)
                    and m.traceable() for m in modules)):
        hs = lora_down(x, torch.cat([m.lora_A for m in modules]).to(x.dtype)).split([m.rank for m in modules], -1)
        return [m.traced(x, h) for m, h in zip(modules, hs)]
    return [m(x) for m in modules]


def lora_forward(layer: nn.Module, x: torch.Tensor, skip_base: bool, sparse: tuple | None = None) -> torch.Tensor:
    """base(x) + s·dropout(x)·Aᵀ·Bᵀ for a LoRA-style layer (lora_A, lora_B, scale, dropout,
    base_layer); only the adapter's part when `skip_base`. One fused node where the base allows it;
    `sparse` = (values, term) adds RoSA's x·Sᵀ inside that node (fusable bases only: see fold_ and
    values_grad in qtune.adapters.rosa)."""
    x_d = layer.dropout(x)
    if fusable(layer.base_layer):
        values, term = sparse if sparse is not None else (None, None)
        return _LoRALinearFn.apply(x, x_d, layer.lora_A, layer.lora_B, layer.base_layer, float(layer.scale),
                                   bool(skip_base), values, term)
    assert sparse is None, "a sparse term is fused only on a fusable base"
    a, b = layer.lora_A.to(x.dtype), layer.lora_B.to(x.dtype)
    lora = layer.scale * F.linear(F.linear(x_d, a), b)  # (..., r) -> (..., out)
    return lora if skip_base else layer.base_layer(x) + lora


class LoRALinear(nn.Module):
    """The base linear (frozen; QuantLinear or nn.Linear) plus a trainable low-rank update s·BA."""

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.scale = rank, scale
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT and the LoRA reference code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.skip_base_in_recompute = False  # set by qtune.recompute where the output only feeds a sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled decoder layer (qtune.compile)
            return self.traced(x)
        # in a recomputation the base may be skipped: backward reads only the adapter's saved tensors
        return lora_forward(self, x, can_skip(self))

    def traceable(self) -> bool:
        """Whether `traced` is this layer's forward in a compiled layer (always, for LoRA)."""
        return True

    def traced(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """The compiled layer's form of forward; h = dropout(x)·Aᵀ when already formed (group_forward)."""
        return lora_traced(self, x, h)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·BA, (out, in) fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W + s·BA for the dequantized base weight (fp32)."""
        return base_weight.float() + self.delta_weight()
