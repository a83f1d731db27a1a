"""LoHa on a frozen (quantized) base: a low-rank Hadamard product update.

    ΔW = s · (W1a·W1b) ⊙ (W2a·W2b)                 (FedPara, arXiv 2108.06098; PEFT's LoHa)
    y  = x·D(Q(W))ᵀ + b + dropout(x)·ΔWᵀ

W1a, W2a ∈ R^{out×r}, W1b, W2b ∈ R^{r×in}: four thin factors (2·r·(out + in) parameters) whose
element-wise product has rank up to r² (FedPara's point: rank r² for the parameters of rank 2r).
s = α/r. Initialised as PEFT: W1a, W1b, W2a Kaiming-uniform, W2b zeros, so ΔW = 0 at step 0.

The reference forward forms ΔW (out, in) once per call (the Hadamard product has no thin form), and
autograd keeps the two (out, in) products for backward. The parameters carry PEFT's names
(hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a (out, r), hada_w2_b (r, in)), so the PEFT export
writes them as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter


class LoHaLinear(Adapter):
    """The frozen base linear (QuantLinear or nn.Linear) plus s·(W1a·W1b) ⊙ (W2a·W2b)."""

    peft_type = "LOHA"

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scale = rank, scale
        out_f, in_f = base_layer.out_features, base_layer.in_features
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, rank, dtype=torch.float32))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_f, dtype=torch.float32))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, rank, dtype=torch.float32))
        self.hada_w2_b = nn.Parameter(torch.zeros(rank, in_f, dtype=torch.float32))  # zero: ΔW = 0 at step 0
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):  # PEFT's order and init
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        out_f, in_f = module.out_features, module.in_features
        return [out_f * rank, rank * in_f, out_f * rank, rank * in_f]

    def hadamard_delta(self, dtype: torch.dtype) -> torch.Tensor:
        """s·(W1a·W1b) ⊙ (W2a·W2b), (out, in) in `dtype`."""
        w1 = self.hada_w1_a.to(dtype) @ self.hada_w1_b.to(dtype)  # (out, in), rank ≤ r
        w2 = self.hada_w2_a.to(dtype) @ self.hada_w2_b.to(dtype)  # (out, in), rank ≤ r
        return self.scale * (w1 * w2)                              # rank ≤ r²

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(self.dropout(x), self.hadamard_delta(x.dtype))

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s·(W1a·W1b) ⊙ (W2a·W2b), (out, in) fp32 (independent of W₀)."""
        with torch.no_grad():
            return self.hadamard_delta(torch.float32)

    # --- PEFT's LoHa format (peft.LoHaConfig; scaling = alpha / r) ---
    @classmethod
    def peft_config(cls, cfg, target_leaves: list[str], layers: dict[str, Adapter]) -> dict:
        return {"r": cfg.rank, "alpha": cfg.scale * cfg.rank,  # PEFT's alpha/r is then exactly our s
                "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, "use_effective_conv2d": False,
                "target_modules": target_leaves, "exclude_modules": None, "layers_to_transform": None,
                "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}

    def peft_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        return {f"{prefix}.{n}": getattr(self, n).detach().float().contiguous() for n in names}
