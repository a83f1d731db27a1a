"""LoKr on a frozen (quantized) base: a Kronecker-product update.

    ΔW = s · (W₁ ⊗ W₂)                           (KronA, arXiv 2212.10650; PEFT's LoKr)
    y  = x·D(Q(W))ᵀ + b + dropout(x)·ΔWᵀ

W₁ ∈ R^{a×c}, W₂ ∈ R^{b×d} with out = a·b and in = c·d, so ΔW is (out, in) from a·c + b·d parameters.
The shapes follow PEFT's factorization: (c, d) = kronecker_split(in, f), (a, b) = kronecker_split(out, f)
with f = --lokr-factor (−1: the most balanced split, a ≤ b). As PEFT, W₂ is itself low-rank,
W₂ = W2a·W2b (b×r, r×d), when r < max(b, d)/2, and W₁ = W1a·W1b when decompose_both and
r < max(a, c)/2. s = α/r. Initialised as PEFT: W₁ (or W1a) zeros, the other factors Kaiming-uniform,
so ΔW = 0 at step 0.

The forward never forms W₁ ⊗ W₂. Index convention (row-major, as torch.kron and reshape):
(W₁ ⊗ W₂)[i·b + j, k·d + l] = W₁[i, k]·W₂[j, l]. Reshape x (…, c·d) to X (…, c, d), X[k, l] = x[k·d + l]:

    (x·(W₁ ⊗ W₂)ᵀ)[i·b + j] = Σ_{k,l} W₁[i,k]·X[k,l]·W₂[j,l] = (W₁·X·W₂ᵀ)[i, j]

i.e. y_adapter = s · reshape(W₁·X·W₂ᵀ, (…, a·b)) — in column-major vec notation the familiar
(W₁ ⊗ W₂)·vec(Xᵀ) = vec(W₂·Xᵀ·W₁ᵀ). Cost per token b·c·(a + d) multiply-adds instead of a·b·c·d.
The parameters carry PEFT's names (lokr_w1 or lokr_w1_a/lokr_w1_b, lokr_w2 or lokr_w2_a/lokr_w2_b).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qtune.adapters.base import Adapter
from qtune.errors import QtuneError


def kronecker_split(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dim, as PEFT's lokr factorization: (factor, dim/factor) for a factor that divides dim;
    for −1 the divisor pair nearest √dim, smaller first (64 -> (8, 8), 96 -> (8, 12), a prime p -> (1, p))."""
    if factor > 0:
        if dim % factor:
            raise ValueError(f"factor {factor} does not divide {dim}")
        return factor, dim // factor
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


def lokr_shapes(in_features: int, out_features: int, rank: int, factor: int = -1,
                decompose_both: bool = False) -> dict[str, tuple[int, int]]:
    """The trainable tensors' shapes by PEFT's names, W₁'s first (PEFT's init order)."""
    c, d = kronecker_split(in_features, factor)
    a, b = kronecker_split(out_features, factor)
    shapes = {}
    if decompose_both and rank < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, rank), lokr_w1_b=(rank, c))
    else:
        shapes.update(lokr_w1=(a, c))
    if rank < max(b, d) / 2:
        shapes.update(lokr_w2_a=(b, rank), lokr_w2_b=(rank, d))
    else:
        shapes.update(lokr_w2=(b, d))
    return shapes


class LoKrLinear(Adapter):
    """The frozen base linear (QuantLinear or nn.Linear) plus s·(W₁ ⊗ W₂), applied as W₁·X·W₂ᵀ."""

    peft_type = "LOKR"

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0, factor: int = -1,
                 decompose_both: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scale, self.factor, self.decompose_both = rank, scale, factor, decompose_both
        shapes = lokr_shapes(base_layer.in_features, base_layer.out_features, rank, factor, decompose_both)
        for name, shape in shapes.items():
            p = nn.Parameter(torch.empty(shape, dtype=torch.float32))
            if name in ("lokr_w1", "lokr_w1_a"):
                nn.init.zeros_(p)  # W₁ = 0: ΔW = 0 at step 0
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            self.register_parameter(name, p)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        shapes = lokr_shapes(module.in_features, module.out_features, rank, options.get("factor", -1),
                             options.get("decompose_both", False))
        return [m * n for m, n in shapes.values()]

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """--lokr-factor is −1 or a divisor of every target's in and out features (the Kronecker factors split
        both by it; PEFT would silently fall back to another split)."""
        factor = options.get("factor", -1)
        if factor != -1 and factor < 1:
            raise QtuneError(f"--lokr-factor {factor} is not a Kronecker factor. Pass a positive factor that divides "
                             "the target layers' dimensions, or -1 for the most balanced split.")
        if factor == -1:
            return
        dims = [(n, model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in targets]
        common = math.gcd(*(x for _, o, i in dims for x in (o, i)))
        fits = [str(f) for f in range(2, min(common, 64) + 1) if common % f == 0][:6]
        for name, out_f, in_f in dims:
            if out_f % factor or in_f % factor:
                raise QtuneError(
                    f"--lokr-factor {factor} does not divide layer {name} of shape (out {out_f}, in {in_f}): the "
                    f"Kronecker factors split both dimensions by it. Pass a --lokr-factor that divides every target's "
                    f"dimensions ({', '.join(fits) or 'none but 1 here'}), or -1 for the most balanced split.")

    def kron_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W₁ (a, c), W₂ (b, d)) in `dtype`, multiplying out the low-rank ones (small: a·c and b·d)."""
        cast = {n: p.to(dtype) for n, p in self.named_parameters(recurse=False)}
        w1 = cast["lokr_w1"] if "lokr_w1" in cast else cast["lokr_w1_a"] @ cast["lokr_w1_b"]
        w2 = cast["lokr_w2"] if "lokr_w2" in cast else cast["lokr_w2_a"] @ cast["lokr_w2_b"]
        return w1, w2

    @classmethod
    def saved_per_token(cls, module: nn.Module, rank: int, options: dict) -> int:
        """X·W₂ᵀ (c, b) per token, kept for W₁'s product's backward (X is the input's view, kept anyway)."""
        c, _ = kronecker_split(module.in_features, options.get("factor", -1))
        _, b = kronecker_split(module.out_features, options.get("factor", -1))
        return c * b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.kron_factors(x.dtype)                               # (a, c), (b, d)
        X = self.dropout(x).unflatten(-1, (w1.shape[1], w2.shape[1]))     # (..., c, d)
        y = w1 @ (X @ w2.T)                                               # W₁·X·W₂ᵀ, (..., a, b)
        return self.base_layer(x) + self.scale * y.flatten(-2)            # (..., out = a·b)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s·(W₁ ⊗ W₂), (out, in) fp32 (independent of W₀; formed only here, for merging)."""
        with torch.no_grad():
            return self.scale * torch.kron(*self.kron_factors(torch.float32))

    # --- PEFT's LoKr format (peft.LoKrConfig; scaling = alpha / r; the same r, factor and decompose_both make
    # PEFT build the same shapes) ---
    @classmethod
    def peft_config(cls, cfg, target_leaves: list[str], layers: dict[str, Adapter]) -> dict:
        layer = next(iter(layers.values()))
        return {"r": cfg.rank, "alpha": cfg.scale * cfg.rank,  # PEFT's alpha/r is then exactly our s
                "rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False,
                "decompose_both": layer.decompose_both, "decompose_factor": layer.factor, "init_weights": True,
                "use_effective_conv2d": False, "target_modules": target_leaves, "exclude_modules": None,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                "modules_to_save": None}

    def peft_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{n}": p.detach().float().contiguous() for n, p in self.named_parameters(recurse=False)}
