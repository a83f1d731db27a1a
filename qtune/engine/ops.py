"""qtune's custom operators: the pieces of a compiled decoder block that inductor must not split or
re-lay-out, each with the backward autograd would form (traced into the compiled backward).

`keep` marks a value that a checkpointed block keeps from its forward (SAVED_OPS), so that the
recomputation skips what produced it: the one mechanism behind the recomputation policy
(qtune.engine.recompute). It keeps a copy; LoRA's and DoRA's GEMMs have twins whose own outputs are kept
(linear_lora_kept, linear_lora_group_kept), without one."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from qtune.engine.compiled import maybe_compile

# operators whose outputs a compiled block's checkpoint keeps from the forward instead of recomputing
SAVED_OPS: set = set()

# the tag of operators whose math does not depend on their inputs' strides: inductor may hand every
# reader of a value one buffer, instead of laying the value out afresh for each operator
FLEXIBLE = (torch.Tag.flexible_layout,) if hasattr(torch.Tag, "flexible_layout") else ()


def _register(op, setup, backward):
    op.register_autograd(backward, setup_context=setup)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


# --- keep: a value the checkpoint keeps ------------------------------------------------------------

@torch.library.custom_op("qtune::keep", mutates_args=(), tags=FLEXIBLE)
def keep(x: torch.Tensor) -> torch.Tensor:
    """x (a copy) that a compiled block's checkpoint keeps from the forward; the gradient passes through."""
    return x.clone()


@keep.register_fake
def _(x):
    return torch.empty_like(x)


keep.register_autograd(lambda ctx, grad: grad, setup_context=lambda ctx, inputs, output: None)
SAVED_OPS.add(torch.ops.qtune.keep.default)


# --- LoRA's two products ---------------------------------------------------------------------------

def _linear_lora(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """y = x·wᵀ + h·b_sᵀ: the base GEMM with the adapter's up-projection accumulated into its output in
    place (written as F.linear then addmm, inductor would copy the GEMM's output into a fresh one)."""
    y = F.linear(x, w)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b_s.t())
    return y


def _linear_lora_fake(x, w, h, b_s):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _linear_lora_backward(ctx, g):
    x, w, h, b_s = ctx.saved_tensors
    g2 = g.reshape(-1, g.shape[-1])
    need = ctx.needs_input_grad
    grad_x = (g2 @ w).view(x.shape) if need[0] else None
    grad_w = g2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    grad_h = (g2 @ b_s).view(h.shape) if need[2] else None
    grad_b = g2.t() @ h.reshape(-1, h.shape[-1]) if need[3] else None
    return grad_x, grad_w, grad_h, grad_b


def _linear_lora_group(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, b_s: list[torch.Tensor]) -> torch.Tensor:
    """linear_lora of linears that read the same x (q/k/v, gate/up) as one GEMM: y = x·wᵀ with w = [W₁; W₂; …]
    (the bases stacked by rows), then each adapter's h_i·B_iᵀ accumulated into its own columns of y, with
    h = [h₁, h₂, …] (the group's one down-projection, qtune.engine.linear.group). One wide GEMM runs nearer the
    machine's rate than the narrow ones (k/v's 192 columns), and dL/dx is one GEMM where it was one per linear
    plus their sum: 0.957x the step under --recompute weights in float32
    (tools/results/bench_methods_2026-12-06_group_weights_fp32*.md)."""
    y = F.linear(x, w)
    y2, h2 = y.view(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
    o = r = 0
    for b in b_s:
        y2[:, o:o + b.shape[0]].addmm_(h2[:, r:r + b.shape[1]], b.t())
        o, r = o + b.shape[0], r + b.shape[1]
    return y


def _linear_lora_group_setup(ctx, inputs, output):
    x, w, h, b_s = inputs
    ctx.save_for_backward(x, w, h, *b_s)


def _linear_lora_group_backward(ctx, g):
    x, w, h, *b_s = ctx.saved_tensors
    g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
    need = ctx.needs_input_grad
    grad_x = (g2 @ w).view(x.shape) if need[0] else None
    grad_w = g2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    grads_h, grads_b, o, r = [], [], 0, 0
    for b in b_s:
        g_i = g2[:, o:o + b.shape[0]]
        grads_h.append(g_i @ b)
        grads_b.append(g_i.t() @ h2[:, r:r + b.shape[1]])
        o, r = o + b.shape[0], r + b.shape[1]
    grad_h = torch.cat(grads_h, dim=-1).view(h.shape) if need[2] else None
    return grad_x, grad_w, grad_h, grads_b


def _define(name: str, impl, setup, backward, saved: bool = False):
    """The operator qtune::name: impl, its output shaped as linear's (x's leading dims, w's rows), its backward.
    saved: a checkpointed block keeps its output (SAVED_OPS): the recomputation skips its GEMMs, and nothing is
    copied, where keep(y) clones y (566 MB a step in float32 at the benchmark's setting under --recompute weights;
    on a 2-core Xeon without AMX the step did not measurably change: 0.987x and QDoRA 0.992x in lockstep)."""
    op = torch.library.custom_op(f"qtune::{name}", impl, mutates_args=(), tags=FLEXIBLE)
    op.register_fake(_linear_lora_fake)
    _register(op, setup, backward)
    if saved:
        SAVED_OPS.add(getattr(torch.ops.qtune, name).default)
    return op


linear_lora = _define("linear_lora", _linear_lora, _save_inputs, _linear_lora_backward)
linear_lora_kept = _define("linear_lora_kept", _linear_lora, _save_inputs, _linear_lora_backward, saved=True)
linear_lora_group = _define("linear_lora_group", _linear_lora_group, _linear_lora_group_setup, _linear_lora_group_backward)
linear_lora_group_kept = _define("linear_lora_group_kept", _linear_lora_group, _linear_lora_group_setup,
                                 _linear_lora_group_backward, saved=True)


@torch.library.custom_op("qtune::lora_down", mutates_args=(), tags=FLEXIBLE)
def lora_down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """h = x·aᵀ (..., r): one operator so that the checkpoint keeps h rather than redo the skinny GEMM."""
    return F.linear(x, a)


@lora_down.register_fake
def _(x, a):
    return x.new_empty(*x.shape[:-1], a.shape[0])


def _lora_down_backward(ctx, g_h):
    x, a = ctx.saved_tensors
    g2 = g_h.reshape(-1, g_h.shape[-1])
    grad_x = (g2 @ a).view(x.shape) if ctx.needs_input_grad[0] else None
    grad_a = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    return grad_x, grad_a


_register(lora_down, _save_inputs, _lora_down_backward)
SAVED_OPS.add(torch.ops.qtune.lora_down.default)


# --- DoRA's row norms ------------------------------------------------------------------------------

def row_norms(w_sq, lora_A, lora_B, aw, scale):
    """n = ‖W + s·BA‖_row, fp32 (out,), from the expansion (no (out, in) temporary):
        n_i² = ‖W_i‖² + Σ_k B_ik·t_ik,   t = 2s·(A Wᵀ)ᵀ + s²·B·(A Aᵀ)   (out, r)."""
    t = torch.addmm(aw.t().float(), lora_B, lora_A @ lora_A.t(), beta=2 * scale, alpha=scale * scale)
    return (w_sq + torch.linalg.vecdot(lora_B, t)).clamp_min(0).sqrt()


# --- RoSA's sparse term ----------------------------------------------------------------------------

def csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


@maybe_compile
def _transpose_cast(t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous().float()


def tokens_last(t: torch.Tensor, features: int) -> torch.Tensor:
    """(..., features) -> (features, tokens) fp32 contiguous: the layout torch's CSR kernels read."""
    return _transpose_cast(t.reshape(-1, features))


def sddmm(crow: torch.Tensor, cols: torch.Tensor, g_t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Σ_t g[t, row_k]·x[t, col_k] (nnz,) fp32 at S's CSR support, for g_t (out, tokens), x_t (in, tokens)."""
    pattern = csr(crow, cols, torch.zeros(cols.numel(), dtype=torch.float32, device=cols.device),
                  (g_t.shape[0], x_t.shape[0]))
    return torch.sparse.sampled_addmm(pattern, g_t, x_t.T, beta=0.0).values()


def fold_sparse(w: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """W + S as a new (out, in) tensor in w's dtype, each sum formed in fp32 and rounded once."""
    flat = w.reshape(-1)
    return flat.index_put((indices,), (flat[indices].float() + values.float()).to(w.dtype)).view(w.shape)


@torch.library.custom_op("qtune::rosa_linear", mutates_args=(), tags=FLEXIBLE)
def rosa_linear(x: torch.Tensor, w_s: torch.Tensor, values: torch.Tensor,
                crow: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x·(W + S)ᵀ for w_s = W + S already folded; dL/dvalues comes from the SDDMM in backward (autograd
    of plain ops would form dL/d(W + S) densely to read nnz of its entries)."""
    return F.linear(x, w_s)


@rosa_linear.register_fake
def _(x, w_s, values, crow, cols):
    return x.new_empty(*x.shape[:-1], w_s.shape[0])


@torch.library.custom_op("qtune::rosa_sddmm", mutates_args=())
def rosa_sddmm(crow: torch.Tensor, cols: torch.Tensor, g_t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """sddmm as one operator: a compiled graph cannot trace sparse CSR tensors."""
    return sddmm(crow, cols, g_t, x_t)


@rosa_sddmm.register_fake
def _(crow, cols, g_t, x_t):
    return g_t.new_empty(cols.shape, dtype=torch.float32)


def _rosa_setup(ctx, inputs, output):
    x, w_s, values, crow, cols = inputs
    ctx.save_for_backward(x, w_s, crow, cols)


def _rosa_backward(ctx, g):
    x, w_s, crow, cols = ctx.saved_tensors
    g2 = g.reshape(-1, g.shape[-1])
    grad_x = (g2 @ w_s).view(x.shape)
    grad_values = rosa_sddmm(crow, cols, tokens_last(g2, g2.shape[-1]), tokens_last(x, x.shape[-1]))
    return grad_x, None, grad_values, None, None


_register(rosa_linear, _rosa_setup, _rosa_backward)


# torch warns once per process (a C++ WARN_ONCE) that CSR tensors are "beta"; the kernels used here are
# tested (tests/test_rosa.py): spend that one warning here, silently, instead of in a training log
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    csr(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0), (1, 1))
