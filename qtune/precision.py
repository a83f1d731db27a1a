"""Which compute dtype a run uses: `--compute-dtype auto` (the default) picks the fastest safe one for
the device it trains on.

- CUDA: bfloat16 where the GPU has it (Ampere and later, torch.cuda.is_bf16_supported), else float16.
- CPU: bfloat16 where oneDNN has bf16 matrix kernels for this processor (x86 with AVX-512 — its
  BF16 and AMX extensions make them fast — or Arm with BF16; torch.ops.mkldnn._is_mkldnn_bf16_supported,
  what torch's own compiler asks), else float32. On an AVX2-only x86 CPU a bf16 GEMM has no such
  kernel and runs tens of times slower than float32, not merely slower (docs/benchmarks.md).

An explicit bfloat16 on such a CPU is honoured with one warning that names the cost and the fix.
Only the dtype of activations and dequantized weights changes: the NF4 storage, the adapters (fp32)
and the optimizer are the same, and float32 compute is the reference the bf16 path is tested against.
"""

from __future__ import annotations

import warnings

import torch


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products at native speed (oneDNN's bf16 kernels apply)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: its bf16 GEMM is the slow one
        return False


def resolve_compute_dtype(name: str, device: str, warn: bool = True) -> str:
    """`name` with "auto" replaced by the device's choice (module docstring); an explicit bfloat16 on
    a CPU without bf16 kernels warns (once per call site) and stays bfloat16."""
    device = torch.device(device).type
    if name == "auto":
        if device == "cuda":  # planned from a machine without the GPU (qtune plan --device cuda): a current one
            return "bfloat16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if device != "cpu" or cpu_has_fast_bf16() else "float32"
    if warn and name == "bfloat16" and device == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("--compute-dtype bfloat16 on a CPU without bf16 matrix instructions (no AVX-512 or Arm BF16: "
                      f"torch reports {torch.backends.cpu.get_cpu_capability()}): its bf16 GEMMs run tens of times "
                      "slower than float32 here. Fix: --compute-dtype auto (picks float32 on this CPU) or float32.",
                      stacklevel=2)
    return name
