"""LN tuning: only the normalisation layers' affine parameters are trained, everything else frozen.

    y = norm(x; γ′, β′)      γ′ (and β′ for a LayerNorm) trainable, starting at the base's γ (β)
                                                  (LN tuning, arXiv 2312.11420; PEFT's LNTuningConfig)

An RMSNorm computes γ′ ⊙ x/√(mean(x²) + ε) (Gemma's (1 + γ′) ⊙ x̂), a LayerNorm γ′ ⊙ (x − μ)/σ + β′.
The adapter wraps the norm and runs the norm's own forward with its weights swapped for the trainable
fp32 copies (cast to the activation dtype), so every norm type keeps its exact computation. Targets are
the norms inside the decoder layers and the final norm (PEFT's default for Llama: input_layernorm,
post_attention_layernorm, norm); `--target-modules` all-linear means all of them, a list narrows by name.

Merged, the norm's weight (and bias) are the trained ones. PEFT's form is a trained copy of the whole
norm (`<norm>.ln_tuning_layers.weight`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from qtune.adapters.base import Adapter

NORM_SUFFIXES = ("RMSNorm", "LayerNorm")


class _NormTypes(type):
    """isinstance(m, NormLayer): m is a normalisation layer with a weight to tune (nn.LayerNorm, nn.RMSNorm,
    or any class named *RMSNorm / *LayerNorm: LlamaRMSNorm, GemmaRMSNorm, ...). Weightless norms (OLMo's
    LayerNorm) have nothing to tune and are not targets."""

    def __instancecheck__(cls, module) -> bool:
        is_norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(NORM_SUFFIXES)
        return is_norm and not isinstance(module, Adapter) and isinstance(getattr(module, "weight", None), torch.Tensor)


class NormLayer(metaclass=_NormTypes):
    """The module type LN tuning adapts (an isinstance test by class name, see _NormTypes)."""


class LNTuning(Adapter):
    """A frozen norm whose weight (and bias) are replaced by trainable fp32 copies."""

    targets = (NormLayer,)
    target_kind = "norm layer"
    scope = "model"  # the final norm, outside the decoder layers, too
    peft_type = "LN_TUNING"

    def __init__(self, base_layer: nn.Module, rank: int = 0, scale: float = 1.0, dropout: float = 0.0):
        """`rank`, `scale` and `dropout` are not used."""
        super().__init__()
        self.base_layer = base_layer
        self.weight = nn.Parameter(base_layer.weight.detach().float().clone())
        bias = getattr(base_layer, "bias", None)
        self.bias = nn.Parameter(bias.detach().float().clone()) if isinstance(bias, torch.Tensor) else None
        for eps in ("variance_epsilon", "eps"):  # read by qtune.engine.block (the norm's layout)
            if hasattr(base_layer, eps):
                setattr(self, eps, getattr(base_layer, eps))

    def trained(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The norm's tensors as trained, in `dtype`."""
        out = {"weight": self.weight.to(dtype)}
        if self.bias is not None:
            out["bias"] = self.bias.to(dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base_layer, self.trained(x.dtype), (x,))  # the norm's own math, γ′ (β′)

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        bias = getattr(module, "bias", None)
        return [module.weight.numel()] + ([bias.numel()] if isinstance(bias, torch.Tensor) else [])

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """Nothing to refuse: any norm with a weight is tuned by its own forward (--rank is not used)."""

    def merge(self, base_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The norm's tensors are the trained ones (no ΔW: a norm's weight is a vector, not a matrix)."""
        return {k: v.detach().float() for k, v in self.trained(torch.float32).items()}

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-1]

    # --- PEFT's LN tuning format -----------------------------------------------------------------------

    @classmethod
    def peft_config(cls, cfg, target_leaves: list[str], layers: dict[str, Adapter]) -> dict:
        return {"target_modules": target_leaves, "exclude_modules": None, "modules_to_save": None}

    def peft_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.ln_tuning_layers.{k}": v.detach().float().contiguous()
                for k, v in self.trained(torch.float32).items()}
