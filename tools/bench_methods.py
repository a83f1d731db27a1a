"""qtune's QDoRA and QRoSA steps against qtune's own QLoRA step, in lockstep, in one invocation.

    python -m tools.bench_methods                      # qdora,qrosa; 3 rounds of 20 timed steps
    python -m tools.bench_methods --methods qdora --repeats 5
    python -m tools.bench_methods --sequential         # the older mode: one run after the other
    python -m tools.bench_methods --pool tools/results/bench_methods_a.json tools/results/bench_methods_b.json
    git worktree add /tmp/base HEAD~1 && python -m tools.bench_methods --methods qlora --against-tree /tmp/base
                                                       # before/after of a change, each method against itself
    python -m tools.bench_methods --methods qlora,qdora --generic
                                                       # the generic path (transformers' forward, QTUNE_GENERIC=1)
                                                       # against qtune's fused block, on the same Llama
    python -m tools.bench_methods --methods qlora --recompute max
                                                       # --recompute max against the default policy, same method
    python -m tools.bench_methods --methods qlora --recompute weights --recompute-base max
                                                       # one policy against another
    python -m tools.bench_methods --methods qlora --dtype float32
                                                       # float32 against bf16 (--compute-dtype), same method:
                                                       # which dtype --compute-dtype auto should pick on this CPU

(from the repository root: tools/harness.py is imported as tools.harness.)

The speed issue's goals for these two are relative to our QLoRA (QDoRA <= 1.15x its step time, QRoSA
at density 1% <= 1.3x). On this shared machine a step's time drifts by 2x within minutes, so two
runs made one after the other (even back to back) put that drift into their ratio. Here a round
starts a QLoRA worker and the method's worker side by side and steps them in lockstep: step k of
one, then step k of the other (the order swapped every step, ABBA), each waiting while the other
runs, the wait untimed. Each step pair sees the same machine, and the ratio is the median over all
pairs of all rounds of (the method's step k) / (QLoRA's step k); per round medians are shown too.

How firm a median is: the per-round medians, the pairs' middle half, and a bootstrap 95% interval of
the median over the pairs (seeded; pairs of one round share its machine, so this interval is the
narrow end of the truth). --pool reports the pairs of several result files as one sample.

Same setting, data and workers as tools/bench_peft.py (tools/workers.py: `tools/bench_peft.py --worker
qtune METHOD` processes, one run per process, each step qtune.train.train_step, 2 warm-up + 20 timed
steps by default). With --against-tree the reference runs DIR's own tools/bench_peft.py worker with
DIR's qtune (any checkout that has one, older ones included: the worker protocol in tools/workers.py
is what they share). Writes tools/results/bench_methods.md and bench_methods.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from qtune.engine.recompute import CHOICES as RECOMPUTE_CHOICES
from tools import harness as h

GOALS = {"qdora": 1.15, "qrosa": 1.3}  # step time / our QLoRA's, from the speed issue
GENERIC_GOAL = 1.5  # the generic path's step / the fused block's, from the Any-model issue


def lockstep_pair(args, work: Path, methods: tuple[str, str], tag: str, trees: dict | None = None) -> dict[str, dict]:
    """Two qtune workers side by side, stepped alternately (harness.lockstep; see the module docstring);
    {label: its worker's result}. A label is a method, or "METHOD@base" for that method run from
    the --against-tree checkout (`trees`: label -> (method, tree, env))."""
    trees = trees or {}
    return h.lockstep(args, work, {m: ("qtune", *trees.get(m, (m, None, None))) for m in methods}, tag)


def check_tree(tree: Path) -> None:
    """--against-tree: DIR must be a checkout whose qtune a worker then imports (not this one's)."""
    import subprocess

    if not (tree / h.WORKER_SCRIPT).is_file() or not (tree / "qtune").is_dir():
        raise SystemExit(f"--against-tree {tree}: not a checkout of this repository (no tools/bench_peft.py, "
                         "qtune/); make one with `git worktree add DIR COMMIT`")
    found = subprocess.run([sys.executable, "-c", "import qtune, quant; print(qtune.__file__); print(quant.__file__)"],
                           env=h.worker_env(tree), cwd=tree / "tools", capture_output=True, text=True,
                           check=True).stdout.split()  # a worker's cwd-free view: its script's folder first
    if not all(Path(f).resolve().is_relative_to(tree) for f in found):
        raise SystemExit(f"--against-tree {tree}: a worker there would import {found}, not the tree's packages")


def tree_commit(tree: Path) -> str:
    import subprocess

    r = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return r.stdout.strip()[:80] or "not a git checkout"


def median_interval(xs: list[float], level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap `level` interval of the median of xs (percentile method, seeded)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return meds[int((1 - level) / 2 * resamples)], meds[int((1 + level) / 2 * resamples) - 1]


def pool(paths: list[str]) -> str:
    """One line per method: the median, interval and count of the step-pair ratios of all the files."""
    pairs: dict[str, list[float]] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["rounds"]:
            for m, r in row.items():
                pairs.setdefault(m, []).extend(r.get("pair_ratios", []))
    lines = [f"pooled over {len(paths)} files:"]
    for m, xs in pairs.items():
        if xs:
            lo, hi = median_interval(xs)
            goal = GOALS.get(m)
            lines.append(f"  {m}: median {statistics.median(xs):.3f}x over {len(xs)} step pairs, bootstrap 95% of the "
                         f"median {lo:.3f}-{hi:.3f}" + (f" (goal <= {goal}x)" if goal else ""))
    return "\n".join(lines)


def summarize(rounds: list[dict], methods: list[str]) -> dict:
    """Per method: the median step ratio (over all step pairs, or over rounds when sequential), and how
    firm it is (per-round medians, the pairs' middle half, a bootstrap interval of the median)."""
    summary = {}
    for m in methods:
        ratios = [r[m]["s"] / r[m]["qlora_s"] for r in rounds]
        pairs = [x for r in rounds for x in r[m].get("pair_ratios", [])]
        summary[m] = {"ratio": statistics.median(pairs if pairs else ratios), "round_ratios": ratios,
                      "pairs": len(pairs), "s": statistics.median(r[m]["s"] for r in rounds),
                      "qlora_s": statistics.median(r[m]["qlora_s"] for r in rounds), "goal": GOALS.get(m)}
        if pairs:  # the round medians' spread, and the pairs' middle half, say how firm the median is
            q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3  # one pair: no spread
            summary[m]["pair_quartiles"] = [q[0], q[2]]
            summary[m]["median_interval"] = list(median_interval(pairs))
            summary[m]["round_pair_medians"] = [statistics.median(r[m]["pair_ratios"]) for r in rounds]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="qdora,qrosa")
    ap.add_argument("--repeats", type=int, default=3, help="rounds")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--plays", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the workers' compute dtype: float32 on CPUs without bf16 kernels (tools/bench_dtype.py), "
                         "where bf16 steps take minutes")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--sequential", action="store_true",
                    help="one run after the other (QLoRA, then the method) instead of the two in lockstep")
    ap.add_argument("--tag", default="", help="suffix of the result files (bench_methods{TAG}.md/.json)")
    ap.add_argument("--pool", nargs="+", metavar="JSON", help="no run: pool the step pairs of these result files")
    ap.add_argument("--generic", action="store_true",
                    help="each method on the generic path (transformers' forward, QTUNE_GENERIC=1) against the same "
                         "method on qtune's fused block, in lockstep")
    ap.add_argument("--recompute-base", default="default", choices=[c for c in RECOMPUTE_CHOICES if c != "auto"],
                    help="with --recompute: the policy it is compared with (default: default)")
    ap.add_argument("--recompute", default=None, choices=[c for c in RECOMPUTE_CHOICES if c != "default"],
                    help="each method under this --recompute against itself under the default policy, in lockstep")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="each method in this compute dtype against itself in --compute-dtype's, in lockstep")
    ap.add_argument("--against-tree", metavar="DIR", default=None,
                    help="before/after of a code change: each method against the same method run from DIR, another "
                         "checkout of this repository (e.g. `git worktree add DIR HEAD~1`), in lockstep")
    h.add_isa_argument(ap)
    args = ap.parse_args()
    h.cap_isa(args.isa)
    from tools.workers import RECOMPUTE_ENV

    # a policy every worker inherits from this environment (where --recompute does not set one per side): recorded
    args.workers_recompute = os.environ.get(RECOMPUTE_ENV) if not args.recompute else None
    if args.pool:
        print(pool(args.pool))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tree = Path(args.against_tree).resolve() if args.against_tree else None
    known = h.METHODS + h.SECOND_WAVE
    against_itself = tree is not None or args.generic or args.recompute is not None or args.dtype is not None
    bad = [m for m in methods if m not in known or (m == "qlora" and not against_itself)]
    modes = sum(bool(x) for x in (args.sequential, args.generic, tree, args.recompute, args.dtype))
    if bad or args.repeats < 1 or args.steps < 1 or modes > 1 or args.dtype == args.compute_dtype:
        raise SystemExit(f"methods must be of {','.join(m for m in known if m != 'qlora' or tree)}; "
                         "--repeats and --steps >= 1; --against-tree runs in lockstep only")
    if tree:
        check_tree(tree)
    from qtune.embedded import smollm2_hf_dir

    args.model_dir = Path(args.model_dir) if args.model_dir else smollm2_hf_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    try:
        h.prepare_data(work, args.model_dir, args.plays, 1, args.warmup + args.steps)
        h.run_worker(args, work, "prep", "qtune-cache", "prep-qtune-cache")
        if args.dtype:  # qtune's quantized cache is keyed by the compute dtype: fill the other one's too
            h.run_worker(argparse.Namespace(**{**vars(args), "compute_dtype": args.dtype}), work, "prep", "qtune-cache",
                         "prep-qtune-cache-dtype")
        rounds = []
        for rep in range(args.repeats):
            row = {}
            for m in methods:
                if tree:  # the method against itself from the other checkout
                    pair = lockstep_pair(args, work, (f"{m}@base", m), f"{m}-{rep}", {f"{m}@base": (m, tree, None)})
                    ref, run = pair[f"{m}@base"], pair[m]
                elif args.generic:  # the method on the generic path against itself on the fused block
                    pair = lockstep_pair(args, work, (m, f"{m}@generic"), f"{m}-{rep}",
                                         {f"{m}@generic": (m, None, {"QTUNE_GENERIC": "1"})})
                    ref, run = pair[m], pair[f"{m}@generic"]
                elif args.recompute:  # the method under --recompute LEVEL against itself under default
                    label, base = f"{m}@{args.recompute}", args.recompute_base
                    base_label = m if base == "default" else f"{m}@{base}"
                    trees_ = {label: (m, None, {RECOMPUTE_ENV: args.recompute})}
                    if base != "default":
                        trees_[base_label] = (m, None, {RECOMPUTE_ENV: base})
                    pair = lockstep_pair(args, work, (base_label, label), f"{m}-{rep}", trees_)
                    ref, run = pair[base_label], pair[label]
                elif args.dtype:  # the method in --dtype against itself in --compute-dtype
                    from tools.workers import DTYPE_ENV

                    label = f"{m}@{args.dtype}"
                    pair = lockstep_pair(args, work, (m, label), f"{m}-{rep}", {label: (m, None, {DTYPE_ENV: args.dtype})})
                    ref, run = pair[m], pair[label]
                elif args.sequential:
                    ref = h.run_worker(args, work, "qtune", "qlora", f"qlora-before-{m}-{rep}")
                    run = h.run_worker(args, work, "qtune", m, f"{m}-{rep}")
                else:
                    pair = lockstep_pair(args, work, ("qlora", m), f"{m}-{rep}")
                    ref, run = pair["qlora"], pair[m]
                if "step_times_s" not in ref or "step_times_s" not in run:
                    raise SystemExit(f"round {rep}: a run failed (see {work})")
                row[m] = {"qlora_s": statistics.median(ref["step_times_s"]),
                          "s": statistics.median(run["step_times_s"]),
                          "qlora_steps": ref["step_times_s"], "steps": run["step_times_s"],
                          "heldout_after": run["heldout_after"], "qlora_heldout_after": ref["heldout_after"],
                          "trainable_params": run.get("trainable_params"), "peak_rss_bytes": run.get("peak_rss_bytes"),
                          "qlora_peak_rss_bytes": ref.get("peak_rss_bytes")}
                if not args.sequential:
                    row[m]["pair_ratios"] = [t / q for t, q in zip(run["step_times_s"], ref["step_times_s"])]
            rounds.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rounds, methods)
    if args.generic:
        for s in summary.values():
            s["goal"] = GENERIC_GOAL
    if args.recompute or args.dtype:
        for s in summary.values():
            s["goal"] = None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_methods{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "rounds": rounds, "summary": summary}, indent=1))
    mode = ("one run after the other: each method's run right after a QLoRA run, the ratio per round of the "
            "two runs' median steps" if args.sequential else
            "QLoRA and the method in lockstep (step k of one, then of the other, order swapped every step); "
            "the ratio is the median over all step pairs")
    if args.generic:
        mode = ("each method on the generic path (transformers' forward, QTUNE_GENERIC=1) and on qtune's fused block "
                "in lockstep; the \"QLoRA\" columns are the fused block's, the ratio generic / fused")
    if args.recompute:
        base = getattr(args, "recompute_base", "default")
        mode = (f"each method under --recompute {args.recompute} and under --recompute {base} in lockstep; the "
                f"\"QLoRA\" columns are {base}'s, the ratio {args.recompute} / {base}")
    if args.dtype:
        mode = (f"each method in {args.dtype} and in {args.compute_dtype} in lockstep; the \"QLoRA\" columns are "
                f"{args.compute_dtype}'s, the ratio {args.dtype} / {args.compute_dtype}")
    if tree:
        mode += f"; the reference (\"QLoRA\" columns) is each method run from the checkout {tree} ({tree_commit(tree)})"
    versus = ("another checkout" if tree else "the fused block (generic path)" if args.generic
              else f"--recompute {getattr(args, 'recompute_base', 'default')}" if args.recompute
              else f"itself in {args.compute_dtype}" if getattr(args, "dtype", None) else "qtune QLoRA")
    recompute = getattr(args, "workers_recompute", None)
    policy = f" (every worker under --recompute {recompute}: {RECOMPUTE_ENV} set)" if recompute else ""
    lines = [f"# qtune methods vs {versus} ({h.cpu_name()}{h.isa_note()})", "",
             f"Setting of tools/bench_peft.py (SmolLM2-135M, seq {h.SEQ_LEN} × batch {h.BATCH}, r={h.RANK}, "
             f"checkpointing{policy}, {'bf16' if args.compute_dtype == 'bfloat16' else args.compute_dtype}, AdamW); {args.warmup} warm-up + {args.steps} timed steps per run; {args.repeats} "
             f"rounds; {mode}.", "",
             "| method | s/step | QLoRA s/step | step ratio, median | bootstrap 95% of the median | per round | "
             "middle half of the pairs | held-out after (QLoRA) | trainable params | peak RSS GiB (QLoRA) | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        goal = s["goal"]
        verdict = "" if goal is None or tree else f"≤ {goal}× {'PASS' if s['ratio'] <= goal else 'FAIL'}"
        per_round = s.get("round_pair_medians", s["round_ratios"])
        spread = f"{s['pair_quartiles'][0]:.3f}–{s['pair_quartiles'][1]:.3f} ({s['pairs']} pairs)" if s["pairs"] else "–"
        held = statistics.median(r[m]["heldout_after"] for r in rounds)
        held_q = statistics.median(r[m]["qlora_heldout_after"] for r in rounds)
        interval = "–" if "median_interval" not in s else f"{s['median_interval'][0]:.3f}–{s['median_interval'][1]:.3f}"
        trainable = rounds[-1][m].get("trainable_params")
        rss = [r[m].get("peak_rss_bytes") for r in rounds]
        rss_q = [r[m].get("qlora_peak_rss_bytes") for r in rounds]
        peak = (f"{max(rss) / 2**30:.2f} ({max(rss_q) / 2**30:.2f})" if all(rss) and all(rss_q) else "–")
        count = f"{trainable:,}" if trainable else "–"
        lines.append(f"| {m} | {s['s']:.3f} | {s['qlora_s']:.3f} | {s['ratio']:.3f}× | {interval} | "
                     f"{', '.join(f'{r:.3f}' for r in per_round)} | {spread} | {held:.4f} ({held_q:.4f}) | "
                     f"{count} | {peak} | {verdict} |")
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
