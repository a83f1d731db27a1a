"""Where one qtune training step's time goes: torch.profiler over the benchmark's setting.

    python -m tools.profile_step                      # qlora, 2 warm-up + 3 profiled steps
    python -m tools.profile_step --method qdora --out tools/results/profile_qdora.md
    python -m tools.profile_step --kernels --top 45   # each compiled kernel (norms, softmax, ...) as its own row
    python -m tools.profile_step --time-only --steps 10   # no profiler: median step, the memory meter's cost
    python -m tools.profile_step --perf --steps 8 --compute-dtype float32 --recompute weights
                                                      # Linux perf sampling instead: where the step's threads spend
                                                      # their time, at the step's own speed

Same setting as tools/bench_peft.py (SmolLM2-135M, Shakespeare rows, seq 256 × batch 4, r 16 on all
linears, checkpointing, bf16 (or --compute-dtype float32), AdamW). The step is the benchmark's qtune step
(tools/harness.py QtuneRun: qtune.train.train_step). Self CPU time of every aten/custom op is summed over
the profiled steps and grouped:
    gemm          aten::mm / addmm / bmm / matmul's kernels (the bf16 GEMMs: base, adapters, head)
    attention     scaled_dot_product_attention and its flash/math kernels
    dequantize    bitsandbytes' dequantize ops (NF4 codes -> bf16 weights)
    elementwise   everything else (norms, RoPE, SiLU, casts, copies, adds, optimizer math, ...)
and, beside them, the wall time the profiler saw and the GEMM rate this machine reaches on one large
product, so `gemm` time × rate gives how far from the limit the GEMMs themselves run. The GEMMs are
then split by their input shapes (`gemm_kind`): the frozen base's products (forward, recomputation,
input gradient), the rank-r adapter products, the head's chunks and the attention's batched products,
each with its FLOPs, its time and the rate it ran at, beside the time the 2048³ rate would take:
what is left between the step's GEMMs and the limit, product by product.

torch.profiler slows the step itself (float32, --recompute weights: 3.5-4.1 s a step under it against
2.2-2.5 s without), most of all around the compiled kernels, so its per-op times misplace the time that
is not in GEMMs. --perf samples the process with Linux perf instead (perf record -F 499 on this process,
user-space only, started after the warm-up): the step runs at its own speed, and each sample is
attributed to the native function it hit, grouped by perf_group (GEMM kernels and their packing,
inductor's compiled kernels, vector math, the OpenMP runtime, Python, the rest of torch, libc, the
kernel). Thread-seconds per step = samples / frequency / steps; what the threads did not spend running
(waiting, sleeping) is threads × wall − the sampled total.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from qtune.engine.loss import CE_VOCAB_BLOCK
from qtune.engine.recompute import CHOICES as RECOMPUTE_CHOICES
from qtune.memory import MemoryMeter
from tools import harness as h

GROUPS = (("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int4pack_mm", "aten::baddbmm")),
          ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
          ("dequantize", ("bitsandbytes::", "dequantize")))


def gemm_operands(name: str, shapes: list) -> tuple[list, list] | None:
    """The two multiplied operands' shapes of a GEMM call, by position (mm(a, b[, out]),
    addmm(c, a, b, ...) and its in-place addmm_, bmm(a, b[, out])), or None if the call is no GEMM
    the profiler recorded."""
    pos = 1 if name in ("aten::addmm", "aten::addmm_", "aten::baddbmm") else 0
    if len(shapes) < pos + 2 or not all(isinstance(s, list) and len(s) >= 2 for s in shapes[pos:pos + 2]):
        return None
    return shapes[pos], shapes[pos + 1]


def mm_flops(name: str, shapes: list) -> float:
    """FLOPs of one GEMM call from the profiler's recorded input shapes (0 if they are not a GEMM's)."""
    ops = gemm_operands(name, shapes)
    if ops is None:
        return 0.0
    a, b = ops
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def gemm_kind(name: str, shapes: list, rank: int, vocab: int) -> str:
    """Which product of the step a GEMM call is, from its operands' shapes. The head's products
    span the vocabulary, or one block of it (compiled: qtune.engine.loss.CE_VOCAB_BLOCK rows; no base
    dimension of SmolLM2 is 4096). An adapter product has r columns or rows, or 2r / 3r where the
    linears that read one x share it (gate/up, q/k/v: qtune.engine.linear.group). At the benchmark's
    rank 16 no base dimension of SmolLM2 is that thin; its thinnest, k/v's 192, is 3·64, so at rank 64
    those would be counted as adapters."""
    dims = [d for sh in gemm_operands(name, shapes) for d in sh]
    if name in ("aten::bmm", "aten::baddbmm"):
        return "attention (batched)"
    if vocab in dims or min(vocab, CE_VOCAB_BLOCK) in dims:
        return "head (loss chunks)"
    if any(d in dims for d in (rank, 2 * rank, 3 * rank)):
        return f"adapters (rank {rank})"
    return "base linears"


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "elementwise"


class CountingMeter(MemoryMeter):
    """qtune's memory meter, counting the samples it takes (--time-only: what the meter costs a step)."""

    def __init__(self, device):
        super().__init__(device)
        self.samples = 0

    def sample(self) -> None:
        self.samples += self.active
        super().sample()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="qlora", choices=h.METHODS + h.SECOND_WAVE)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--plays", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the step's compute dtype (float32 on CPUs without bf16 kernels: tools/bench_dtype.py)")
    ap.add_argument("--recompute", default="default", choices=[c for c in RECOMPUTE_CHOICES if c != "auto"],
                    help="qtune's --recompute (what a checkpointed layer keeps from its forward)")
    ap.add_argument("--shapes", type=int, default=0, help="also list the N GEMM shapes losing the most time")
    ap.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    ap.add_argument("--time-only", action="store_true",
                    help="no profiler: print the median wall time of --steps steps (before/after figures) "
                         "and what the memory meter costs")
    ap.add_argument("--perf", action="store_true",
                    help="sample the steps with Linux perf (no torch.profiler): thread-seconds per step by group")
    ap.add_argument("--kernels", action="store_true",
                    help="list inductor's generated C++ kernels as ops of their own (their time leaves the "
                         "'Call CompiledFxGraph' rows, whose self time is then the compiled wrapper's)")
    h.add_isa_argument(ap)
    args = ap.parse_args()
    h.cap_isa(args.isa)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1, --warmup >= 0")
    h.quiet_bitsandbytes()
    if args.kernels:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # part of the compile cache's key: recompiles once
    import shutil
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    from qtune.embedded import smollm2_hf_dir

    work = Path(tempfile.mkdtemp(prefix="qtune-profile-"))
    try:
        model_dir = smollm2_hf_dir()
        h.prepare_data(work, model_dir, args.plays, 4, args.warmup + args.steps)
        data = h.load_data(work)
        # the benchmark's qtune run (tools/harness.py), its warm-up unprofiled, then the profiled steps
        run = h.QtuneRun(args.method, data, work, args.warmup + args.steps, args.compute_dtype,
                         meter_cls=CountingMeter, recompute=args.recompute)
        samples = []
        for s in range(args.warmup):
            run.meter.samples = 0
            run.step(h.batch_of(data, s))
            samples.append(run.meter.samples)
        if args.time_only:
            time_only(args, run, data, samples)
            return
        if args.perf:
            perf_profile(args, run, data, work, model_dir)
            return
        walls = []
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for s in range(args.warmup, args.warmup + args.steps):
                t0 = time.perf_counter()
                run.step(h.batch_of(data, s))
                walls.append(time.perf_counter() - t0)
        execution = run.execution()
        run.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    events = prof.key_averages()
    groups: dict[str, float] = defaultdict(float)
    rows = []
    for e in events:
        self_s = e.self_cpu_time_total / 1e6
        groups[group_of(e.key)] += self_s
        rows.append((self_s, e.key, e.count))
    rows.sort(reverse=True)
    n = args.steps
    wall = sum(walls) / n
    rate = h.gemm_rate(dtype=args.compute_dtype)
    cfg = json.loads((model_dir / "config.json").read_text())
    flops = h.policy_step_flops(cfg, execution.get("recompute"))  # what this policy's step runs
    layers = execution["layers"]
    lines = [f"# Profile of one qtune {args.method} step ({h.cpu_name()}{h.isa_note()}, {torch.get_num_threads()} threads)", "",
             f"Setting of tools/bench_peft.py (tools/harness.py), --recompute {args.recompute}; {args.warmup} warm-up + "
             f"{n} profiled steps; times per step."
             + (" With --kernels: inductor's C++ kernels are rows of their own (`graph_N_cpp_fused_...`)." if args.kernels else ""),
             f"Decoder layers: {layers['compiled']} compiled, {layers['eager']} eager"
             + (f" ({', '.join(f'{r}: {k}' for r, k in execution['reasons'].items())})" if execution["reasons"] else "")
             + " (qtune.engine's execution report).",
             f"Wall time per step under the profiler: {wall:.3f} s (profiler overhead included).",
             f"Step FLOPs (harness.step_flops): {flops['total'] / 1e9:.0f} GFLOP; {args.compute_dtype} GEMM rate "
             f"{rate['gflops']:.0f} GFLOP/s -> limit {flops['total'] / 1e9 / rate['gflops']:.3f} s/step.", "",
             "| group | s/step | share of wall |", "|---|---|---|"]
    for g in ("gemm", "attention", "dequantize", "elementwise"):
        lines.append(f"| {g} | {groups[g] / n:.3f} | {groups[g] / n / wall:.0%} |")
    lines.append(f"| (not in any op: Python, autograd engine, profiler) | {wall - sum(groups.values()) / n:.3f} | "
                 f"{1 - sum(groups.values()) / n / wall:.0%} |")
    lines += ["", f"GEMM time at the 2048³ rate would be {(flops['step']['linears'] + flops['step']['adapters'] + flops['step']['head']) / 1e9 / rate['gflops']:.3f} s/step "
              f"(linears + adapters + head FLOPs); measured {groups['gemm'] / n:.3f}.", "",
              f"Top {args.top} ops by self CPU time:", "", "| op | calls/step | self s/step | group |", "|---|---|---|---|"]
    for self_s, key, count in rows[:args.top]:
        lines.append(f"| `{key}` | {count / n:.0f} | {self_s / n:.4f} | {group_of(key)} |")
    lines += gemm_table(prof, n, cfg["vocab_size"], rate["gflops"], args.shapes)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


PERF_GROUPS = (  # (group, test on (dso, symbol)), the first that matches
    ("GEMM kernels and their packing (MKL, oneDNN)",
     lambda dso, sym: any(k in sym for k in ("mkl_blas", "sgemm", "dgemm", "gemm_", "brgemm", "dnnl", "omp_parallel_acopy"))),
    ("inductor's compiled kernels", lambda dso, sym: dso.endswith(".so") and ("main.so" in dso or "torchinductor" in dso)),
    ("vector math called by kernels (Sleef exp, tanh, ...)", lambda dso, sym: sym.startswith("Sleef_")),
    ("OpenMP runtime (barriers, spin-waits)", lambda dso, sym: "libgomp" in dso or "libiomp" in dso or "libomp" in dso),
    ("Python interpreter", lambda dso, sym: "libpython" in dso or dso.startswith("python")),
    ("ATen kernels, dispatch and autograd (C++)",
     lambda dso, sym: any(k in dso for k in ("libtorch", "libc10", "libbitsandbytes"))),
    ("libc (malloc, memcpy, ...)", lambda dso, sym: dso.startswith("libc.so") or dso.startswith("libm.so")),
    ("OS kernel (page faults, syscalls)", lambda dso, sym: "kernel" in dso),
)


def perf_group(dso: str, sym: str) -> str:
    """The PERF_GROUPS group of a sample's shared object and symbol ('other' if none matches)."""
    for group, test in PERF_GROUPS:
        if test(dso, sym):
            return group
    return "other"


def parse_perf_report(text: str) -> list[tuple[float, str, str]]:
    """(percent, dso, symbol) rows of `perf report --stdio --no-children --sort dso,sym -g none`."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith("%") and parts[2].startswith("[") and parts[2].endswith("]"):
            try:
                rows.append((float(parts[0][:-1]), parts[1], " ".join(parts[3:])))
            except ValueError:
                continue
    return rows


def perf_profile(args, run, data: dict, work: Path, model_dir: Path, freq: int = 499) -> None:
    """--perf: the timed steps under `perf record -F freq -p <this process>` (started after the warm-up),
    then the samples by perf_group in thread-seconds per step, beside the wall time per step."""
    import os
    import shutil
    import signal
    import subprocess

    import torch

    if shutil.which("perf") is None:
        raise SystemExit("--perf needs Linux perf on PATH (Debian: apt install linux-perf)")
    out = work / "perf.data"
    recorder = subprocess.Popen(["perf", "record", "-F", str(freq), "-p", str(os.getpid()), "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # perf attaches
    if recorder.poll() is not None:
        raise SystemExit(f"perf record could not attach ({recorder.stderr.read().strip()[:300]}); "
                         "/proc/sys/kernel/perf_event_paranoid must be 2 or lower")
    walls = []
    for s in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        run.step(h.batch_of(data, s))
        walls.append(time.perf_counter() - t0)
    recorder.send_signal(signal.SIGINT)
    recorder.wait(timeout=120)
    execution = run.execution()
    run.close()
    stats = subprocess.run(["perf", "report", "-i", str(out), "--stats"], capture_output=True, text=True).stdout
    report = subprocess.run(["perf", "report", "-i", str(out), "--stdio", "--no-children", "--sort", "dso,sym",
                             "-g", "none", "--percent-limit", "0"], capture_output=True, text=True).stdout
    rows = parse_perf_report(report)
    samples = next((int(line.split(":")[1].split()[0]) for line in stats.splitlines() if "SAMPLE events:" in line), None)
    n, threads = args.steps, torch.get_num_threads()
    wall = sum(walls) / n  # the sampled span also covers perf's attach second and the steps' gaps: shares only
    sampled = samples / freq / n if samples else None
    groups: dict[str, float] = defaultdict(float)
    for pct, dso, sym in rows:
        groups[perf_group(dso, sym)] += pct
    rate = h.gemm_rate(dtype=args.compute_dtype)["gflops"]
    flops = h.policy_step_flops(json.loads((model_dir / "config.json").read_text()), execution["recompute"])["total"]
    gemm_s = groups[PERF_GROUPS[0][0]] / 100 * (sampled or threads * wall) / threads
    gemm_line = (f"GEMM FLOPs of this policy's step (harness.step_flops): {flops / 1e9:.0f} GFLOP; over the GEMM "
                 f"group's thread-s / {threads} threads ({gemm_s:.3f} s): {flops / 1e9 / gemm_s:.0f} GFLOP/s in the "
                 f"step, against {rate:.0f} GFLOP/s for one 2048³ product now ({flops / 1e9 / rate:.3f} s).")
    lines = [f"# Linux perf profile of qtune {args.method} steps ({h.cpu_name()}{h.isa_note()}, {threads} threads)", "",
             f"Setting of tools/bench_peft.py, --compute-dtype {args.compute_dtype}, --recompute {args.recompute} "
             f"(ran: {execution['recompute']['level']}); {args.warmup} warm-up + {n} sampled steps at {freq} Hz; "
             f"decoder layers {execution['layers']['compiled']} compiled, {execution['layers']['eager']} eager.",
             f"Wall time per step: {wall:.3f} s (median {sorted(walls)[n // 2]:.3f}) -> {threads} threads x wall = "
             f"{threads * wall:.3f} thread-s per step" + (f"; sampled running: {sampled:.3f} thread-s per step "
                                                          f"(while perf ran, a little more than the steps)" if sampled else "")
             + ".", gemm_line, "",
             "| where the threads ran | share of samples | thread-s per step (share x the sampled thread-s) |", "|---|---|---|"]
    for g, pct in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {g} | {pct:.1f}% | {pct / 100 * (sampled or threads * wall):.3f} |")
    lines += ["", "Top symbols:", "", "| share | object | symbol |", "|---|---|---|"]
    for pct, dso, sym in rows[:args.top]:
        lines.append(f"| {pct:.2f}% | {dso} | `{sym[:90]}` |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def time_only(args, run, data: dict, samples: list[int]) -> None:
    """--time-only: the median wall time of the steps after the warm-up, and the memory meter's cost
    (samples per step × the cost of one sample, in this process's heap state)."""
    import torch

    walls = []
    for s in range(args.warmup, args.warmup + args.steps):
        run.meter.samples = 0
        t0 = time.perf_counter()
        run.step(h.batch_of(data, s))
        walls.append(time.perf_counter() - t0)
        samples.append(run.meter.samples)
    run.close()
    walls.sort()
    median = walls[len(walls) // 2]
    print(f"{args.method}: median {median:.3f} s/step over {args.steps} steps "
          f"(min {walls[0]:.3f}, max {walls[-1]:.3f})")
    meter = MemoryMeter(torch.device("cpu"))
    t0 = time.perf_counter()
    for _ in range(2000):
        meter.sample()
    per_sample = (time.perf_counter() - t0) / 2000
    full = max(samples)
    n = 1000
    sampled = 0
    for k in range(1, n + 1):  # the meter's own schedule
        meter.begin_step(k)
        sampled += meter.active
    print(f"memory meter: samples per step {samples} (steps 1..{len(samples)}); one sample {per_sample * 1e6:.1f} us; "
          f"a sampled step pays {full * per_sample * 1e3:.1f} ms = {full * per_sample / median:.2%} of the step; "
          f"over {n} steps ({sampled} sampled) {sampled * full * per_sample / (n * median):.2%}")


def gemm_table(prof, n: int, vocab: int, big_rate: float, top_shapes: int = 0) -> list[str]:
    """The step's GEMMs grouped by kind (gemm_kind): calls, GFLOP, seconds and rate per step, and the
    time the same calls would take at the 2048³ rate; then the `top_shapes` operand shapes that lose
    the most time against that rate."""
    kinds: dict[str, dict] = defaultdict(lambda: {"calls": 0, "flops": 0.0, "s": 0.0})
    by_shape = []
    for e in prof.key_averages(group_by_input_shape=True):
        if group_of(e.key) != "gemm":
            continue
        shapes = [list(sh) for sh in e.input_shapes]
        flops = mm_flops(e.key, shapes)
        if not flops:
            continue
        kind = gemm_kind(e.key, shapes, h.RANK, vocab)
        k = kinds[kind]
        by_shape.append((e.self_cpu_time_total / 1e6 / n - flops * e.count / n / 1e9 / big_rate, e.key,
                         shapes, kind, e.count / n, e.self_cpu_time_total / 1e6 / n, flops * e.count / n))
        k["calls"] += e.count / n
        k["flops"] += flops * e.count / n
        k["s"] += e.self_cpu_time_total / 1e6 / n
    lines = ["", "GEMMs by kind (from the recorded input shapes), per step:", "",
             "| kind | calls | GFLOP | s | GFLOP/s in the step | s at the 2048³ rate |", "|---|---|---|---|---|---|"]
    total = {"calls": 0.0, "flops": 0.0, "s": 0.0}
    for kind, k in sorted(kinds.items(), key=lambda kv: -kv[1]["s"]):
        lines.append(f"| {kind} | {k['calls']:.0f} | {k['flops'] / 1e9:.0f} | {k['s']:.3f} | "
                     f"{k['flops'] / 1e9 / max(k['s'], 1e-9):.0f} | {k['flops'] / 1e9 / big_rate:.3f} |")
        for key in total:
            total[key] += k[key]
    lines.append(f"| all | {total['calls']:.0f} | {total['flops'] / 1e9:.0f} | {total['s']:.3f} | "
                 f"{total['flops'] / 1e9 / max(total['s'], 1e-9):.0f} | {total['flops'] / 1e9 / big_rate:.3f} |")
    if top_shapes:
        lines += ["", f"The {top_shapes} GEMM shapes that lose the most time against the 2048³ rate, per step:", "",
                  "| op | operand shapes | kind | calls | s | GFLOP/s | s lost |", "|---|---|---|---|---|---|---|"]
        for lost, key, shapes, kind, calls, secs, fl in sorted(by_shape, key=lambda r: -r[0])[:top_shapes]:
            lines.append(f"| `{key}` | {' '.join('x'.join(map(str, sh)) for sh in shapes if sh)} | {kind} | {calls:.0f} | "
                         f"{secs:.4f} | {fl / 1e9 / max(secs, 1e-9):.0f} | {lost:.4f} |")
    return lines


if __name__ == "__main__":
    main()
