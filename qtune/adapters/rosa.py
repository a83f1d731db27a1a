"""RoSA on a frozen (quantized) base — QRoSA when the base is NF4.

    y = x·D(Q(W))ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ + x·Sᵀ                 (RoSA, arXiv 2401.04679)

S (out, in) is sparse with a fixed support of density d, chosen before training from accumulated
squared weight gradients (qtune.adapters.rosa_mask), and trainable values that start at 0; with
B = 0 too the layer equals the base at step 0. S is stored as values (nnz,) at flat row-major
indices (nnz,): memory ∝ nnz. The reference forward below forms S densely (it is the equation);
the fast path (qtune.engine) never does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter, init_lora_factors


class RoSALinear(Adapter):
    """The frozen base linear plus a low-rank and a sparse update.

    `sparse_values` (nnz,) fp32 sit at `sparse_indices` (nnz,) int64, sorted and unique (rows grouped,
    as CSR; `csr_crow`, `csr_cols` give that structure). Built with indices=None the support is empty
    (plain LoRA) until `set_support`, called after the mask is chosen and before the optimizer is built."""

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 indices: torch.Tensor | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scale = rank, scale
        self.lora_A, self.lora_B = init_lora_factors(rank, base_layer.in_features, base_layer.out_features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_support(torch.zeros(0, dtype=torch.int64) if indices is None else indices)

    @property
    def nnz(self) -> int:
        return self.sparse_indices.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        y = self.base_layer(x) + self.scale * F.linear(F.linear(self.dropout(x), a), b)
        return y + F.linear(x, self.sparse_weight().to(x.dtype)) if self.nnz else y   # + x·Sᵀ

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense (out, in) fp32 tensor, differentiable w.r.t. the values."""
        flat = torch.zeros(self.out_features * self.in_features, device=self.sparse_values.device)
        return flat.index_put((self.sparse_indices,), self.sparse_values.float()).view(self.out_features, self.in_features)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s·BA + S, (out, in) fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float()) + self.sparse_weight()

    @torch.no_grad()
    def set_support(self, indices: torch.Tensor) -> None:
        """Fix S's support to `indices` (flat row-major into (out, in), sorted, unique), values 0."""
        out_f, in_f = self.out_features, self.in_features
        device = self.lora_A.device
        indices = torch.as_tensor(indices).to(device=device, dtype=torch.int64).flatten()
        if indices.numel() and (indices[0] < 0 or indices[-1] >= out_f * in_f or (indices.diff() <= 0).any()):
            raise ValueError(f"sparse indices must be sorted, unique and in [0, {out_f * in_f}) "
                             f"for a ({out_f}, {in_f}) weight")
        rows = indices // in_f
        self.register_buffer("sparse_indices", indices)  # persistent: saved with the run
        crow = F.pad(torch.bincount(rows, minlength=out_f).cumsum(0), (1, 0))  # CSR row pointers (out + 1,)
        self.register_buffer("csr_crow", crow.to(torch.int32), persistent=False)
        self.register_buffer("csr_cols", (indices % in_f).to(torch.int32), persistent=False)
        self.sparse_values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=device),
                                          requires_grad=self.lora_A.requires_grad)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved support that differs from ours: adopt it first, so that its values then load into place
        saved = state_dict.get(prefix + "sparse_indices")
        if saved is not None and not torch.equal(saved.to(self.sparse_indices.device), self.sparse_indices):
            self.set_support(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        density = self.nnz / (self.out_features * self.in_features)
        return f"rank={self.rank}, scale={self.scale}, nnz={self.nnz} (density {density:.4%})"
