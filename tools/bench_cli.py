"""`qtune train` (the command users run) against bench_peft's qtune worker, alternating: is the CLI as fast
as the benchmark says qtune is?

    python -m tools.bench_cli                           # all training plays, 2 + 20 steps, 2 pairs
    python -m tools.bench_cli --steps 4 --repeats 1     # a quick look
    python -m tools.bench_cli --recompute max           # both sides under that policy
    python -m tools.bench_cli --recompute weights --max-memory 2.5   # both sides under an RSS budget (GiB)

Both sides run the benchmark's setting (tools/harness.py: SmolLM2-135M-Instruct, seq 256 × batch 4,
r 16 on all 7 linears, alpha 16, dropout 0, checkpointing, AdamW 2e-4 constant with no warm-up, clip 1.0,
the CPU's compute dtype) on the same model (the embedded SmolLM2's GGUF: neither side is given --model) and data: the first --plays Shakespeare training plays (all of them by
default, as the issue's CLI run used) with Hamlet + Sonnets held out. Each run is its own process:
- `bench`: tools/bench_peft.py's qtune worker (harness.QtuneRun: build_model, make_optimizer,
  train_step per step) on the rows prepare_data tokenized;
- `cli`: `python -m qtune.cli train --data PLAYS --eval-data HELD ...` with --eval-every 0 and --save-every 0
  (the final step still evaluates and checkpoints, after its timing), its tokens/s read from its
  metrics.jsonl.
Each side's figure is the median tokens/s of its timed steps (after --warmup); the ratio is cli/bench per
pair, and the median over pairs. Both sides count the same tokens (non-padding input tokens of the step)
and time the same span (the micro-batches' slicing through the optimizer step and zero_grad).

Writes tools/results/bench_cli.{md,json} (bench_cli_TAG.* with --tag TAG).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qtune.engine.recompute import CHOICES as RECOMPUTE_CHOICES
from tools import harness as h
from tools import workers


def cli_flags(args, work: Path, run_dir: Path) -> list[str]:
    """`qtune train`'s flags for the benchmark's setting (harness.bench_config's values, spelled as flags)."""
    total = args.warmup + args.steps
    # no --model: the embedded SmolLM2's GGUF, what the bench worker loads too (its peers read the bf16 folder converted
    # from it, whose NF4 codes differ slightly)
    flags = ["--data", str(work / "train"), "--eval-data", str(work / "held"),
             "--output", str(run_dir), "--method", "qlora", "--bits", "4", "--quant-type", "nf4", "--double-quant",
             "--rank", str(h.RANK), "--alpha", str(h.ALPHA), "--dropout", "0",
             "--target-modules", ",".join(h.TARGETS), "--seq-len", str(h.SEQ_LEN), "--batch-size", str(h.BATCH),
             "--grad-accum", "1", "--lr", str(h.LR), "--lr-scheduler", "constant", "--warmup-steps", "0",
             "--weight-decay", "0", "--max-grad-norm", str(h.MAX_GRAD_NORM), "--optim", "adamw",
             "--max-steps", str(total), "--seed", str(h.SEED), "--gradient-checkpointing",
             "--compute-dtype", args.compute_dtype, "--eval-every", "0", "--save-every", "0", "--eval-batches", "1"]
    if args.recompute:
        flags += ["--recompute", args.recompute]
    if args.max_memory:
        flags += ["--max-memory", str(args.max_memory)]
    return flags


def run_cli(args, work: Path, tag: str) -> dict:
    """One `qtune train` process; its timed steps from metrics.jsonl."""
    run_dir = work / f"run-{tag}"
    log = work / f"{tag}.log"
    cmd = [sys.executable, "-m", "qtune.cli", "train", *cli_flags(args, work, run_dir)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=h.worker_env()).returncode
    if rc != 0:
        raise SystemExit(f"{tag}: qtune train failed (exit {rc}):\n{log.read_text()[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    timed = [r for r in steps if r["step"] > args.warmup]
    execution = next((r for r in records if r.get("event") == "execution"), {})
    out = {"tokens_per_s": [r["tokens_per_s"] for r in timed], "step_time_s": [r["step_time_s"] for r in timed],
           "tokens": [r["tokens"] for r in timed], "losses": [r["loss"] for r in steps],
           "peak_rss_bytes": max(r["peak_rss_bytes"] for r in steps), "execution": execution,
           "train_rows": next((r["data"] for r in records if r.get("event") == "start"), {})}
    print(f"  {tag}: {statistics.median(out['tokens_per_s']):.0f} tok/s, "
          f"layers compiled {execution.get('layers', {}).get('compiled')}, ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr)
    return out


def bench_side(r: dict) -> dict:
    tok_s = [n / t for n, t in zip(r["step_tokens"], r["step_times_s"])]
    return {"tokens_per_s": tok_s, "step_time_s": r["step_times_s"], "tokens": r["step_tokens"],
            "losses": r["train_losses"], "peak_rss_bytes": r["train_peak_rss_bytes"], "execution": r.get("execution", {})}


def summarize(pairs: list[dict]) -> dict:
    med = lambda side: statistics.median(statistics.median(p[side]["tokens_per_s"]) for p in pairs)  # noqa: E731
    ratios = [statistics.median(p["cli"]["tokens_per_s"]) / statistics.median(p["bench"]["tokens_per_s"]) for p in pairs]
    return {"bench_tokens_per_s": med("bench"), "cli_tokens_per_s": med("cli"), "pair_ratios": ratios,
            "ratio": statistics.median(ratios)}


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_cli" + (f"_{report['args']['tag']}" if report["args"].get("tag") else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    s, m, a = report["summary"], report["machine"], report["args"]
    lines = [f"# `qtune train` against bench_peft's qtune worker ({m['cpu']}, {m['threads']} threads)", "",
             f"CPU class: {h.cpu_class(m)}; "
             f"torch {m['torch']}, transformers {m['transformers']}; {a['compute_dtype']} compute; qtune --recompute "
             f"{a['recompute'] or 'default'}" + (f", --max-memory {a['max_memory']} GiB" if a.get("max_memory") else "")
             + f". Data: {report['plays']} training plays ({report['train_rows']} rows of "
             f"{h.SEQ_LEN}), {a['warmup']} warm-up + {a['steps']} timed steps, {a['repeats']} alternating pair(s).", "",
             "| pair | bench worker tok/s | qtune train tok/s | cli / bench | same losses |", "|---|---|---|---|---|"]
    for i, p in enumerate(report["pairs"]):
        b, c = statistics.median(p["bench"]["tokens_per_s"]), statistics.median(p["cli"]["tokens_per_s"])
        same = max(abs(x - y) / abs(y) for x, y in zip(p["cli"]["losses"], p["bench"]["losses"]))
        lines.append(f"| {i + 1} | {b:.0f} | {c:.0f} | {c / b:.3f}× | max rel. difference {same:.1e} |")
    lines += ["", f"**Median: qtune train {s['cli_tokens_per_s']:.0f} tok/s, the bench worker {s['bench_tokens_per_s']:.0f} "
                  f"tok/s: {s['ratio']:.3f}×** (pairs {', '.join(f'{r:.3f}' for r in s['pair_ratios'])}).", ""]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--plays", type=int, default=1000, help="training plays (default: all)")
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    ap.add_argument("--recompute", default=None, choices=RECOMPUTE_CHOICES)
    ap.add_argument("--max-memory", type=float, default=None, help="GiB: both sides run under this --max-memory")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None, help="suffix of the result files (bench_cli_TAG.*), e.g. newest")
    args = ap.parse_args()
    import platform

    import torch
    import transformers

    from qtune.embedded import smollm2_hf_dir
    from qtune.precision import resolve_compute_dtype

    if args.compute_dtype == "auto":
        args.compute_dtype = resolve_compute_dtype("auto", "cpu", warn=False)
    if args.recompute:
        os.environ[workers.RECOMPUTE_ENV] = args.recompute
    if args.max_memory:
        os.environ[workers.MAX_MEMORY_ENV] = str(args.max_memory)
    args.model_dir, args.threads, args.eval_rows = smollm2_hf_dir(), 0, 1
    work = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    try:
        info = h.prepare_data(work, args.model_dir, args.plays, args.eval_rows, args.warmup + args.steps)
        h.run_worker(args, work, "prep", "qtune-cache", "prep-qtune-cache")
        pairs = []
        for rep in range(args.repeats):
            bench = h.run_worker(args, work, "qtune", "qlora", f"bench-{rep}")
            if "error" in bench:
                raise SystemExit(f"the bench worker failed: {bench['error']}")
            pairs.append({"bench": bench_side(bench), "cli": run_cli(args, work, f"cli-{rep}")})
        report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "plays": len(info["plays"]), "train_rows": info["train_rows"],
                  "machine": {"cpu": h.cpu_name(), **h.cpu_bf16(), "threads": torch.get_num_threads(),
                              "python": platform.python_version(), "torch": torch.__version__,
                              "transformers": transformers.__version__},
                  "pairs": pairs, "summary": summarize(pairs)}
        write_report(report, Path(args.out_dir))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
