"""Bone and Bat (DiSHA, arXiv 2409.15371) on a frozen (quantized) base, as PEFT computes them (PEFT's MiSS,
formerly Bone: `MissConfig(init_weights=True)` is Bone, `init_weights="bat"` is Bat; the parity target).

d = out_features, k = in_features, r = --rank; W₀ = D(Q(W)) (d, k) the dequantized base weight; b its bias.
The trainable tensor is PEFT's `miss_block` (written D below), zeros at step 0, so ΔW = 0 and the layer is the base.

Bone (`BoneLinear`), D ∈ R^{r×d}:
    ΔW = expand(D):  ΔW[o, n·r + j] = D[j, o]       (Dᵀ tiled ⌈k/r⌉ times along the input, cropped to k)
    y  = x·W₀ᵀ + b + (Σ_n x̃[..., n·r:(n+1)·r])·D       (n < ⌈k/r⌉)
x̃ is dropout(x) zero-padded on the right to a multiple of r (PEFT's F.pad when r does not divide k): the sum runs
over the ⌈k/r⌉ consecutive r-wide blocks of x̃, so its entry j is Σ_n x[n·r + j] (a strided sum), and the zero
columns of a last partial block meet D[k mod r:] with nothing, which is the crop of expand(D). The forward never
forms expand(D): memory O(r·d) instead of O(d·k).

Bat (`BatLinear`), D ∈ R^{(d/r)×r×r}; r must divide both d and k (PEFT refuses otherwise):
    𝒲₀[m, i, a, c] = W₀[i·r + a, m·r + c]                     (W₀ viewed as (k/r, d/r, r, r))
    Δ𝒲[m, i, a, c'] = Σ_c 𝒲₀[m, i, a, c]·D[i, c, c'] + D[i, a, c']    (Δ𝒲 = 𝒲₀ ×₃ D + D)
    ΔW[i·r + a, m·r + c'] = Δ𝒲[m, i, a, c'];      y = x·(W₀ + ΔW)ᵀ + b
The update depends on W₀: the forward forms ΔW from the dequantized base (as PEFT does, one (d, k) weight per
call), and its gradient reaches D only (W₀ is frozen and detached). Its merge reads the dequantized W₀.

Against the seed's text (../shared/seeds/001, in Chinese): it words Bone's block sum as "cut k into r consecutive
blocks of size g = ⌊k/r⌋ and sum each block", i.e. entry i = Σ_{t<g} x[i·g + t] (contiguous groups). PEFT and the
issue cut k into k/r consecutive r-wide blocks and add the blocks, entry j = Σ_n x[n·r + j]; the two lay expand(D)
out differently, and we follow PEFT. The seed writes D ∈ R^{r×d} (PEFT's shape; the issue's D ∈ R^{d×r} is its
transpose). Its "×₃, contraction along the third dimension" is, in PEFT's code, a matmul over the last axis of
𝒲₀ (0-based axis 3) with axis 1 of D, batched over d/r (i) and broadcast over k/r (m), as is the "+ D".

PEFT's MiSS has no scale: the update is not multiplied by α/r (--alpha is ignored, as PEFT ignores scaling).
PEFT's Bone drops out x in the block sum; PEFT's Bat has no dropout, so BatLinear refuses --dropout > 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter, base_weight
from qtune.errors import QtuneError


def miss_peft_config(cfg, target_leaves: list[str], init_weights: bool | str) -> dict:
    """adapter_config.json's keys of PEFT's MiSS (peft_type "MISS"): init_weights True is Bone, "bat" is Bat."""
    return {"r": cfg.rank, "init_weights": init_weights, "miss_dropout": cfg.dropout, "mini_r": 1,
            "target_modules": target_leaves, "bias": "none", "modules_to_save": None}


class BoneLinear(Adapter):
    """The frozen base linear plus Bone's update: the block sum of x times D (r, out); ΔW = expand(D)."""

    peft_type = "MISS"

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank  # scale (α/r) is not used: PEFT's MiSS has no scaling
        self.miss_block = nn.Parameter(torch.zeros(rank, base_layer.out_features, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        padded = F.pad(x, (0, -x.shape[-1] % r))  # (..., r·⌈k/r⌉), zeros on the right
        block_sum = self.dropout(padded).unflatten(-1, (-1, r)).sum(-2)  # (..., r): Σ over the r-wide blocks
        return self.base_layer(x) + block_sum @ self.miss_block.to(x.dtype)  # (..., r)·(r, out)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = expand(D): Dᵀ (out, r) tiled along the input and cropped to in_features, fp32 (independent of W₀)."""
        k = self.in_features
        return self.miss_block.float().t().repeat(1, math.ceil(k / self.rank))[:, :k]

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        return [rank * module.out_features]

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """PEFT's rule: r ≤ in_features (r need not divide it: the input is zero-padded)."""
        for name in targets:
            m = model.get_submodule(name)
            if rank > m.in_features:
                smallest = min(model.get_submodule(n).in_features for n in targets)
                raise QtuneError(f"Bone needs --rank at most the input size of every target, and layer {name} "
                                 f"(out {m.out_features}, in {m.in_features}) has {m.in_features} inputs < --rank "
                                 f"{rank}. Pass --rank {smallest} or smaller.")

    @classmethod
    def peft_config(cls, cfg, target_leaves: list[str], layers: dict[str, Adapter]) -> dict:
        return miss_peft_config(cfg, target_leaves, init_weights=True)

    def peft_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.miss_block": self.miss_block.detach().float()}


class BatLinear(Adapter):
    """The frozen base linear with W' = W₀ + (𝒲₀ ×₃ D + D) on the (k/r, d/r, r, r) view; D is (out/r, r, r)."""

    peft_type = "MISS"

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        if dropout > 0:
            raise QtuneError(f"Bat has no dropout (PEFT's MiSS 'bat' applies none), and --dropout is {dropout}. "
                             "Pass --dropout 0, or use --method bone.")
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank  # scale (α/r) is not used: PEFT's MiSS has no scaling
        d = base_layer.out_features
        self.miss_block = nn.Parameter(torch.zeros(d // rank, rank, rank, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.merged_weight(base_weight(self.base_layer))  # (out, in) fp32: W₀ + ΔW(W₀, D), grad into D only
        bias = self.base_layer.bias
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW = 𝒲₀ ×₃ D + D on the (k/r, d/r, r, r) view of the dequantized W₀, back to (out, in) fp32."""
        d, k = base_weight.shape
        r = self.rank
        w0 = base_weight.detach().float().reshape(d // r, r, k // r, r).permute(2, 0, 1, 3)  # [m, i, a, c]
        block = self.miss_block.float()  # (d/r, r, r): [i, c, c']
        delta = w0 @ block + block  # (k/r, d/r, r, r): Σ_c 𝒲₀[m,i,a,c]·D[i,c,c'] + D[i,a,c']
        return delta.permute(1, 2, 0, 3).reshape(d, k)

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        return [(module.out_features // rank) * rank * rank]

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """PEFT's rule: the weight must cut into whole r×r blocks, so r divides out_features and in_features."""
        common = 0  # gcd of every target's two sizes: the ranks that fit them all are its divisors
        for name in targets:
            m = model.get_submodule(name)
            common = math.gcd(common, m.out_features, m.in_features)
        for name in targets:
            m = model.get_submodule(name)
            if m.out_features % rank or m.in_features % rank:
                fits = max(r for r in range(1, min(rank, common) + 1) if common % r == 0)
                raise QtuneError(f"Bat cuts each weight into r×r blocks, so --rank must divide both sizes of every "
                                 f"target, and layer {name} (out {m.out_features}, in {m.in_features}) is not a "
                                 f"multiple of --rank {rank}. Pass a --rank that divides {common} "
                                 f"(e.g. --rank {fits}), or use --method bone.")

    @classmethod
    def peft_config(cls, cfg, target_leaves: list[str], layers: dict[str, Adapter]) -> dict:
        return miss_peft_config(cfg, target_leaves, init_weights="bat")

    def peft_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.miss_block": self.miss_block.detach().float()}
