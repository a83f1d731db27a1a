"""qtune's QDoRA and QRoSA steps against qtune's own QLoRA step, alternating, in one invocation.

    python tools/bench_methods.py                      # qdora,qrosa; 3 rounds of 20 timed steps
    python tools/bench_methods.py --methods qdora --repeats 5

The speed issue's goals for these two are relative to our QLoRA (QDoRA <= 1.15x its step time, QRoSA
at density 1% <= 1.3x). tools/bench_peft.py reports them too, but from medians of runs made minutes
apart (each method's runs alternate with the peer's, not with QLoRA's), so machine drift between the
QLoRA and the QDoRA block enters the ratio. Here each method's run directly follows a QLoRA run:
a round is qlora, M1, qlora, M2, ... and the ratio is the median over rounds of
(median step time of M) / (median step time of the QLoRA run just before it).

Same setting, data and worker as tools/bench_peft.py (its --worker qtune METHOD processes: one run per
process, the step body of qtune.train, 2 warm-up + 20 timed steps by default). Writes
tools/results/bench_methods.md and bench_methods.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_peft as bp  # noqa: E402  (the setting, the data and the worker processes)

GOALS = {"qdora": 1.15, "qrosa": 1.3}  # step time / our QLoRA's, from the speed issue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="qdora,qrosa")
    ap.add_argument("--repeats", type=int, default=3, help="rounds")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--plays", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in bp.METHODS or m == "qlora"]
    if bad or args.repeats < 1 or args.steps < 1:
        raise SystemExit(f"methods must be of {','.join(m for m in bp.METHODS if m != 'qlora')}; "
                         "--repeats and --steps >= 1")
    from qtune.embedded import default_model_dir

    args.model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    try:
        bp.prepare_data(work, args.model_dir, args.plays, 1, args.warmup + args.steps)
        bp.run_worker(args, work, "prep", "qtune-cache", "prep-qtune-cache")
        rounds = []
        for rep in range(args.repeats):
            row = {}
            for m in methods:
                ref = bp.run_worker(args, work, "qtune", "qlora", f"qlora-before-{m}-{rep}")
                run = bp.run_worker(args, work, "qtune", m, f"{m}-{rep}")
                if "step_times_s" not in ref or "step_times_s" not in run:
                    raise SystemExit(f"round {rep}: a run failed (see {work})")
                row[m] = {"qlora_s": statistics.median(ref["step_times_s"]),
                          "s": statistics.median(run["step_times_s"]),
                          "qlora_steps": ref["step_times_s"], "steps": run["step_times_s"]}
            rounds.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for m in methods:
        ratios = [r[m]["s"] / r[m]["qlora_s"] for r in rounds]
        summary[m] = {"ratio": statistics.median(ratios), "ratios": ratios,
                      "s": statistics.median(r[m]["s"] for r in rounds),
                      "qlora_s": statistics.median(r[m]["qlora_s"] for r in rounds), "goal": GOALS.get(m)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_methods.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "rounds": rounds, "summary": summary}, indent=1))
    lines = [f"# qtune methods vs qtune QLoRA, alternating ({bp._cpu_name()})", "",
             f"Setting of tools/bench_peft.py (SmolLM2-135M, seq {bp.SEQ_LEN} × batch {bp.BATCH}, r={bp.RANK}, "
             f"checkpointing, bf16, AdamW); {args.warmup} warm-up + {args.steps} timed steps per run; {args.repeats} "
             "rounds, each method's run right after a QLoRA run.", "",
             "| method | s/step | QLoRA s/step (the runs just before) | step ratio, median | per round | goal |",
             "|---|---|---|---|---|---|"]
    for m, s in summary.items():
        goal = s["goal"]
        verdict = "" if goal is None else f"≤ {goal}× {'PASS' if s['ratio'] <= goal else 'FAIL'}"
        lines.append(f"| {m} | {s['s']:.3f} | {s['qlora_s']:.3f} | {s['ratio']:.2f}× | "
                     f"{', '.join(f'{r:.2f}' for r in s['ratios'])} | {verdict} |")
    text = "\n".join(lines) + "\n"
    (out / "bench_methods.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
