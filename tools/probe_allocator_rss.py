"""How much of a CPU run's peak RSS is freed memory that glibc keeps for reuse.

    python tools/probe_allocator_rss.py                          # qlora, float32, 2 warm-up + 6 steps
    python tools/probe_allocator_rss.py --compute-dtype bfloat16 --method qdora

qtune's CPU runs keep freed blocks for reuse (qtune.memory.keep_freed_memory_for_reuse: no page
faults on the next step's tensors), unless RSS is bounded (--max-memory, --offload disk), where they
are given back promptly (release_freed_memory_promptly). This runs bench_peft.py's qtune worker (its
setting and data) once under each policy, each in its own process, and prints each run's setup and
training peak RSS (VmHWM), the tensors' peak (qtune.memory.MemoryMeter), the median step time and the
peak after each step. The difference between the policies' peaks is the retained free memory; the
step times are single runs, not a speed comparison (tools/bench_methods.py --against-tree is).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peft as bp  # noqa: E402

POLICIES = ("reuse", "release")


def worker(args) -> None:
    bp.quiet_bitsandbytes()
    import qtune.memory as qm
    from safetensors.torch import load_file

    real = qm.configure_host_allocator
    qm.configure_host_allocator = lambda device, rss_bounded: real(device, args.worker == "release")
    peaks = []
    loop = bp._train_loop

    def traced_loop(step_fn, data, warmup, steps):
        def step(*a):
            loss = step_fn(*a)
            peaks.append(qm.peak_rss_bytes())
            return loss
        return loop(step, data, warmup, steps)

    bp._train_loop = traced_loop
    work = Path(args.work)
    out = bp.worker_qtune(args.method, load_file(work / "data.safetensors"), work, args.warmup, args.steps,
                          args.compute_dtype)
    Path(args.result).write_text(json.dumps({**out, "peaks_after_step": peaks}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="qlora", choices=("qlora", "qdora", "qpissa", "qrosa"))
    ap.add_argument("--compute-dtype", default="float32", choices=("bfloat16", "float32"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--plays", type=int, default=4)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--worker", choices=POLICIES, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from qtune.embedded import default_model_dir

    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    gib = 2 ** 30
    with tempfile.TemporaryDirectory(prefix="probe-rss-") as tmp:
        work = Path(tmp)
        bp.prepare_data(work, model_dir, args.plays, 16, args.warmup + args.steps)
        print(f"{args.method}, {args.compute_dtype}, {args.warmup} warm-up + {args.steps} steps (bench_peft.py's setting)")
        for policy in POLICIES:
            result = work / f"{policy}.json"
            subprocess.run([sys.executable, __file__, "--worker", policy, "--work", str(work), "--result", str(result),
                            "--method", args.method, "--compute-dtype", args.compute_dtype, "--steps", str(args.steps),
                            "--warmup", str(args.warmup)], check=True, stdout=subprocess.DEVNULL)
            r = json.loads(result.read_text())
            print(f"  {policy:8s} setup {r['setup_peak_rss_bytes'] / gib:.3f} GiB, training {r['train_peak_rss_bytes'] / gib:.3f}"
                  f" GiB (tensors' peak {r['peak_heap_bytes'] / gib:.3f}), {statistics.median(r['step_times_s']):.2f} s/step;"
                  f" peak after each step: {', '.join(f'{p / gib:.3f}' for p in r['peaks_after_step'])}")


if __name__ == "__main__":
    main()
