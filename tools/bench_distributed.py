"""Multi-process training against one process on the same machine: `qtune train` on the default run (SmolLM2 and
the shipped dataset), one process with all the cores against N processes with cores/N threads each, the same
global batch, in alternating rounds. Reports each one's median tokens/s (global), peak RSS per rank and the
quantized base bytes per rank (fsdp holds 1/N), and writes tools/results/bench_distributed.{md,json}.

    python -m tools.bench_distributed [--rounds 2] [--steps 12] [--nproc 2] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_class() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return "avx512_bf16" if "avx512_bf16" in flags else "avx2 only (no bf16 kernels)"


def run(kind: str, args, out: Path) -> dict:
    cores = len(os.sched_getaffinity(0))
    base = [sys.executable, "-m", "qtune", "train", "--max-steps", str(args.steps), "--eval-every", "0",
            "--eval-batches", "1", "--save-every", "0", "--output", str(out), "--overwrite"]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if kind == "one":
        env["OMP_NUM_THREADS"] = str(cores)
        cmd = base + ["--batch-size", str(args.batch_size)]
    else:
        env.pop("OMP_NUM_THREADS", None)
        cmd = base + ["--batch-size", str(args.batch_size // args.nproc), "--nproc-per-node", str(args.nproc),
                      "--distributed", kind]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "loss" in x][1:]  # the first step compiles
    start = next(x for x in rows if x.get("event") == "start")
    execution = next((x for x in rows if x.get("event") == "execution"), {})
    return {"kind": kind, "tokens_per_s": statistics.median(x["tokens_per_s"] for x in steps),
            "step_s": statistics.median(x["step_time_s"] for x in steps),
            "peak_rss_per_rank_bytes": max(x["peak_rss_bytes"] for x in steps),
            "base_bytes_per_rank": start["quantized_base_bytes_per_rank"], "threads_per_rank": start["threads_per_rank"],
            "world_size": start["world_size"], "layers": execution.get("layers"),
            "losses": [x["loss"] for x in rows if "loss" in x]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="The global batch (each of N processes takes 1/N).")
    ap.add_argument("--kinds", default="one,ddp,fsdp")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for k in (kinds if r % 2 == 0 else kinds[::-1]):  # alternating order
                results[k].append(run(k, args, Path(tmp) / k))
                print(f"round {r + 1} {k}: {results[k][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    import torch
    import transformers

    summary = {"cpu": cpu_class(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
               "transformers": transformers.__version__, "steps": args.steps, "global_batch": args.batch_size,
               "nproc": args.nproc, "runs": results}
    one = statistics.median(x["tokens_per_s"] for x in results["one"]) if "one" in results else None
    lines = [f"# bench_distributed: {args.nproc} processes against one (`qtune train`, default run, global batch "
             f"{args.batch_size}, {args.steps} steps, {args.rounds} alternating rounds)", "",
             f"CPU: {summary['cpu']}, {summary['cores']} cores; torch {torch.__version__}, transformers "
             f"{transformers.__version__}", "",
             "| run | threads per rank | tokens/s (median of rounds) | vs one process | peak RSS per rank | "
             "quantized base per rank | layers compiled |", "|---|---|---|---|---|---|---|"]
    for k in kinds:
        xs = results[k]
        tps = statistics.median(x["tokens_per_s"] for x in xs)
        label = "1 process" if k == "one" else f"{args.nproc} processes, {k}"
        each = ", ".join(f"{x['tokens_per_s']:.0f}" for x in xs)
        lines.append(f"| {label} | {xs[0]['threads_per_rank']} | {tps:.0f} ({each}) | "
                     f"{tps / one:.2f}x | {max(x['peak_rss_per_rank_bytes'] for x in xs) / 2**20:.0f} MiB | "
                     f"{xs[0]['base_bytes_per_rank'] / 2**20:.1f} MiB | "
                     f"{(xs[0]['layers'] or {}).get('compiled', '?')}/{sum((xs[0]['layers'] or {}).values()) or '?'} |")
        summary[k] = {"tokens_per_s": tps}
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_distributed.md").write_text(text)
    (RESULTS / "bench_distributed.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
