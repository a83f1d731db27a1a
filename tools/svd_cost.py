"""What LoRA-Dash's switch costs: a full fp32 SVD (torch.linalg.svd, full_matrices=False) of 7B-sized weights.

    python -m tools.svd_cost                         # 4096×4096 and 11008×4096, on 1 and on all threads
    python -m tools.svd_cost --shapes 576x576 --threads 2

At the switch (qtune.adapters.loradash) every adapted matrix gets one full SVD, one at a time: a 7B Llama
layer has four 4096×4096 (q, k, v, o) and three 11008×4096 (gate, up, down; down transposed) matrices.
Prints one line per measurement and the 7B estimate (32 such layers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import torch


def svd_seconds(out: int, inp: int, threads: int) -> float:
    torch.set_num_threads(threads)
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(0)) / inp ** 0.5
    t = time.perf_counter()
    torch.linalg.svd(w, full_matrices=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    args = ap.parse_args()
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(f"CPU: {'avx512_bf16' if 'avx512_bf16' in flags else 'no avx512_bf16'}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    times = {}
    for threads in (int(t) for t in args.threads.split(",")):
        for shape in args.shapes.split(","):
            out, inp = (int(x) for x in shape.split("x"))
            load = os.getloadavg()[0]
            times[(shape, threads)] = s = svd_seconds(out, inp, threads)
            print(f"{shape} threads={threads}: {s:.1f} s (load average before {load:.2f})", flush=True)
        if {"4096x4096", "11008x4096"} <= set(args.shapes.split(",")):
            layer = 4 * times[("4096x4096", threads)] + 3 * times[("11008x4096", threads)]
            print(f"threads={threads}: one 7B layer {layer:.0f} s, 32 layers {32 * layer / 3600:.1f} h")


if __name__ == "__main__":
    main()
