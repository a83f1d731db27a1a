"""PiSSA / MiLoRA / LoftQ inside the streaming loader: one command, no separate fp32 pass.

For each target linear, as its weight streams in (one at a time, in fp32), the initialiser splits
it into adapter factors (A₀, B₀) and the residual that becomes the frozen, quantized base. The
residual base (in the bitsandbytes-4-bit layout) and the factors are saved in the run folder —
RUN/base/ and RUN/init_adapter.safetensors — so that resume and export reload them instead of
recomputing a randomized SVD.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qtune.adapters.init import loftq_init, pissa_init, reconstruction_error
from qtune.adapters.spectral import spectral_factors, spectral_init
from qtune.architectures import is_target
from qtune.errors import QtuneError
from qtune.loader import QuantSpec, load_model, save_quantized
from quant import quantize

BASE_DIR = "base"
FACTORS_FILE = "init_adapter.safetensors"


def load_initialised_base(model_dir: Path, cfg, quant: QuantSpec, compute_dtype: torch.dtype, run_dir: Path | None,
                          progress: bool = True):
    """(base model, {"<layer>.lora_A"/"lora_B": tensor}, report) for cfg.init in pissa|milora|loftq."""
    if run_dir is not None and (Path(run_dir) / BASE_DIR / "config.json").is_file() \
            and (Path(run_dir) / FACTORS_FILE).is_file():
        model = load_model(Path(run_dir) / BASE_DIR, quant, compute_dtype, use_cache=False, progress=progress)
        return model, load_file(Path(run_dir) / FACTORS_FILE), None

    factors: dict[str, torch.Tensor] = {}
    errors: list[tuple[float, float]] = []  # per matrix: (plain quantization, with the init)
    gen = torch.Generator().manual_seed(cfg.seed)

    def transform(name: str, weight: torch.Tensor):
        if not is_target(name, cfg.target_modules):
            return weight
        w = weight.float()  # (out, in): one layer in fp32 at a time
        if min(w.shape) < cfg.rank:
            raise QtuneError(f"--rank {cfg.rank} is larger than layer {name} allows (at most {min(w.shape)}). "
                             "Pass a smaller --rank.")
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))  # the randomized SVD's sketch
            if cfg.method == "spectral":  # U₁, S₁, V₁ go to the adapter; the residual W − U₁S₁V₁ᵀ is the base
                U1, S1, V1, base = spectral_init(w, cfg.rank, cfg.pissa_niter)
                factors.update(spectral_factors(name, U1, S1, V1))
                A, B = S1[:, None] * V1.T, U1  # only for the error report: B·A = U₁S₁V₁ᵀ
                err_init = (reconstruction_error(w, quantize(base, quant.kind, quant.double_quant), A, B)
                            if quant.kind else 0.0)
            elif cfg.init == "loftq":
                A, B, base, errs = loftq_init(w, cfg.rank, cfg.scale, quant.kind, cfg.loftq_iters, cfg.pissa_niter,
                                              from_pissa=cfg.loftq_start == "pissa", double_quant=quant.double_quant,
                                              compute_dtype=compute_dtype)
                err_init = errs[-1]
            else:
                A, B, base = pissa_init(w, cfg.rank, cfg.scale, cfg.pissa_niter, smallest=cfg.init == "milora")
                err_init = (reconstruction_error(w, quantize(base, quant.kind, quant.double_quant), A, B, cfg.scale)
                            if quant.kind else 0.0)
        err_plain = reconstruction_error(w, quantize(w, quant.kind, quant.double_quant)) if quant.kind else 0.0
        if cfg.method != "spectral":
            factors[f"{name}.lora_A"], factors[f"{name}.lora_B"] = A.contiguous(), B.contiguous()
        errors.append((err_plain, err_init))
        return base

    model = load_model(model_dir, quant, compute_dtype, use_cache=False, progress=progress, transform=transform)
    report = None
    if errors and quant.kind:
        plain = statistics.mean(e[0] for e in errors)
        init = statistics.mean(e[1] for e in errors)
        report = {"init": "spectral" if cfg.method == "spectral" else cfg.init, "matrices": len(errors),
                  "base_error_plain": plain, "base_error_init": init, "relative_change": init / plain - 1}
        print(f"qtune: {report['init']} init over {len(errors)} matrices: mean relative {quant.kind} reconstruction "
              f"error {plain:.4f} -> {init:.4f} ({init / plain - 1:+.1%})")
    if run_dir is not None:
        save_quantized(model, Path(run_dir) / BASE_DIR, model_dir)
        tmp = Path(run_dir) / f".{FACTORS_FILE}.tmp"
        save_file(factors, tmp)
        os.replace(tmp, Path(run_dir) / FACTORS_FILE)
    return model, factors, report


def initial_factors(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """The saved (A₀, B₀) of a run that used PiSSA/MiLoRA/LoftQ, else None."""
    path = Path(run_dir) / FACTORS_FILE
    return load_file(path) if path.is_file() else None
