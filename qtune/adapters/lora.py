"""LoRA on a frozen (quantized) base — QLoRA when the base is NF4.

    y = x·D(Q(W))ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ        (LoRA, arXiv 2106.09685; QLoRA, arXiv 2305.14314)

A ∈ R^{r×in} Kaiming-uniform, B ∈ R^{out×r} zeros, so the layer equals the base at step 0.
s = α/r, or α/√r with rsLoRA (arXiv 2312.03732). A and B are fp32 (the optimizer's master copy) and
are cast to the activation dtype for the two thin products. The fast path is qtune.engine's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter, init_lora_factors


class LoRALinear(Adapter):
    """The frozen base linear (QuantLinear or nn.Linear) plus a trainable low-rank update s·BA."""

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scale = rank, scale
        self.lora_A, self.lora_B = init_lora_factors(rank, base_layer.in_features, base_layer.out_features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base_layer(x) + self.scale * F.linear(F.linear(self.dropout(x), a), b)  # (..., r) -> (..., out)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s·BA, (out, in) fp32 (independent of W₀)."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())
