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

from qtune.recompute import can_skip


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
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        lora = self.scale * F.linear(F.linear(self.dropout(x), a), b)  # (..., r) -> (..., out)
        if can_skip(self):
            return lora  # backward reads only the adapter's saved tensors (see qtune.recompute)
        return self.base_layer(x) + lora

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·BA, (out, in) fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W + s·BA for the dequantized base weight (fp32)."""
        return base_weight.float() + self.delta_weight()
