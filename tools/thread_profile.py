"""How a training step's wall time splits between this machine's cores: `perf record` of exactly K
steps of one benchmark worker, every thread, grouped by what the code is.

    python tools/thread_profile.py                      # qlora, 3 warm-up + 8 profiled steps
    python tools/thread_profile.py --method qdora --steps 10

torch.profiler (tools/profile_step.py) times ops on the calling thread; it cannot say how long the
other core sat idle while that thread ran serial work (Python, autograd, dispatch, single-threaded
kernels). Here `perf` samples every thread of the worker at a fixed rate while it runs the profiled
steps (the lockstep gate of tools/bench_peft.py starts each step, so the samples cover exactly those
steps and not loading or scoring), and each sample is put in a group by the code it hit:

    GEMM            oneDNN's JIT kernels (perf-PID.map / anonymous code) and oneDNN's own C++ code
    compiled        inductor's kernels (torch.compile'd norms, softmax, rotary, SiLU·up, loss chunks)
    dequantize      bitsandbytes' CPU kernels (single-threaded)
    OpenMP wait     libgomp: a thread spinning or sleeping for work or at a barrier
    torch           libtorch / c10 outside oneDNN: dispatch, autograd, eager ATen kernels
    Python          the interpreter and torch's Python bindings
    libc / kernel   malloc/free, memcpy, page faults, syscalls

The OpenMP worker thread's "OpenMP wait" share is the part of the step during which only the main
thread worked: the serial fraction that no faster GEMM or kernel removes. Needs Linux `perf` with
permission to attach (kernel.perf_event_paranoid <= 2 for the own user's processes); writes
tools/results/thread_profile_{method}.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_peft as bp  # noqa: E402  (the setting, the data and the worker process)

GROUPS = ("GEMM", "compiled", "dequantize", "OpenMP wait", "torch", "Python", "libc / kernel", "other")


def group_of(dso: str, sym: str) -> str:
    """The group of one sample from its shared object and symbol (see the module docstring)."""
    if "perf-" in dso and ".map" in dso or "[JIT]" in dso or "//anon" in dso:
        return "GEMM"
    if "dnnl" in sym or "brgemm" in sym:
        return "GEMM"
    if dso.endswith(".main.so") or "/torchinductor" in dso:
        return "compiled"
    if "bitsandbytes" in dso:
        return "dequantize"
    if "libgomp" in dso or "libomp" in dso:
        return "OpenMP wait"
    if "libtorch_python" in dso or "libpython" in dso:
        return "Python"
    if "libtorch" in dso or "libc10" in dso:
        return "torch"
    if "libc.so" in dso or "libm.so" in dso or "libstdc++" in dso or "kernel" in dso or "vdso" in dso:
        return "libc / kernel"
    return "other"


def parse_perf_script(text: str) -> dict[int, Counter]:
    """{tid: Counter(group -> samples)} from `perf script -F tid,ip,sym,dso -G` output."""
    per_tid: dict[int, Counter] = defaultdict(Counter)
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        tid = int(parts[0])
        rest = parts[2] if len(parts) > 2 else ""
        dso = rest[rest.rfind("(") + 1:rest.rfind(")")] if "(" in rest else ""
        sym = rest[:rest.rfind("(")].strip() if "(" in rest else rest
        per_tid[tid][group_of(dso, sym)] += 1
    return per_tid


def check_perf() -> str:
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("thread_profile needs Linux `perf` (Debian: apt-get install linux-perf)")
    try:
        level = int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
    except (OSError, ValueError):
        level = None
    if level is not None and level > 2 and os.geteuid() != 0:
        raise SystemExit(f"perf cannot attach here (kernel.perf_event_paranoid = {level}); "
                         "run `sysctl kernel.perf_event_paranoid=2` as root, or run this as root")
    return perf


def profile(args, work: Path, perf: str) -> tuple[dict[int, Counter], int, list[float]]:
    """Run one worker, step it through the warm-up untraced, then record exactly --steps steps."""
    proc, ack, _, log = bp.start_gated_worker(args, work, "qtune", args.method, f"profile-{args.method}")
    data = work / "perf.data"
    rec = None
    try:
        def step() -> float:
            t0 = time.perf_counter()
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            if ack.read(1) != b"d":
                raise SystemExit(f"the worker stopped (exit {proc.wait()}); log {log}:\n{log.read_text()[-2000:]}")
            return time.perf_counter() - t0

        if ack.read(1) != b"r":
            raise SystemExit(f"the worker stopped while loading (exit {proc.wait()}); log {log}:\n{log.read_text()[-2000:]}")
        for _ in range(args.warmup):
            step()
        rec = subprocess.Popen([perf, "record", "-F", str(args.freq), "-p", str(proc.pid), "-o", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # perf attaches to every thread before the first profiled step
        walls = [step() for _ in range(args.steps)]
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=120)
        if rec.returncode not in (0, -signal.SIGINT) or not data.is_file():
            raise SystemExit(f"perf record failed (exit {rec.returncode}): {err.decode()[-1000:]}")
        proc.stdin.close()
        proc.wait(timeout=600)
    finally:
        if rec is not None and rec.poll() is None:
            rec.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ack.close()
    text = subprocess.run([perf, "script", "-i", str(data), "-F", "tid,ip,sym,dso", "-G"],
                          capture_output=True, text=True, check=True).stdout
    return parse_perf_script(text), proc.pid, walls


def report(method: str, per_tid: dict[int, Counter], main_tid: int, walls: list[float], freq: int) -> str:
    threads = sorted(per_tid, key=lambda t: (t != main_tid, -sum(per_tid[t].values())))
    busy = [t for t in threads if sum(per_tid[t].values()) >= 0.05 * sum(per_tid[main_tid].values())]
    wall = sum(walls)
    lines = [f"# Where a qtune {method} step's wall time goes, per thread ({bp._cpu_name()}, {os.cpu_count()} CPUs)", "",
             f"Setting of tools/bench_peft.py; `perf record -F {freq}` of {len(walls)} steps (median "
             f"{sorted(walls)[len(walls) // 2]:.3f} s, {wall:.1f} s in all) of one worker, every thread; share of "
             "each thread's samples by the code they hit (groups in tools/thread_profile.py). Threads with "
             "fewer than 5% of the main thread's samples (compile workers, idle pools) are left out.", "",
             "| thread | samples | " + " | ".join(GROUPS) + " |", "|---|---|" + "---|" * len(GROUPS)]
    for t in busy:
        c = per_tid[t]
        n = sum(c.values())
        name = "main" if t == main_tid else f"worker {t}"
        lines.append(f"| {name} | {n} | " + " | ".join(f"{100 * c[g] / n:.1f}%" for g in GROUPS) + " |")
    workers = [t for t in busy if t != main_tid]
    if workers:
        w = per_tid[workers[0]]
        idle = w["OpenMP wait"] / sum(w.values())
        m = per_tid[main_tid]
        mn = sum(m.values())
        serial = {g: m[g] / mn for g in ("Python", "torch", "dequantize", "libc / kernel")}
        lines += ["", f"The OpenMP worker waited for work {100 * idle:.0f}% of the profiled time: for that share of "
                  f"the step (≈ {idle * sorted(walls)[len(walls) // 2]:.2f} s of the median step) only the main "
                  "thread ran, in Python, autograd and dispatch, single-threaded kernels (bitsandbytes' "
                  "dequantization) and malloc. On the main thread those groups hold: "
                  + ", ".join(f"{g} {100 * v:.0f}%" for g, v in serial.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="qlora", choices=bp.METHODS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--freq", type=int, default=499, help="samples per second and thread")
    ap.add_argument("--plays", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    perf = check_perf()
    from qtune.embedded import default_model_dir

    args.model_dir = default_model_dir()
    work = Path(tempfile.mkdtemp(prefix="thread-profile-"))
    try:
        bp.prepare_data(work, args.model_dir, args.plays, 1, args.warmup + args.steps)
        bp.run_worker(args, work, "prep", "qtune-cache", "prep-qtune-cache")
        per_tid, pid, walls = profile(args, work, perf)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(args.method, per_tid, pid, walls, args.freq)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"thread_profile_{args.method}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
