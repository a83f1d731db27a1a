"""Spectral adapter (arXiv 2405.13952, "Spectral Adapter: Fine-Tuning in Spectral Space") on a frozen,
quantized residual base.

W = U S Vᵀ (out, in); U₁ (out, r), S₁ (r,), V₁ (in, r) are the top r singular triplets (--rank), U₂ S₂ V₂ᵀ the
rest. The paper tunes the top columns of the singular vector matrices and keeps the others:
    additive (the default):  W' = [U₁ + A_U | U₂] S [V₁ + A_V | V₂]ᵀ = (U₁ + A_U) diag(S₁) (V₁ + A_V)ᵀ + U₂S₂V₂ᵀ
    rotate:                  W' = [U₁R_U | U₂] S [V₁R_V | V₂]ᵀ    = U₁R_U diag(S₁) R_Vᵀ V₁ᵀ + U₂S₂V₂ᵀ
A_U (out, r) and A_V (in, r) are trainable, zeros at the start; R_U, R_V (r, r) are orthogonal through the
Cayley transform R = (I − K)(I + K)⁻¹ of a skew-symmetric K = (P − Pᵀ)/2, P (r, r) trainable, zeros at the
start (R = I). So W' = W at step 0.

As QPiSSA does (qtune.base_init), the frozen base is the residual U₂S₂V₂ᵀ = W − U₁ diag(S₁) V₁ᵀ, quantized:
spectral_init splits each target weight (fp32, before quantization; a randomized SVD, --pissa-niter power
iterations, 0 = full SVD) and the layer holds U₁, S₁, V₁ as frozen fp32 buffers (set_spectral_factors; saved
with the run by the loader, never recomputed). With U' = U₁ + A_U or U₁R_U and V' = V₁ + A_V or V₁R_V:
    y = x·D(Q(W_res))ᵀ + b + ((x·V')·diag(S₁))·U'ᵀ          (thin products only: never an (out, in) matrix)
    ΔW = U' diag(S₁) V'ᵀ  (relative to the residual base: merged = D(Q(W_res)) + ΔW)
At step 0 the layer is W up to the residual's quantization error (exactly W at --bits 16). The spectral
adapter has no α/r scale (--alpha is not used). Dropout (--dropout) drops x in the adapter's branch, as PEFT
does for PiSSA's principal part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter
from qtune.adapters.init import singular_triplets
from qtune.errors import QtuneError

VARIANTS = ("additive", "rotate")
FACTOR_NAMES = ("spectral_U", "spectral_S", "spectral_V")  # the frozen buffers: U₁ (out, r), S₁ (r,), V₁ (in, r)


def spectral_init(weight: torch.Tensor, rank: int, niter: int = 4, generator: torch.Generator | None = None):
    """(U₁ (out, r), S₁ (r,), V₁ (in, r), residual (out, in)), fp32: the top r singular triplets of W and
    residual = W − U₁ diag(S₁) V₁ᵀ, the part that becomes the quantized base.

    niter > 0: randomized SVD with niter power iterations (qtune.adapters.init.singular_triplets); its sketch
    is drawn from `generator` (else from torch's global RNG); niter = 0: the full SVD."""
    w = weight.detach().float()
    with torch.random.fork_rng(devices=[w.get_device()] if w.is_cuda else []):  # the caller's RNG is untouched
        if generator is not None:
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        U, S, Vh = singular_triplets(w, rank, niter)
    return U.contiguous(), S.contiguous(), Vh.T.contiguous(), w - (U * S) @ Vh


def spectral_factors(name: str, U1: torch.Tensor, S1: torch.Tensor, V1: torch.Tensor) -> dict[str, torch.Tensor]:
    """The factors of layer `name` under the keys the run's factor file uses ("<name>.spectral_U", ...)."""
    return {f"{name}.{key}": t.contiguous() for key, t in zip(FACTOR_NAMES, (U1, S1, V1))}


def cayley(generator: torch.Tensor) -> torch.Tensor:
    """R = (I − K)(I + K)⁻¹ with K = (P − Pᵀ)/2 skew-symmetric: orthogonal (det +1), I at P = 0."""
    skew = (generator - generator.T) / 2
    eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
    return torch.linalg.solve(eye + skew, eye - skew)  # (I + K)⁻¹(I − K): the two factors commute


class SpectralLinear(Adapter):
    """The frozen residual base plus (x·V')·diag(S₁)·U'ᵀ on its top r singular vectors (additive or rotated)."""

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 variant: str = "additive"):
        super().__init__()
        if variant not in VARIANTS:
            raise QtuneError(f"Unknown --spectral-variant {variant!r}. Use additive or rotate.")
        self.base_layer = base_layer
        self.rank, self.variant = rank, variant  # scale (α/r) is not used: the paper has none
        out_f, in_f = base_layer.out_features, base_layer.in_features
        self.register_buffer("spectral_U", torch.zeros(out_f, rank))  # U₁, set by set_spectral_factors
        self.register_buffer("spectral_S", torch.zeros(rank))  # S₁
        self.register_buffer("spectral_V", torch.zeros(in_f, rank))  # V₁
        if variant == "additive":
            self.spectral_A_U = nn.Parameter(torch.zeros(out_f, rank))
            self.spectral_A_V = nn.Parameter(torch.zeros(in_f, rank))
        else:
            self.spectral_P_U = nn.Parameter(torch.zeros(rank, rank))  # R_U = cayley(P_U)
            self.spectral_P_V = nn.Parameter(torch.zeros(rank, rank))  # R_V = cayley(P_V)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def tuned_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U' (out, r), V' (in, r)) in fp32: U₁ + A_U, V₁ + A_V, or U₁R_U, V₁R_V."""
        if self.variant == "additive":
            return self.spectral_U + self.spectral_A_U, self.spectral_V + self.spectral_A_V
        return self.spectral_U @ cayley(self.spectral_P_U), self.spectral_V @ cayley(self.spectral_P_V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = (t.to(x.dtype) for t in self.tuned_vectors())
        coords = (self.dropout(x) @ v) * self.spectral_S.to(x.dtype)  # (..., r): x·V'·diag(S₁)
        return self.base_layer(x) + F.linear(coords, u)  # (..., r)·U'ᵀ -> (..., out)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = U' diag(S₁) V'ᵀ, (out, in) fp32: the base is the residual, so merged = D(Q(W_res)) + ΔW."""
        with torch.no_grad():
            u, v = self.tuned_vectors()
            return (u.float() * self.spectral_S.float()) @ v.float().T

    @torch.no_grad()
    def set_spectral_factors(self, U1: torch.Tensor, S1: torch.Tensor, V1: torch.Tensor) -> None:
        """Load U₁ (out, r), S₁ (r,), V₁ (in, r) of spectral_init (the run's saved factors) into the buffers."""
        for buf, t in zip((self.spectral_U, self.spectral_S, self.spectral_V), (U1, S1, V1)):
            if tuple(t.shape) != tuple(buf.shape):
                raise QtuneError(f"Spectral factors of shape {tuple(t.shape)} do not fit this layer (expected "
                                 f"{tuple(buf.shape)}). Use the rank and model the run was started with.")
            buf.copy_(t)

    def load_initial_factors(self, factors: dict[str, torch.Tensor]) -> None:
        """The initialiser's factors by their names in this layer (spectral_U, spectral_S, spectral_V)."""
        self.set_spectral_factors(*(factors[k] for k in FACTOR_NAMES))
        self.after_factors_loaded()

    @classmethod
    def start_training(cls, layers: dict[str, "Adapter"], total_steps: int, run_dir) -> None:
        """Refuse a model whose spectral factors were never loaded (the base would not be the residual)."""
        missing = [n for n, layer in layers.items() if not bool(layer.spectral_S.any())]
        if missing:
            more = f" (and {len(missing) - 1} more layers)" if len(missing) > 1 else ""
            raise QtuneError(f"The spectral adapter of {missing[0]}{more} has no singular vectors: the model was built "
                             "without spectral_init's residual base and factors. Build it with qtune.model.build_model "
                             "(--method spectral), which splits each target weight before quantizing it.")

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        if options.get("variant", "additive") == "rotate":
            return [rank * rank, rank * rank]  # P_U, P_V
        return [module.out_features * rank, module.in_features * rank]  # A_U, A_V

    @classmethod
    def state_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        """The frozen fp32 factors it keeps beside its parameters: U₁ (out, r), S₁ (r,), V₁ (in, r)."""
        return [module.out_features * rank, rank, module.in_features * rank]

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """The rank fits every target (r ≤ min(out, in)), and the variant is known."""
        if options.get("variant", "additive") not in VARIANTS:
            raise QtuneError(f"Unknown --spectral-variant {options['variant']!r}. Use additive or rotate.")
        super().check(model, targets, rank, options)
