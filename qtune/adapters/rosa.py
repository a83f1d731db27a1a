"""RoSA on a frozen (quantized) base — QRoSA when the base is NF4.

    y = x · D(Q(W))ᵀ + s · (dropout(x) · Aᵀ) · Bᵀ + x · Sᵀ          (RoSA, arXiv 2401.04679)

S (out, in) is sparse with a fixed support (density d, chosen before training by
`select_sparse_mask` from accumulated squared weight gradients) and trainable values that start at 0;
with B = 0 too, the layer equals the base at step 0. S lives as values (nnz,) + flat row-major
indices (nnz,): memory ∝ nnz; S is never a dense (out, in) tensor (the fused path below adds its
values into the base's dequantized weight, which exists anyway).

Where the base is a QuantLinear or a frozen nn.Linear (every training run), x·Sᵀ is computed inside
the fused LoRA node: S's nnz values are added into the dense weight the base dequantizes for its
GEMM anyway, y = x·(D(W) + S)ᵀ + s·(x Aᵀ)Bᵀ, and backward adds one SDDMM for dL/dvalues
(_FoldedSparse). Measured on 2 shared CPU cores for (out, in) = (1536, 576), 1024 tokens, density
1% (9,216 nonzeros): the nnz adds 0.1 ms, the SDDMM (torch.sparse.sampled_addmm, layout copies
included) 1.4 ms, where a dense grad_yᵀx in bf16 costs 2.1 ms and the base GEMM 2.0 ms.
Elsewhere (a base with hooks, as while the mask is being chosen) _SparseLinearFn computes x·Sᵀ apart,
with MKL's CSR kernels; measured the same way (1 thread, min of 15):
    x Sᵀ       MKL CSR S @ xᵀ 1.0 ms (bf16 x cast to fp32: 1.1) | COO 5.2 | gather + index_add 9.5
    grad_y S   CSR of Sᵀ (cached transpose) 1.3 ms | CSR.t() (CSC) 1.8 | COO 14.5
    SDDMM      torch.sparse.sampled_addmm 1.4 ms | row blocks of grad_yᵀx, gathered: 16.2 fp32,
               3.7 bf16 | gather (x[:, cols]·grad_y[:, rows]).sum, chunked over nnz: 9.4
MKL's CSR kernels and sampled_addmm take fp32/fp64 only on CPU, so that path computes in fp32 (the
master dtype of the values too) and casts y back. Whole layer on that path, forward + backward, NF4
base, r = 16: bf16 LoRA 10.2 ms, RoSA 16.9 ms (1.65x; half of the sparse term's 5.5 ms is layout
copies). The paper reports 1.7-2x on GPU.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.lora import add_lora_traced, fusable, lora_down, lora_forward, traced_base_weight
from qtune.compile import FLEXIBLE, maybe_compile
from qtune.recompute import can_skip


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _crow(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointers (n_rows + 1,) of sorted row ids."""
    return F.pad(torch.bincount(rows, minlength=n_rows).cumsum(0), (1, 0))


# torch warns once per process (a C++ WARN_ONCE) that CSR tensors are "beta"; the kernels used here are
# tested in tests/test_rosa.py, so spend that one warning here, silently, instead of in a training log.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _csr(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0), (1, 1))


def _tokens_last(t: torch.Tensor, features: int) -> torch.Tensor:
    """(..., features) -> (features, tokens) fp32 contiguous: the layout MKL's CSR kernels and the
    SDDMM take without a copy (a strided operand costs 2-10x). One compiled, tiled transpose-cast
    (_transpose_cast) where compiling is on: 0.26 ms for a (1024, 1536) bf16 g, against 1.5 ms for
    eager .T.contiguous().float() (transposed in the input dtype, then cast: eager's cheaper order)."""
    return _transpose_cast(t.reshape(-1, features))


@maybe_compile
def _transpose_cast(t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous().float()


class _SparseLinearFn(torch.autograd.Function):
    """y = x Sᵀ for S given by CSR structure + values; differentiable w.r.t. x and the values.

    Works on (features, tokens) layouts: yᵀ = S xᵀ, (grad_x)ᵀ = Sᵀ grad_yᵀ, both CSR @ dense.
    Saves x and the nnz-sized structure (never a sparse tensor: its numel is out·in) for backward."""

    @staticmethod
    def forward(ctx, x, values, crow, cols, t_crow, t_rows, t_perm, skip_output=False):
        out_f, in_f = crow.numel() - 1, t_crow.numel() - 1
        ctx.save_for_backward(x, values, crow, cols, t_crow, t_rows, t_perm)
        if skip_output:  # a recomputation that needs only the saved tensors (qtune.recompute)
            return x.new_zeros(*x.shape[:-1], out_f)
        y_t = _csr(crow, cols, values.float(), (out_f, in_f)) @ _tokens_last(x, in_f)  # (out, tokens)
        # one transposing copy here, or every later op on the strided y is slow (an add: 0.2 -> 11 ms)
        return y_t.to(x.dtype).T.contiguous().reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_y):
        x, values, crow, cols, t_crow, t_rows, t_perm = ctx.saved_tensors
        out_f, in_f = crow.numel() - 1, t_crow.numel() - 1
        g_t = _tokens_last(grad_y, out_f)  # (out, tokens)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:  # grad_x = grad_y S, i.e. (Sᵀ as CSR (in, out)) @ grad_yᵀ
            s_t = _csr(t_crow, t_rows, values.float()[t_perm], (in_f, out_f))
            grad_x = (s_t @ g_t).to(x.dtype).T.contiguous().reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_values = _sampled_grad(crow, cols, g_t, x)
        return grad_x, grad_values, None, None, None, None, None, None


def _sampled_grad(crow: torch.Tensor, cols: torch.Tensor, g_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SDDMM: grad_values[k] = Σ_t grad_y[t, row_k] · x[t, col_k], fp32 (nnz,), for g_t = grad_yᵀ as
    _tokens_last gives it (out, tokens) and x (..., in): torch.sparse.sampled_addmm on S's CSR pattern
    (1.4 ms for a (1536, 576) weight at 1% and 1024 tokens, layout copies included; a dense grad_yᵀx
    then gathered: 2.1 ms in bf16)."""
    return _sddmm(crow, cols, g_t, _tokens_last(x, x.shape[-1]))


def _sddmm(crow: torch.Tensor, cols: torch.Tensor, g_t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Σ_t g[t, row_k]·x[t, col_k] (nnz,) fp32 at S's CSR support, for g_t (out, tokens) and x_t
    (in, tokens) fp32 contiguous: the layout torch's CPU kernel reads without copies."""
    pattern = _csr(crow, cols, torch.zeros(cols.numel(), dtype=torch.float32, device=cols.device),
                   (g_t.shape[0], x_t.shape[0]))
    return torch.sparse.sampled_addmm(pattern, g_t, x_t.T, beta=0.0).values()


def _fold_(w: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """w (out, in) += S in place, S = values at the flat row-major indices, each sum formed in fp32
    and rounded once to w's dtype; returns w."""
    flat = w.view(-1)
    flat.index_put_((indices,), (flat[indices].float() + values.float()).to(w.dtype))
    return w


class _FoldedSparse:
    """RoSA's x·Sᵀ inside the fused LoRA node (qtune.adapters.lora): S's values are added into the
    dense (out, in) weight that the base's dequantization forms for its GEMM anyway, so
    y = x·(D(W) + S)ᵀ + s·(x Aᵀ)Bᵀ costs the LoRA node's GEMMs plus nnz adds (forward and backward),
    and backward adds one SDDMM for dL/dvalues. S itself is never dense: only W + S, as the base's
    own dequantized weight is. In bf16, each of W + S's nnz entries is rounded once (the sum is formed
    in fp32): the same rounding the dequantized W already has, so the product errs no more than the
    plain base GEMM does; the values and their gradients stay fp32.
    Built per forward (cheap): it holds the layer's current buffers."""

    def __init__(self, layer: "RoSALinear"):
        self.indices, self.crow, self.cols = layer.sparse_indices, layer.csr_crow, layer.csr_cols

    def fold_(self, w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """w (out, in) += S in place (w must be a fresh tensor); returns w."""
        return _fold_(w, values, self.indices)

    def values_grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """dL/dvalues (nnz,) fp32 from g = dL/dy (tokens, out) and the layer's input x (tokens, in)."""
        return _sampled_grad(self.crow, self.cols, _tokens_last(g, g.shape[-1]), x)


# --- RoSA in a compiled decoder layer (qtune.compile) ---------------------------------------------
# x·(W + S)ᵀ as a custom operator, qtune::rosa_linear, with its own backward (dL/dx = g·(W + S),
# dL/dvalues by the SDDMM): autograd of the plain ops would form dL/d(W + S) densely (a full
# weight-gradient GEMM per linear) to read nnz of its entries. Everything around the two opaque
# pieces (the GEMMs and torch's sampled_addmm) is plain ops that inductor compiles: the fold of S into
# the dequantized weight, and the SDDMM's layouts (g and x cast to fp32 and transposed to
# (features, tokens)), which inductor writes in one tiled pass each (0.26 ms for a (1024, 1536) bf16
# g, where eager .T.contiguous().float() takes 1.5-3 ms) and shares between the linears that read the
# same x (q/k/v, gate/up).

def _fold_traced(w: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """W + S as a new (out, in) tensor in w's dtype, each sum formed in fp32 and rounded once (as
    _fold_), in traceable ops."""
    flat = w.reshape(-1)
    return flat.index_put((indices,), (flat[indices].float() + values.float()).to(w.dtype)).view(w.shape)


@torch.library.custom_op("qtune::rosa_linear", mutates_args=(), tags=FLEXIBLE)
def rosa_linear(x: torch.Tensor, w_s: torch.Tensor, values: torch.Tensor,
                crow: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x·(W + S)ᵀ for w_s = W + S (out, in) in x's dtype, already folded (_fold_traced of the detached
    values). `values` and S's CSR support (crow, cols) are inputs for the backward only: dL/dvalues
    comes from the SDDMM here, not through w_s."""
    return F.linear(x, w_s)


@rosa_linear.register_fake
def _(x, w_s, values, crow, cols):
    return x.new_empty(*x.shape[:-1], w_s.shape[0])


@torch.library.custom_op("qtune::rosa_sddmm", mutates_args=())
def rosa_sddmm(crow: torch.Tensor, cols: torch.Tensor, g_t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """dL/dvalues of rosa_linear (_sddmm) as one operator: a compiled graph cannot trace sparse CSR tensors."""
    return _sddmm(crow, cols, g_t, x_t)


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
    # traced into the compiled backward (maybe_compile defers to the enclosing graph): inductor's tiled passes
    grad_values = rosa_sddmm(crow, cols, _tokens_last(g2, g2.shape[-1]), _tokens_last(x, x.shape[-1]))
    return grad_x, None, grad_values, None, None


rosa_linear.register_autograd(_rosa_backward, setup_context=_rosa_setup)


def rosa_traced(layer: "RoSALinear", x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """RoSA without dropout as traceable ops for a compiled decoder layer: the base with S folded in
    (rosa_linear), plus the LoRA term accumulated into its output in one addmm, as the eager node;
    h = x·Aᵀ when already formed (qtune.adapters.lora.group_forward), else one lora_down."""
    base, dtype = layer.base_layer, x.dtype
    w_s = _fold_traced(traced_base_weight(base, dtype), layer.sparse_values.detach(), layer.sparse_indices)
    y = rosa_linear(x, w_s, layer.sparse_values, layer.csr_crow, layer.csr_cols)
    if base.bias is not None:
        y = y + base.bias.to(dtype)
    if h is None:
        h = lora_down(x, layer.lora_A.to(dtype))
    return add_lora_traced(y, h, layer.lora_B, layer.scale)


class RoSALinear(nn.Module):
    """The frozen base linear (QuantLinear or nn.Linear) plus a low-rank and a sparse update:

        y = x Wᵀ + b + s·(dropout(x) Aᵀ)Bᵀ + x Sᵀ          (RoSA, arXiv 2401.04679)

    A (r, in) Kaiming-uniform, B (out, r) zeros, S (out, in) sparse: `sparse_values` (nnz,) fp32
    zeros at flat row-major `sparse_indices` (nnz,) int64, sorted (rows grouped, as CSR). Built with
    indices=None the support is empty (plain LoRA) until `set_support` — call it after the mask is
    selected and before the optimizer is built (it replaces the `sparse_values` parameter).
    """

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 indices: torch.Tensor | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.scale = rank, scale
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT and the LoRA reference code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.skip_base_in_recompute = False  # set by qtune.recompute where the output only feeds a sum
        self.set_support(torch.zeros(0, dtype=torch.int64) if indices is None else indices)

    @property
    def nnz(self) -> int:
        return self.sparse_indices.numel()

    @torch.no_grad()
    def set_support(self, indices: torch.Tensor) -> None:
        """Fix the support of S to `indices` (flat row-major into (out, in), sorted, unique) with values 0.

        Also caches the CSR structure of S and of Sᵀ as int32 (12 more bytes per nonzero, not saved)."""
        out_f, in_f = self.out_features, self.in_features
        device = self.lora_A.device
        indices = torch.as_tensor(indices).to(device=device, dtype=torch.int64).flatten()
        if indices.numel() and (indices[0] < 0 or indices[-1] >= out_f * in_f or (indices.diff() <= 0).any()):
            raise ValueError(f"sparse indices must be sorted, unique and in [0, {out_f * in_f}) "
                             f"for a ({out_f}, {in_f}) weight")
        rows, cols = indices // in_f, indices % in_f
        t_perm = torch.argsort(cols, stable=True)  # Sᵀ's nonzeros in row-major order of (in, out)
        self.register_buffer("sparse_indices", indices)  # persistent: saved with the run
        for name, t in {"csr_crow": _crow(rows, out_f), "csr_cols": cols,
                        "csr_t_crow": _crow(cols, in_f), "csr_t_rows": rows[t_perm], "csr_t_perm": t_perm}.items():
            self.register_buffer(name, t.to(torch.int32), persistent=False)
        self.sparse_values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=device),
                                          requires_grad=self.lora_A.requires_grad)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved support that differs from ours: adopt it first, so that its values then load into place
        saved = state_dict.get(prefix + "sparse_indices")
        if saved is not None and not torch.equal(saved.to(self.sparse_indices.device), self.sparse_indices):
            self.set_support(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def traceable(self) -> bool:
        """Whether this layer has a compiled form (`traced`): its support fixed, no dropout, a fused base."""
        return bool(self.nnz) and isinstance(self.dropout, nn.Identity) and fusable(self.base_layer)

    def traced(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """The compiled layer's form of forward (rosa_traced); h = x·Aᵀ when already formed."""
        return rosa_traced(self, x, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.traceable():  # a compiled decoder layer (qtune.compile)
            return self.traced(x)
        skip = can_skip(self)  # only saved tensors matter (qtune.recompute)
        if self.nnz and fusable(self.base_layer):  # one node: x·(W + S)ᵀ + s·BA x (see _FoldedSparse)
            return lora_forward(self, x, skip, sparse=(self.sparse_values, _FoldedSparse(self)))
        y = lora_forward(self, x, skip)  # base + s·BA x (fused where the base allows it)
        if self.nnz == 0:
            return y
        return y + _SparseLinearFn.apply(x, self.sparse_values, self.csr_crow, self.csr_cols,
                                         self.csr_t_crow, self.csr_t_rows, self.csr_t_perm, skip)  # x Sᵀ

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense (out, in) fp32 tensor — for export only."""
        flat = torch.zeros(self.out_features * self.in_features, device=self.sparse_values.device)
        flat = flat.index_add(0, self.sparse_indices, self.sparse_values.float())
        return flat.view(self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·BA + S, (out, in) fp32 (dense: for export only)."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float()) + self.sparse_weight()

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W + s·BA + S for the dequantized base weight (fp32)."""
        return base_weight.float() + self.delta_weight()

    def extra_repr(self) -> str:
        density = self.nnz / (self.out_features * self.in_features)
        return f"rank={self.rank}, scale={self.scale}, nnz={self.nnz} (density {density:.4%})"


# --- mask selection (a function, not a layer: STYLE principle 7) ---------------------------------

def select_sparse_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat int64 indices of the ceil(density·numel) largest entries of a (out, in) score matrix.

    Ties at the threshold go to the lowest flat indices, so the mask is deterministic."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    flat = scores.detach().reshape(-1)
    k = min(math.ceil(density * flat.numel()), flat.numel())
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=flat.device)
    threshold = torch.topk(flat, k, sorted=False).values.min()  # the k-th largest score
    above = (flat > threshold).nonzero().squeeze(1)
    ties = (flat == threshold).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def mmap_accumulators(shapes: dict[str, tuple[int, int]], folder: Path) -> dict[str, torch.Tensor]:
    """Zero-filled fp32 (out, in) accumulators backed by files in `folder` (one per layer), so that
    the squared gradients of every weight of a 7B model (28 GB) sit on disk, not in memory."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    accumulators = {}
    for name, (out_f, in_f) in shapes.items():
        path = folder / f"{name}.f32"
        with open(path, "wb") as f:  # a fresh (sparse) file of zeros, whatever was there before
            f.truncate(out_f * in_f * 4)
        mapped = torch.from_file(str(path), shared=True, size=out_f * in_f, dtype=torch.float32)
        accumulators[name] = mapped.view(out_f, in_f)
    return accumulators


class _GradSquareTap(torch.autograd.Function):
    """Identity on a frozen linear's output y; its backward adds (dL/dW)² = (grad_yᵀ x)² to an accumulator.

    x goes through save_for_backward (not a side dict), so gradient checkpointing frees and recomputes
    it like any activation, and a recomputed forward (whose graph never runs backward) counts nothing."""

    @staticmethod
    def forward(ctx, y, x, accumulator):
        ctx.save_for_backward(x)
        ctx.accumulator = accumulator
        return y.clone()  # a new tensor, not a view: later in-place ops on the layer output stay legal

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
        ctx.accumulator.add_(grad_w.square_().to(ctx.accumulator.device))  # then grad_w is freed
        return grad_y, None, None


def accumulate_weight_grad_squares(model: nn.Module, layer_names: list[str], batches: Iterable[dict],
                                   accumulators: dict[str, torch.Tensor]) -> None:
    """accumulators[name] += (dL/dW)² per batch, dL/dW = grad_outᵀ x (fp32, (out, in)), for frozen linears.

    L is the model's own loss (`model(**batch).loss`). Each named layer may be the linear itself or an
    adapter wrapping it (`.base_layer`). A forward hook on the linear taps its output; in backward the
    tap forms ONE layer's (out, in) gradient, adds its square in place and frees it and x: at most
    one dense temporary at a time. The model's mode is kept: in train mode with gradient checkpointing
    on, activations stay bounded as in training (the tap saves x as autograd does, so it is recomputed,
    not kept, and the hooks firing twice on recomputation count once). Batches are moved to the
    model's device; no .grad is written; requires_grad flags and the input-embedding hook are restored."""
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    enabled_here = not getattr(model, "_require_grads_hooks", None)  # the caller may have enabled it already
    handles = []

    def tap(name):
        return lambda module, args, y: _GradSquareTap.apply(y, args[0].detach(), accumulators[name])

    try:
        model.requires_grad_(False)  # only the embedding output requires grad: no .grad anywhere
        if enabled_here:
            model.enable_input_require_grads()  # else nothing requires grad and backward has no graph
        for name in layer_names:
            layer = model.get_submodule(name)
            handles.append(getattr(layer, "base_layer", layer).register_forward_hook(tap(name)))
        for batch in batches:
            with torch.enable_grad():
                model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
    finally:
        for h in handles:
            h.remove()
        if enabled_here:
            model.disable_input_require_grads()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
