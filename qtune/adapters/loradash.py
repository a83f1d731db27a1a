"""LoRA-Dash (arXiv 2409.07999, "Unleashing the power of task-specific directions in PEFT") on a frozen
(quantized) base.

W₀ = D(Q(W)) (out, in) is the dequantized base weight, W₀ = U diag(σ) Vᵀ its full SVD (uᵢ, vᵢ, σᵢ: W₀'s
singular triplets, σ descending), ΔW = s·BA the LoRA update (A (r, in) Kaiming-uniform, B (out, r) zeros,
s = α/r). Two phases:

Pre-launch (steps 1 … t, t = --dash-steps, default 100): plain LoRA,
    y = x·W₀ᵀ + b + s·(x·Aᵀ)·Bᵀ
Switch (after optimizer step t, all layers, one at a time): the change rate of each core direction of W₀,
    δᵢ = |uᵢᵀ·ΔW·vᵢ| / (σᵢ + ε),  ε = 1e-6,  i = 1 … min(out, in)
and the s directions with the largest δ (--dash-directions, default 8) are the "launched task-specific
directions": ūⱼ = u_{i_j}, v̄ⱼ = v_{i_j}. They are W₀'s own singular vectors (the paper projects ΔW onto
"W's core directions" uᵢvᵢᵀ and picks among those; it does not take the SVD of ΔW). Stored as buffers
Ū (s, out) and V̄ (s, in), rows ūⱼ and v̄ⱼ.
Dash (steps t+1 …): Δσ ∈ R^s, zeros at the switch, is learned with A and B:
    W' = W₀ + s·BA + Σⱼ Δσⱼ·ūⱼv̄ⱼᵀ = W₀ + s·BA + Ūᵀ·diag(Δσ)·V̄
    y  = x·W₀ᵀ + b + s·(x·Aᵀ)·Bᵀ + ((x·V̄ᵀ)·diag(Δσ))·Ū          (never an (out, in) matrix)
The paper writes W + AB + Σ Δσᵢ ūᵢv̄ᵢᵀ with no scale on the dash term: Δσ is not multiplied by s.
Δσ exists from the start (a trainable parameter the forward does not read before the switch, so it gets no
gradient and AdamW leaves it at 0 until then); Ū, V̄, the chosen indices and the switched flag are
checkpoint buffers, so a run resumed after the switch continues with the same directions.

δ divides by σᵢ, so it weighs W₀'s SMALL singular directions most (the paper: task-specific directions sit
among the smaller, not the smallest, ones); a top-k randomized SVD finds only the dominant subspace, so the
switch takes the full SVD of W₀ in fp32 (torch.linalg.svd), one layer at a time, once. uᵢᵀΔWvᵢ is computed
as s·Σₖ (UᵀB)ᵢₖ(VᵀAᵀ)ᵢₖ, without forming ΔW.
The switch holds one matrix's W₀, U and Vh in fp32 at a time (≈ 0.4 GB for 11008×4096); its time for a 7B
model is measured by tools/svd_cost.py (docs/benchmarks.md: about 0.7 h for the 32 layers on 2 CPU cores).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter, base_weight, init_lora_factors
from qtune.errors import QtuneError

DEFAULT_STEPS = 100  # the paper's t
DEFAULT_DIRECTIONS = 8  # the paper's s
EPS = 1e-6  # the paper's ε in δᵢ = |uᵢᵀΔWvᵢ| / (σᵢ + ε)


def change_rates(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float):
    """(δ (k,), U (out, k), Vh (k, in)) with k = min(out, in): δᵢ = |uᵢᵀ·s·BA·vᵢ| / (σᵢ + ε) over the full SVD
    W₀ = U diag(σ) Vh (fp32)."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    projected = scale * ((U.T @ lora_B.float()) * (Vh @ lora_A.float().T)).sum(-1)  # (k,): uᵢᵀ·s·BA·vᵢ
    return projected.abs() / (S + EPS), U, Vh


class LoRADashLinear(Adapter):
    """The frozen base linear plus s·BA, and after the switch step Σⱼ Δσⱼ ūⱼv̄ⱼᵀ along W₀'s top-δ directions."""

    checkpoint_buffers = ("dash_U", "dash_V", "dash_index", "dash_switched")

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 steps: int = DEFAULT_STEPS, directions: int = DEFAULT_DIRECTIONS):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scale = rank, scale
        self.dash_steps, self.directions = steps, directions
        out_f, in_f = base_layer.out_features, base_layer.in_features
        self.lora_A, self.lora_B = init_lora_factors(rank, in_f, out_f)
        self.dash_sigma = nn.Parameter(torch.zeros(directions, dtype=torch.float32))  # Δσ, read after the switch
        self.register_buffer("dash_U", torch.zeros(directions, out_f))  # rows ūⱼ
        self.register_buffer("dash_V", torch.zeros(directions, in_f))  # rows v̄ⱼ
        self.register_buffer("dash_index", torch.full((directions,), -1, dtype=torch.long))  # i_j in W₀'s SVD
        self.register_buffer("dash_switched", torch.zeros((), dtype=torch.bool))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        y = self.base_layer(x) + self.scale * F.linear(F.linear(h, a), b)  # (..., r) -> (..., out)
        if self.dash_switched:
            coords = F.linear(h, self.dash_V.to(x.dtype)) * self.dash_sigma.to(x.dtype)  # (..., s): vⱼᵀx·Δσⱼ
            y = y + coords @ self.dash_U.to(x.dtype)  # (..., s)·(s, out)
        return y

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s·BA + Ūᵀ diag(Δσ) V̄, (out, in) fp32 (the second term 0 before the switch)."""
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())
        if self.dash_switched:
            delta = delta + (self.dash_U.float().T * self.dash_sigma.detach().float()) @ self.dash_V.float()
        return delta

    @torch.no_grad()
    def launch(self) -> None:
        """The switch: the full SVD of the dequantized W₀, δ of every core direction, the top s stored."""
        delta, U, Vh = change_rates(base_weight(self.base_layer), self.lora_A, self.lora_B, self.scale)
        index = torch.topk(delta, self.directions).indices  # largest δ first
        self.dash_U.copy_(U[:, index].T)
        self.dash_V.copy_(Vh[index])
        self.dash_index.copy_(index)
        self.dash_sigma.zero_()
        self.dash_switched.fill_(True)

    @classmethod
    def after_step(cls, layers: dict[str, "Adapter"], step: int) -> None:
        """At step t (= --dash-steps) every layer launches, one at a time (one full SVD in memory at once)."""
        for layer in layers.values():
            if step == layer.dash_steps and not layer.dash_switched:
                layer.launch()

    @classmethod
    def start_training(cls, layers: dict[str, "Adapter"], total_steps: int, run_dir) -> None:
        steps = min((layer.dash_steps for layer in layers.values()), default=0)
        if steps >= total_steps:
            warnings.warn(f"LoRA-Dash: the run has {total_steps} steps and the directions are chosen after step "
                          f"{steps} (--dash-steps): it trains plain LoRA. Pass a smaller --dash-steps.", stacklevel=2)

    @classmethod
    def report(cls, layers: dict[str, "Adapter"]) -> dict | None:
        return {"dash_switched": sum(bool(layer.dash_switched) for layer in layers.values()), "layers": len(layers)}

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        return super().trainable_sizes(module, rank, options) + [options.get("directions", DEFAULT_DIRECTIONS)]

    @classmethod
    def state_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        """Ū (s, out) and V̄ (s, in) fp32, the chosen indices (s, int64: two fp32's worth each)."""
        s = options.get("directions", DEFAULT_DIRECTIONS)
        return [s * module.out_features, s * module.in_features, 2 * s]

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """LoRA's rank rule, --dash-steps ≥ 1, and 1 ≤ --dash-directions ≤ min(out, in) of every target."""
        super().check(model, targets, rank, options)
        steps = options.get("steps", DEFAULT_STEPS)
        directions = options.get("directions", DEFAULT_DIRECTIONS)
        if steps < 1:
            raise QtuneError(f"--dash-steps must be at least 1 (steps of plain LoRA before LoRA-Dash chooses its "
                             f"directions), got {steps}. Pass e.g. --dash-steps {DEFAULT_STEPS}.")
        if directions < 1:
            raise QtuneError(f"--dash-directions must be at least 1, got {directions}. "
                             f"Pass e.g. --dash-directions {DEFAULT_DIRECTIONS}.")
        for name in targets:
            m = model.get_submodule(name)
            limit = min(m.in_features, m.out_features)
            if directions > limit:
                raise QtuneError(f"--dash-directions {directions} is more than layer {name} has (at most {limit}: "
                                 f"min(out {m.out_features}, in {m.in_features})). Pass a smaller --dash-directions.")
