"""Which compute dtype a run uses: `--compute-dtype auto` (the default) picks the fastest safe one for
the device it trains on.

- CUDA: bfloat16 where the GPU has it (Ampere and later, torch.cuda.is_bf16_supported), else float16.
- CPU: bfloat16 where oneDNN has bf16 matrix kernels for this processor (x86 with AVX-512, or Arm with
  BF16; torch.ops.mkldnn._is_mkldnn_bf16_supported, what torch's own compiler asks) AND they outrun its
  float32 ones (cpu_bf16_speedup: measured once per machine), else float32. On an AVX2-only x86 CPU a bf16
  GEMM has no such kernel and runs tens of times slower than float32 (docs/benchmarks.md). Having the kernels
  is not enough: with AMX they ran ~7x float32's rate, but on a Xeon with avx512_bf16 and no AMX 0.54-0.60x
  (tools/bench_dtype.py), and float32 trained faster there (docs/benchmarks.md, 2026-12-06).

An explicit bfloat16 on such a CPU is honoured with one warning that names the cost and the fix.
Only the dtype of activations and dequantized weights changes: the NF4 storage, the adapters (fp32)
and the optimizer are the same, and float32 compute is the reference the bf16 path is tested against.
"""

from __future__ import annotations

import warnings

import torch


BF16_MIN_SPEEDUP = 1.0  # auto trains a CPU run in bf16 only where its bf16 GEMMs are at least this fast, float32's = 1
SPEEDUP_SHAPE = (1024, 1024, 1024)  # m, k, n of the measured product: a training micro-batch's size


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 matrix kernels for this CPU (without them a bf16 GEMM runs tens of times slower)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: its bf16 GEMM is the slow one
        return False


def _measure_bf16_speedup(rounds: int = 5) -> float:
    """bf16 matmul rate over float32's at SPEEDUP_SHAPE: the median of `rounds` alternating pairs (after one
    untimed product of each), so that a noisy moment hits both dtypes."""
    import statistics
    import time

    m, k, n = SPEEDUP_SHAPE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    for x, y in pairs.values():
        x @ y
    ratios = []
    for r in range(rounds):
        times = {}
        for dtype in (list(pairs) if r % 2 == 0 else list(pairs)[::-1]):
            x, y = pairs[dtype]
            t0 = time.perf_counter()
            x @ y
            times[dtype] = time.perf_counter() - t0
        ratios.append(times[torch.float32] / times[torch.bfloat16])
    return statistics.median(ratios)


def _machine_key() -> str:
    import hashlib
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(sorted({line for line in f if line.startswith(("flags", "model name"))}))
    except OSError:
        cpu = platform.processor() + platform.machine()
    text = "|".join([torch.__version__, str(torch.get_num_threads()), torch.backends.cpu.get_cpu_capability(), cpu])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_speedup: float | None = None


def cpu_bf16_speedup() -> float:
    """This CPU's bf16 GEMM rate over its float32 rate (_measure_bf16_speedup), measured once per machine (CPU,
    torch version, threads) and kept in $QTUNE_CACHE/cpu_bf16_speedup.json; 0 where oneDNN has no bf16 kernels
    (nothing is measured there: a bf16 product would take seconds)."""
    global _speedup
    if _speedup is not None:
        return _speedup
    if not cpu_has_bf16_kernels():
        return 0.0
    from qtune.embedded import machine_record

    _speedup = float(machine_record("cpu_bf16_speedup.json", _machine_key(), lambda: round(_measure_bf16_speedup(), 3)))
    return _speedup


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU trains faster in bf16 than in float32: oneDNN has bf16 kernels for it and they measured
    at least BF16_MIN_SPEEDUP times float32's rate (cpu_bf16_speedup)."""
    return cpu_has_bf16_kernels() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def resolve_compute_dtype(name: str, device: str, warn: bool = True) -> str:
    """`name` with "auto" replaced by the device's choice (module docstring); an explicit bfloat16 on
    a CPU without bf16 kernels warns (once per call site) and stays bfloat16."""
    device = torch.device(device).type
    if name == "auto":
        if device == "cuda":  # planned from a machine without the GPU (qtune plan --device cuda): a current one
            return "bfloat16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if device != "cpu" or cpu_has_fast_bf16() else "float32"
    if warn and name == "bfloat16" and device == "cpu" and not cpu_has_fast_bf16():
        if not cpu_has_bf16_kernels():
            why = ("on a CPU without bf16 matrix instructions (no AVX-512 or Arm BF16: torch reports "
                   f"{torch.backends.cpu.get_cpu_capability()}): its bf16 GEMMs run tens of times slower than float32 here")
        else:
            why = (f"on this CPU: its bf16 GEMMs measured {cpu_bf16_speedup():.2f}x float32's rate "
                   "(qtune.precision.cpu_bf16_speedup; seen on AVX-512 BF16 CPUs without AMX), so bf16 trains slower here")
        warnings.warn(f"--compute-dtype bfloat16 {why}. Fix: --compute-dtype auto (picks float32 on this CPU) or "
                      "float32.", stacklevel=2)
    return name
