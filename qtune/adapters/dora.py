"""DoRA on a frozen (quantized) base — QDoRA when the base is NF4.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row                          (DoRA, arXiv 2402.09353, eq. 5)
    y  = x·Wᵀ + b + (m/n − 1) ⊙ (x̃·Wᵀ) + (m/n) ⊙ s·(x̃·Aᵀ)·Bᵀ,     n = ‖W + s·BA‖_row ∈ R^{out}

x̃ = dropout(x); without dropout y = (m/n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b: the bias is not scaled (as
PEFT). With the norm detached (§4.3) n is a constant in backward. m starts at ‖W‖_row and B at zero,
so the layer equals the base at step 0. The fast path (W' never formed) is qtune.engine's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter, base_weight, init_lora_factors


class DoRALinear(Adapter):
    """The frozen base linear (QuantLinear or nn.Linear) re-parameterised as magnitude ⊙ direction."""

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 detach_norm: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scale, self.detach_norm = rank, scale, detach_norm
        self.lora_A, self.lora_B = init_lora_factors(rank, base_layer.in_features, base_layer.out_features)
        self.magnitude = nn.Parameter(torch.empty(base_layer.out_features, dtype=torch.float32))  # (out,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_magnitude()

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        return super().trainable_sizes(module, rank, options) + [module.out_features]  # and the magnitude m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_d = self.dropout(x)
        w = base_weight(self.base_layer)                                  # (out, in) fp32
        n = torch.linalg.vector_norm(w + self.lora_delta(), dim=1)         # ‖W + s·BA‖_row, (out,)
        if self.detach_norm:
            n = n.detach()                                                # DoRA §4.3: a constant in backward
        c = self.magnitude / n                                            # (out,)
        lora = self.scale * F.linear(F.linear(x_d, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        x_w = F.linear(x_d, w.to(x.dtype))                                # x̃·Wᵀ, no bias
        return self.base_layer(x) + ((c - 1) * x_w + c * lora).to(x.dtype)

    def lora_delta(self) -> torch.Tensor:
        """s·BA, (out, in) fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row, fp32 (out, in)."""
        v = base_weight.float() + self.lora_delta()
        return (self.magnitude.float() / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1) * v

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W' − W (depends on W: the magnitude rescales its rows)."""
        return self.merged_weight(base_weight) - base_weight.float()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m ← ‖W + s·BA‖_row, so that the layer equals W + s·BA (after PiSSA/LoftQ factors are loaded)."""
        self.magnitude.copy_(torch.linalg.vector_norm(base_weight(self.base_layer) + self.lora_delta(), dim=1))

    def after_factors_loaded(self) -> None:
        self.reset_magnitude()
