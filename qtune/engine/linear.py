"""The adapted linears of qtune's decoder block: which fast form runs for each module, in one place.

Eagerly, a linear is one fused node (qtune.engine.fused); inside a compiled block it is traceable ops
and qtune's operators (qtune.engine.ops). Whatever has no fast form (dropout on DoRA, DoRA with the
norm's gradient, a base with hooks, a plain base) runs its own forward: the adapter's reference."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter
from qtune.adapters.dora import DoRALinear
from qtune.adapters.lora import LoRALinear
from qtune.adapters.rosa import RoSALinear
from qtune.engine.fused import KEEP, REUSE, dora_node, fusable, lora_node
from qtune.engine.ops import (fold_sparse, keep, linear_lora, linear_lora_group, linear_lora_group_kept, linear_lora_kept,
                              lora_down, rosa_linear, row_norms)
from qtune.engine.recompute import recomputing
from quant import QuantLinear
from quant.formats import QuantizedWeight


def compiled_form_reason(module: nn.Module) -> str | None:
    """Why this module has no form for a compiled block (None: it has one)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return "hooks"
    if isinstance(module, (LoRALinear, DoRALinear, RoSALinear)):
        if not isinstance(module.dropout, nn.Identity):
            return "dropout"
        if isinstance(module, DoRALinear) and not module.detach_norm:
            return "dora norm gradient"
        if isinstance(module, RoSALinear) and not module.nnz:
            return "rosa support not chosen"
        module = module.base_layer
        if module._forward_hooks or module._forward_pre_hooks:
            return "hooks"
    elif isinstance(module, Adapter):  # a method without a fused form: its reference forward, eagerly
        return f"method {type(module).__name__}"
    if isinstance(module, QuantLinear) and type(module.qweight) is not QuantizedWeight:
        return "offloaded weights"
    return None


# --- eager ------------------------------------------------------------------------------------------

def eager(module: nn.Module, x: torch.Tensor, keep_output: bool = False, sum_only: bool = False) -> torch.Tensor:
    """One linear, eagerly. `sum_only`: its output only feeds a residual sum, so a recomputation may skip
    its base GEMM (LoRA); `keep_output`: DoRA keeps its output for the recomputation instead."""
    if module._forward_hooks or module._forward_pre_hooks:  # hooks see the module's own call
        return module(x)
    return fast_forward(module, x, keep_output, sum_only)


def fast_forward(module: nn.Module, x: torch.Tensor, keep_output: bool = False, sum_only: bool = False):
    """eager() without the hook check: also the forward of the adapters of a model qtune built
    (route_adapters), so that transformers' own forward (generation, the generic path) runs the fused
    nodes, not the reference's per-call fp32 weights."""
    if isinstance(module, DoRALinear):
        if module.detach_norm and isinstance(module.dropout, nn.Identity) and fusable(module.base_layer):
            # eagerly only an output the recomputation does not read (sum_only) can be kept for backward
            kept = (REUSE if recomputing() else KEEP) if keep_output and sum_only and torch.is_grad_enabled() else None
            return dora_node(module, x, kept)
    elif isinstance(module, (LoRALinear, RoSALinear)) and fusable(module.base_layer):
        return lora_node(module, x, skip_base=sum_only and recomputing())
    return type(module).forward(module, x)  # the reference (or a plain linear's own forward)


def _routed_forward(self, x):
    return fast_forward(self, x)


def route_adapters(model: nn.Module, on: bool = True) -> None:
    """Give the adapters of `model` the fast forward (on) or their own reference forward back (off)."""
    for m in model.modules():
        if isinstance(m, (LoRALinear, DoRALinear, RoSALinear)):
            if on:
                m.forward = types.MethodType(_routed_forward, m)
            else:
                m.__dict__.pop("forward", None)


# --- traced (inside a compiled block) ---------------------------------------------------------------

DENSE = "qtune_dense_weight"  # a QuantLinear's held dequantized weight (--recompute weights): a non-persistent buffer
DENSE_GROUP = "qtune_dense_group_weight"  # a group's bases' held weights stacked by rows (their DENSE are its views)


def traced_base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight (out, in) in `dtype` through traceable ops (bitsandbytes' registered ones), or the
    dequantized copy the layer holds (--recompute weights)."""
    if not isinstance(base, QuantLinear):
        return base.weight.to(dtype)
    dense = getattr(base, DENSE, None)
    if dense is not None and dense.dtype == dtype:
        return dense
    return base.qweight.dequantize_traced(dtype)


def hold_dense_weights(layer: nn.Module, dtype: torch.dtype, groups: list[list[nn.Module]] = ()) -> None:
    """--recompute weights: each in-memory QuantLinear of `layer` holds its weight dequantized to `dtype`, made once
    by the same operators a compiled block traces (so its values are the ones that block would compute), as a
    non-persistent buffer (it moves with the module and is never saved). `groups`: the linears that read one input
    (q/k/v, gate/up; qtune.engine.block.linear_groups); where a group runs as one GEMM (groupable), its bases'
    copies are rows of one stacked weight, held once (DENSE_GROUP on its first base) and read by that GEMM.
    Idempotent."""
    for modules in groups:
        bases = [m.base_layer for m in modules] if groupable(modules) else []
        if not all(isinstance(b, QuantLinear) and type(b.qweight) is QuantizedWeight for b in bases):
            continue
        if all(_holds(b, dtype) for b in bases) and getattr(bases[0], DENSE_GROUP, None) is not None:
            continue
        with torch.no_grad():
            stacked = torch.cat([b.qweight.dequantize_traced(dtype) for b in bases])
        bases[0].register_buffer(DENSE_GROUP, stacked, persistent=False)
        rows = 0
        for b in bases:
            b.register_buffer(DENSE, stacked[rows:rows + b.out_features], persistent=False)
            rows += b.out_features
    for m in layer.modules():
        if isinstance(m, QuantLinear) and type(m.qweight) is QuantizedWeight and not _holds(m, dtype):
            with torch.no_grad():
                m.register_buffer(DENSE, m.qweight.dequantize_traced(dtype), persistent=False)


def _holds(m: nn.Module, dtype: torch.dtype) -> bool:
    held = getattr(m, DENSE, None)
    return held is not None and held.dtype == dtype and held.device == m.qweight.packed.device


def drop_dense_weights(model: nn.Module) -> int:
    """Free every held dequantized weight (and the stacked copies of groups); returns how many linears held one."""
    n = 0
    for m in model.modules():
        m._buffers.pop(DENSE_GROUP, None)
        if isinstance(m, QuantLinear) and DENSE in m._buffers:
            del m._buffers[DENSE]
            n += 1
    return n


def _lora(layer, x, h, u=None, kept: bool = False):
    """x·D(W)ᵀ + b + s·h·Bᵀ, the adapter accumulated into the base GEMM's output (linear_lora; linear_lora_kept where
    the checkpoint keeps it: `kept`); `u`: that product already formed by its group's GEMM (group)."""
    base, dtype = layer.base_layer, x.dtype
    if u is None:
        op = linear_lora_kept if kept else linear_lora
        u = op(x, traced_base_weight(base, dtype), h, (layer.lora_B * layer.scale).to(dtype))
    return u if base.bias is None else u + base.bias.to(dtype)


def _dora(layer, x, h, keep_product: bool, w=None, u=None):
    """u = x·D(W)ᵀ + s·h·Bᵀ, y = (m/n) ⊙ u + b, n without gradient (row_norms of the detached factors, traced so
    that inductor fuses its elementwise part, and kept by the checkpoint: the recomputation reads it).
    `keep_product` keeps u (the magnitude's gradient reads it; linear_lora_kept): the recomputation skips the base
    GEMM. `w`, `u`: the base weight and u as its group's GEMM formed them (group), kept there if it is to be."""
    base, dtype = layer.base_layer, x.dtype
    if w is None:
        w = traced_base_weight(base, dtype)
    w_sq = getattr(layer, "_qtune_row_sq", None)
    if w_sq is None:
        with torch.no_grad():
            w_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    n = keep(row_norms(w_sq, a, b, F.linear(a.to(dtype), w), float(layer.scale)))
    if u is None:
        u = (linear_lora_kept if keep_product else linear_lora)(x, w, h, (layer.lora_B * layer.scale).to(dtype))
    y = (u.float() * (layer.magnitude / n)).to(dtype)  # c in fp32: rounded to bf16 it would snap to 1
    return y if base.bias is None else y + base.bias.to(dtype)


def _rosa(layer, x, h):
    """x·(W + S)ᵀ + b + s·h·Bᵀ: S folded into the dequantized weight, dL/dvalues by an SDDMM (rosa_linear)."""
    base, dtype = layer.base_layer, x.dtype
    w_s = fold_sparse(traced_base_weight(base, dtype), layer.sparse_values.detach(), layer.sparse_indices)
    y = rosa_linear(x, w_s, layer.sparse_values, layer.csr_crow, layer.csr_cols)
    if base.bias is not None:
        y = y + base.bias.to(dtype)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), (layer.lora_B * layer.scale).to(dtype).t())
    return out.view(y.shape)


def traced(module: nn.Module, x: torch.Tensor, h: torch.Tensor | None = None, keep_output: bool = False):
    """One linear in a compiled block; h = x·Aᵀ when already formed (group). keep_output: the checkpoint keeps its
    output, LoRA's and DoRA's as their GEMM's (x·Wᵀ + s·h·Bᵀ, before a bias or DoRA's scaling: no copy), others'
    as a copy (keep)."""
    if not isinstance(module, (LoRALinear, DoRALinear, RoSALinear)):
        return keep(module(x)) if keep_output else module(x)
    if h is None:
        h = lora_down(x, module.lora_A.to(x.dtype))
    if isinstance(module, DoRALinear):
        return _dora(module, x, h, keep_output)
    if isinstance(module, RoSALinear):
        return keep(_rosa(module, x, h)) if keep_output else _rosa(module, x, h)
    return _lora(module, x, h, kept=keep_output)


def keeps_own_product(module: nn.Module) -> bool:
    """Whether the module keeps its product u itself when asked (DoRA: its magnitude's gradient reads u)."""
    return isinstance(module, DoRALinear)


# --- one entry for the block ------------------------------------------------------------------------

def linear(module: nn.Module, x: torch.Tensor, keep_output: bool = False, sum_only: bool = False) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return traced(module, x, keep_output=keep_output)
    return eager(module, x, keep_output, sum_only)


def groupable(modules: list[nn.Module]) -> bool:
    """Whether linears that read one input run as one GEMM in a compiled block (linear_lora_group): LoRA and DoRA
    adapters (RoSA folds its sparse term into each weight, and keeps one GEMM each)."""
    return len(modules) > 1 and all(isinstance(m, (LoRALinear, DoRALinear)) for m in modules)


def held_group_weight(modules: list[nn.Module], dtype: torch.dtype) -> torch.Tensor | None:
    """The group's bases stacked by rows, (Σ out, in), as hold_dense_weights holds them (--recompute weights), or
    None. Only a held stack runs as one GEMM: stacked afresh in each forward, the copy cost the step what the wider
    GEMM saved and raised its peak (tools/results/bench_methods_2026-12-06_group_default_fp32.md)."""
    held = getattr(modules[0].base_layer, DENSE_GROUP, None)
    if held is None or held.dtype != dtype or held.shape[0] != sum(m.lora_B.shape[0] for m in modules):
        return None
    return held


def group(modules: list[nn.Module], x: torch.Tensor, keep_output: bool = False) -> list[torch.Tensor]:
    """[linear(m, x) for m in modules] for linears that read the same x (q/k/v, gate/up). Compiled, their
    down-projections are one GEMM, h = x·[A₁; A₂; …]ᵀ, split by columns (and so are its gradients), and so are
    LoRA's and DoRA's base products (linear_lora_group on the stacked bases), each adapter's up-projection
    accumulated into its own columns, where the layer holds their stacked weight (held_group_weight).
    keep_output: the checkpoint keeps the outputs (traced), the one GEMM's as one tensor (linear_lora_group_kept)."""
    adapters = all(isinstance(m, (LoRALinear, DoRALinear, RoSALinear)) for m in modules)
    if len(modules) > 1 and torch.compiler.is_compiling() and adapters:
        h = lora_down(x, torch.cat([m.lora_A for m in modules]).to(x.dtype))
        w = held_group_weight(modules, x.dtype) if groupable(modules) else None
        if w is not None:
            dtype, outs = x.dtype, [m.lora_B.shape[0] for m in modules]
            op = linear_lora_group_kept if keep_output else linear_lora_group
            u = op(x, w, h, [(m.lora_B * m.scale).to(dtype) for m in modules])
            return [_dora(m, x, None, False, w_i, u_i) if isinstance(m, DoRALinear) else _lora(m, x, None, u=u_i)
                    for m, w_i, u_i in zip(modules, w.split(outs), u.split(outs, dim=-1))]
        hs = h.split([m.rank for m in modules], -1)
        return [traced(m, x, h_i, keep_output) for m, h_i in zip(modules, hs)]
    return [linear(m, x, keep_output) for m in modules]
