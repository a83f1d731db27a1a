"""How much of --max-memory the CPU runs of `--recompute auto` really needed beyond the plan: the evidence behind
qtune.plan's AUTO_CPU_RSS_FIXED, read from tools/bench_peft.py result files (no run of its own).

    python -m tools.auto_margin tools/results/bench_peft_fp32_noamx_auto_margin.json
    python -m tools.auto_margin OLD.json --fixed-gib 0.5     # runs made while auto reserved 0.5 GiB + 5%

For each qtune run of a `--recompute auto --max-memory` benchmark, its budget B, the policy auto chose (from the
run's execution line: level and held layers) and its measured peak RSS P. auto chose the most-keeping policy whose
plan fits B less the RSS R the process had at the choice and the headroom (auto_cpu_headroom): so, with need(N) the
plan's bytes plus its overhead for N held layers, R ≤ B − headroom − need(N) and, where fewer than all layers were
held, R > B − headroom − need(N + 1). From those bounds on R: what the run needed beyond the plan's tensors and R,
P − R − plan(N), and how much of B it left unused, B − P. The headroom is the fixed part given (--fixed-gib, the
value in force when the runs were made) plus AUTO_CPU_RSS_FRACTION of B.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from qtune.plan import AUTO_CPU_RSS_FIXED, AUTO_CPU_RSS_FRACTION, plan_memory
from tools import harness as h

GIB = 2**30


def need(cfg, level: str, held: int) -> tuple[int, int]:
    """(plan's bytes, plan's bytes + its overhead) of `cfg` under `level` with `held` layers' copies (0: all)."""
    p = plan_memory(dataclasses.replace(cfg, recompute=level, hold_layers=held), "cpu")
    return p.total_bytes, p.total_bytes + p.overhead_bytes


def analyse(path: Path, fixed: int) -> list[dict]:
    report = json.loads(path.read_text())
    args, rows = report["args"], []
    for method, result in report["results"].items():
        for run in result.get("runs", {}).get("qtune", []):
            budget_gib = run.get("max_memory_gib")
            recompute = run.get("execution", {}).get("recompute", {})
            if not budget_gib or not recompute:
                continue
            cfg = h.bench_config(method, args["warmup"] + args["steps"], args["compute_dtype"], Path("/nonexistent"))
            level, held = recompute["level"], recompute.get("held_layers", 0)
            layers = plan_memory(dataclasses.replace(cfg, recompute=level), "cpu").layers
            budget = int(budget_gib * GIB)
            room = budget - fixed - int(AUTO_CPU_RSS_FRACTION * budget)
            plan, fitted = need(cfg, level, held)
            r_high = room - fitted  # it fitted
            r_low = room - need(cfg, level, held + 1)[1] if level == "weights" and 0 < held < layers - 1 else None
            peak = run["train_peak_rss_bytes"]
            rows.append({"file": path.name, "method": method, "budget": budget, "level": level,
                         "held": held or (layers if level == "weights" else 0), "layers": layers, "peak": peak,
                         "plan": plan, "r": (r_low, r_high),
                         "needed": (peak - r_high - plan, None if r_low is None else peak - r_low - plan),
                         "unused": budget - peak})
    return rows


def table(rows: list[dict], fixed: int) -> str:
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [f"Headroom assumed: {fixed / GIB:.2f} GiB + {AUTO_CPU_RSS_FRACTION:.0%} of the budget.", "",
             "| file | budget GiB | policy | plan GiB | RSS at the choice, GiB | peak GiB | needed beyond plan and that RSS, GiB "
             "| unused of the budget, GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["r"]
        at_choice = f"≤ {g(hi)}" if lo is None else f"{g(lo)}–{g(hi)}"
        n_lo, n_hi = r["needed"]
        needed = f"≥ {g(n_lo)}" if n_hi is None else f"{g(n_lo)}–{g(n_hi)}"
        policy = r["level"] + (f", {r['held']} of {r['layers']} layers held" if r["level"] == "weights" else "")
        lines.append(f"| {r['file']} | {g(r['budget'])} | {policy} | {g(r['plan'])} | {at_choice} | {g(r['peak'])} | "
                     f"{needed} | {g(r['unused'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="bench_peft result files (.json) of auto runs")
    ap.add_argument("--fixed-gib", type=float, default=AUTO_CPU_RSS_FIXED / GIB,
                    help="the headroom's fixed part when the runs were made (default: the current one)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    args = ap.parse_args()
    fixed = int(args.fixed_gib * GIB)
    text = table([row for path in args.results for row in analyse(path, fixed)], fixed)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
