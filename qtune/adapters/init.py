"""Adapter initialisers that move weight between base and adapter, as pure functions of one weight.

They run per weight BEFORE quantization (the loader quantizes what they return as the base):

    PiSSA   (arXiv 2404.02948): W = U S Vᵀ; B = U_r √S_r / √s, A = √S_r V_rᵀ / √s; base = W − s·BA
    MiLoRA  (arXiv 2406.09044): the same with the r SMALLEST singular triplets
    LoftQ   (arXiv 2310.08659): repeat { Q = Q(W − s·BA); (B, A) = top-r SVD of W − D(Q) }

Shapes: W (out, in), A (r, in), B (out, r); everything is computed and returned in fp32.
The randomized SVD draws from torch's global RNG: seed it (attach_adapters does) and save the
resulting A, B with the run — resume and export must never recompute them.
"""

from __future__ import annotations

import torch

from quant import QuantizedWeight, quantize


def singular_triplets(weight: torch.Tensor, rank: int, niter: int = 4, smallest: bool = False,
                      oversampling: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r (out, r), S_r (r,), Vh_r (r, in)): the r largest (or smallest) singular triplets of W.

    niter > 0: randomized SVD (Halko et al.; torch.svd_lowrank) with `niter` power iterations on a
    sketch of rank + oversampling columns: seconds where a full SVD of a 7B MLP weight takes minutes.
    niter = 0, or smallest=True: full SVD. A randomized sketch finds the dominant subspace only, so
    the smallest components (MiLoRA) always need the full decomposition.
    """
    w = weight.detach().float()
    if not 0 < rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}] for a {tuple(w.shape)} weight, got {rank}")
    if smallest or niter <= 0:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # S descending
        keep = slice(S.numel() - rank, None) if smallest else slice(0, rank)
        return U[:, keep], S[keep], Vh[keep]
    U, S, V = torch.svd_lowrank(w, q=min(rank + oversampling, min(w.shape)), niter=niter)
    return U[:, :rank], S[:rank], V[:, :rank].T


def factors_from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scale: float):
    """(A, B) with s·BA = U diag(S) Vh, the singular values split evenly: A = √(S/s) Vh, B = U √(S/s)."""
    root = (S / scale).sqrt()  # (r,)
    return root[:, None] * Vh, U * root  # (r, in), (out, r)


def pissa_init(weight: torch.Tensor, rank: int, scale: float, niter: int = 4, smallest: bool = False):
    """PiSSA (MiLoRA with smallest=True): returns (A, B, residual) with residual + s·BA = W.

    The residual is what gets quantized as the frozen base; A and B start the adapter.
    """
    w = weight.detach().float()
    A, B = factors_from_svd(*singular_triplets(w, rank, niter, smallest), scale)
    return A, B, w - scale * (B @ A)


def reconstruction_error(weight: torch.Tensor, qweight: QuantizedWeight | torch.Tensor,
                         A: torch.Tensor | None = None, B: torch.Tensor | None = None, scale: float = 1.0) -> float:
    """‖W − (D(Q) + s·BA)‖_F / ‖W‖_F: how far the quantized base (plus the adapter, if given) is from W."""
    w = weight.detach().float()
    approx = qweight.dequantize(torch.float32) if isinstance(qweight, QuantizedWeight) else qweight.detach().float()
    if A is not None and B is not None:
        approx = approx + scale * (B.float() @ A.float())
    return (torch.linalg.matrix_norm(w - approx) / torch.linalg.matrix_norm(w)).item()


def loftq_init(weight: torch.Tensor, rank: int, scale: float, quant_type: str = "nf4", iters: int = 5,
               niter: int = 4, from_pissa: bool = False, double_quant: bool = True,
               compute_dtype: torch.dtype = torch.bfloat16):
    """LoftQ: returns (A, B, qweight, errors) after `iters` alternations (arXiv 2310.08659, Alg. 1).

    Each iteration quantizes the part of W the adapter does not hold, then refits the adapter to
    the quantization error: Q_t = Q(W − s·B_{t−1}A_{t−1}); (B_t, A_t) = top-r SVD of W − D(Q_t).
    errors[t] = ‖W − D(Q_t) − s·B_tA_t‖_F / ‖W‖_F. qweight is the last Q_t, the base to train on.
    Unlike PiSSA the sum no longer equals W; it is closer to W than plain Q(W) is.

    from_pissa=False starts from B = A = 0 (LoftQ as published: the first Q is plain Q(W));
    from_pissa=True starts from PiSSA's factors (QPiSSA with alternation): the first Q is then
    Q(W_res), and with an exact SVD the first error is already at most QPiSSA's (the refit is the
    optimal rank-r fit, and PiSSA's own factors are one candidate). On weights with a few large
    singular values this start ends well below the zero start (docs/benchmarks.md).
    """
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iters}")
    w = weight.detach().float()
    if from_pissa:
        A, B = factors_from_svd(*singular_triplets(w, rank, niter), scale)
    else:
        A, B = w.new_zeros(rank, w.shape[1]), w.new_zeros(w.shape[0], rank)
    errors = []
    for _ in range(iters):
        qweight = quantize(w - scale * (B @ A), quant_type, double_quant, compute_dtype)
        error = w - qweight.dequantize(torch.float32)  # (out, in), what the adapter should absorb
        A, B = factors_from_svd(*singular_triplets(error, rank, niter), scale)
        errors.append(reconstruction_error(w, qweight, A, B, scale))
    return A, B, qweight, errors
