"""This CPU's matmul rate in bfloat16 against float32: why `--compute-dtype auto` picks what it picks.

    python -m tools.bench_dtype                 # sizes 256, 512, 1024 and the run's shapes; 5 rounds
    python -m tools.bench_dtype --sizes 2048 --rounds 3

Each round times every shape once in each dtype, alternating (bf16, fp32, then fp32, bf16 in the
next round), so a noisy minute hits both; the table gives each dtype's median GFLOP/s and the median
of the per-round ratios. Beside it: torch's CPU capability and whether oneDNN has bf16 kernels for
this processor (torch.ops.mkldnn._is_mkldnn_bf16_supported, qtune.precision's test). The shapes
named like `1024x576x1536` are SmolLM2-135M's at batch 4 × seq 256 (tokens × in × out). Writes
nothing; prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qtune.precision import cpu_bf16_speedup, cpu_has_bf16_kernels, resolve_compute_dtype

RUN_SHAPES = ((1024, 576, 576), (1024, 576, 1536), (1024, 1536, 576))


def time_mm(a: torch.Tensor, b: torch.Tensor, min_s: float = 0.2) -> float:
    """Seconds of one a @ b: the median of as many products as fit in ~min_s (at least 3), after one untimed."""
    a @ b
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024], help="square n×n×n products")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-run-shapes", action="store_true", help="skip SmolLM2's three linear shapes")
    args = ap.parse_args()
    shapes = [(n, n, n) for n in args.sizes] + ([] if args.no_run_shapes else list(RUN_SHAPES))
    g = torch.Generator().manual_seed(0)
    operands = {s: (torch.randn(s[0], s[1], generator=g), torch.randn(s[1], s[2], generator=g)) for s in shapes}
    rates = {(s, d): [] for s in shapes for d in ("bfloat16", "float32")}
    ratios = {s: [] for s in shapes}
    for r in range(args.rounds):
        order = ("bfloat16", "float32") if r % 2 == 0 else ("float32", "bfloat16")
        for s in shapes:
            got = {}
            for d in order:
                a, b = (t.to(getattr(torch, d)) for t in operands[s])
                got[d] = 2 * s[0] * s[1] * s[2] / time_mm(a, b) / 1e9
                rates[(s, d)].append(got[d])
            ratios[s].append(got["bfloat16"] / got["float32"])
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 kernels: {cpu_has_bf16_kernels()} (qtune's measured bf16/fp32 GEMM rate: {cpu_bf16_speedup():.2f}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; --compute-dtype auto picks "
          f"{resolve_compute_dtype('auto', 'cpu')} here\n")
    print("| m×k×n | bf16 GFLOP/s | fp32 GFLOP/s | bf16 / fp32 (median of rounds) |")
    print("|---|---|---|---|")
    for s in shapes:
        print(f"| {s[0]}x{s[1]}x{s[2]} | {statistics.median(rates[(s, 'bfloat16')]):.1f} | "
              f"{statistics.median(rates[(s, 'float32')]):.1f} | {statistics.median(ratios[s]):.3f} |")


if __name__ == "__main__":
    main()
