"""qtune against the peer stack (transformers + bitsandbytes NF4 + PEFT), side by side, alternating.

    python -m tools.bench_peft                                   # all methods, 20 timed steps, 2 repeats
    python -m tools.bench_peft --methods qlora --steps 40 --repeats 3
    python -m tools.bench_peft --compute-dtype float32           # both sides in fp32: CPUs without bf16 kernels
    python -m tools.bench_peft --methods qlora --recompute auto --max-memory peer --tag auto
                                                                 # auto within the peer's measured peak RSS
    python -m tools.bench_peft --report-only                     # the table and chart again from bench_peft.json

(`python tools/bench_peft.py ...` works too: this file is also every checkout's worker entry point.)

Setting (both sides; tools/harness.py): SmolLM2-135M-Instruct, the first --plays Shakespeare training
plays, seq 256 × batch 4, rank 16 on all 7 linears of every decoder layer, alpha 16 (scale 1), dropout
0, gradient checkpointing (non-reentrant), bf16 compute, AdamW (betas 0.9/0.999, eps 1e-8, no weight
decay), lr 2e-4 constant with no warmup, gradient-norm clipping at 1.0 (qtune's default, applied on
both sides).

--compute-dtype float32 (for CPUs without bf16 GEMM kernels, such as AVX2-only x86, where a bf16 step
takes minutes: tools/bench_dtype.py): both sides compute in fp32. qtune runs --compute-dtype float32 (what
its default `auto` picks on such a CPU); the peer loads its model in fp32 with bnb_4bit_compute_dtype
float32 and runs without autocast (lora16's peer: the fp32 base; qtune's lora16 then keeps its 16-bit
path's base in fp32 too). The GEMM rate is then fp32's, and the results go to bench_peft_fp32.* so the
bf16 table stays.

Methods and their peers:
    qlora   qtune --method qlora            | PEFT LoRA on a bitsandbytes NF4 (double-quant) base
    qdora   qtune --method qdora            | PEFT LoRA use_dora=True on the same base
    qpissa  qtune --method qpissa           | PEFT PiSSA (init_lora_weights="pissa_niter_4") computed on
                                              the fp32 model, residual saved and reloaded in NF4 + the
                                              saved adapter (PEFT's examples/pissa_finetuning recipe)
    qrosa   qtune --method qrosa            | no peer: compared with qtune's own qlora
    lora16  qtune --method qlora --bits 16  | PEFT LoRA on the bf16 base (no quantization)

How it measures:
  * Every (side, method) run is its own process (`--worker SIDE METHOD`, tools/workers.py), so its peak
    RSS (VmHWM) is that run's own. For each method the parent runs qtune, peer, qtune, peer, ...
    (--repeats pairs), and reports medians over runs and the median over pairs of the per-pair ratio
    qtune/peer.
  * Same tokens: the parent tokenizes once (qtune.data.load_splits on symlink folders of the plays and
    of the held-out works, Hamlet + Sonnets) and hands both sides the same token rows, the same
    micro-batch order (qtune.train.micro_batch_rows, seed 0) and the same held-out rows.
  * Steps: --warmup untimed steps, then --steps timed ones; a step's wall time covers slicing its rows,
    forward, backward, clipping, the optimizer step and zero_grad. tokens/s = non-pad tokens / time.
  * Held-out loss, before training and after the last step, is ONE function (harness.heldout_loss) for
    both sides: row by row, logits → fp32 → mean next-token cross-entropy over the labelled tokens,
    in train mode under no_grad (dropout 0; see heldout_loss for the bitsandbytes eval-mode quirk).
  * The qtune side is harness.QtuneRun: qtune.model.build_model, make_optimizer, LambdaLR(lr_factor),
    the MemoryMeter, and qtune.train.train_step for each step (what `qtune train` runs; only metric
    logging and checkpointing are left out). qtune's quantized cache is filled before the first timed
    run (as after any first `qtune train`), and qpissa's randomized SVD runs inside the qtune run (qtune
    does it while loading). The peer's PiSSA preprocessing (fp32 model + SVD + save) is PEFT's separate
    step: it runs once in its own process, and its time and peak RSS are reported apart from the
    training runs.
  * Speed limit: this machine's GEMM rate in the compute dtype (median of 5 timed 2048×2048×2048
    matmuls, at the start and at the end of the benchmark) and the step's useful FLOPs
    (harness.step_flops) give fraction of limit = FLOPs / (s/step × GEMM rate), each side with the FLOPs
    it runs: the peer's checkpointing reruns every linear, qtune's policy fewer (its execution line).

Writes tools/results/bench_peft.md (table), bench_peft.png (chart) and bench_peft.json (raw numbers);
bench_peft_fp32.* under --compute-dtype float32.
"""

from __future__ import annotations

import argparse
import os
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

if __package__:  # python -m tools.bench_peft, or imported as tools.bench_peft
    from tools import harness as h
    from tools import workers
else:  # python tools/bench_peft.py: how every checkout's workers are started (tools/workers.py), with
    import harness as h  # this file's folder first on sys.path
    import workers
from qtune.engine.recompute import CHOICES as RECOMPUTE_CHOICES  # noqa: E402

METHODS, PEERLESS = h.METHODS, h.PEERLESS
SEQ_LEN, BATCH, RANK, ALPHA, LR, GEMM_N = h.SEQ_LEN, h.BATCH, h.RANK, h.ALPHA, h.LR, h.GEMM_N


def short_dtype(report: dict) -> str:
    """A report's compute dtype as its table and chart name it: bf16 or fp32."""
    return {"bfloat16": "bf16", "float32": "fp32"}[report["args"].get("compute_dtype", "bfloat16")]


def report_stem(compute_dtype: str, tag: str | None = None) -> str:
    """The result files' name: bench_peft.* for the issue's bf16 setting, bench_peft_fp32.* for fp32; --tag T
    appends _T (e.g. one file per install or recompute policy)."""
    return ("bench_peft" if compute_dtype == "bfloat16" else "bench_peft_fp32") + (f"_{tag}" if tag else "")


# --- the report --------------------------------------------------------------------------------

def summarize_run(r: dict) -> dict:
    tok_s = [n / t for n, t in zip(r["step_tokens"], r["step_times_s"])]
    return {"s_per_step": statistics.median(r["step_times_s"]), "tokens_per_s": statistics.median(tok_s),
            "tokens_per_s_mean": sum(r["step_tokens"]) / sum(r["step_times_s"]),
            # the run: loading + training (what a fine-tuning run holds); the process peak adds the
            # benchmark's own held-out scoring afterwards (full-vocabulary logits per row, same for both)
            "peak_rss_gib": r["train_peak_rss_bytes"] / 2**30, "process_peak_rss_gib": r["peak_rss_bytes"] / 2**30,
            "heldout_before": r["heldout_before"],
            "heldout_after": r["heldout_after"]}



def aggregate(runs: list[dict]) -> dict | None:
    ok = [summarize_run(r) for r in runs if "step_times_s" in r]
    if not ok:
        return None
    return {k: statistics.median(s[k] for s in ok) for k in ok[0]} | {"runs": len(ok)}


def pair_ratios(q_runs: list[dict], p_runs: list[dict]) -> dict | None:
    """Median over alternating pairs (qtune run i, peer run i) of qtune/peer."""
    pairs = [(summarize_run(q), summarize_run(p)) for q, p in zip(q_runs, p_runs)
             if "step_times_s" in q and "step_times_s" in p]
    if not pairs:
        return None
    return {"tokens_per_s": statistics.median(q["tokens_per_s"] / p["tokens_per_s"] for q, p in pairs),
            "peak_rss": statistics.median(q["peak_rss_gib"] / p["peak_rss_gib"] for q, p in pairs),
            "process_peak_rss": statistics.median(q["process_peak_rss_gib"] / p["process_peak_rss_gib"] for q, p in pairs),
            "heldout_after": statistics.median(q["heldout_after"] / p["heldout_after"] for q, p in pairs),
            "pairs": len(pairs)}


def policies(report: dict) -> str:
    """What each qtune run's execution line says it ran: its recompute level, and the budget auto had."""
    seen = []
    for m in report["methods"]:
        for r in report["results"][m].get("runs", {}).get("qtune", []):
            rec = (r.get("execution") or {}).get("recompute") or {}
            budget = f" at {r['max_memory_gib']:.2f} GiB" if r.get("max_memory_gib") else ""
            seen.append(f"{m} {rec.get('level', 'not recorded')}{budget}")
    return ", ".join(seen) or "none"


def qtune_flops(config: dict, runs: list) -> float | None:
    """The FLOPs of the steps qtune's runs ran: harness.step_flops with what each run's policy reruns (its
    execution line), the median over the runs; None where no run recorded its policy."""
    totals = []
    for r in runs:
        rec = (r.get("execution") or {}).get("recompute")
        if rec:
            totals.append(h.policy_step_flops(config, rec)["total"])
    return statistics.median(totals) if totals else None


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report["args"].get("compute_dtype", "bfloat16"), report["args"].get("tag"))
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    short = short_dtype(report)
    rate = report["gemm"]["gflops"]
    flops = report["flops"]["total"]
    a = report["args"]
    lines = [
        f"# qtune vs transformers + bitsandbytes + PEFT ({report['machine']['cpu']}, {report['machine']['threads']} threads)",
        "",
        f"SmolLM2-135M-Instruct, {a['plays']} Shakespeare plays ({report['data']['train_rows']} rows), seq {SEQ_LEN} × "
        f"batch {BATCH}, r={RANK}, α={ALPHA}, all 7 linears, gradient checkpointing, {short} compute "
        f"({'peer: autocast bf16' if short == 'bf16' else 'peer: fp32 model, bnb compute dtype fp32, no autocast'}), "
        f"AdamW lr {LR} "
        f"constant, clip 1.0; {a['warmup']} warm-up + {a['steps']} timed steps; {a['repeats']} alternating "
        f"qtune/peer pair(s) per method, medians. Held-out: {len(report['data']['heldout_rows_used'])} rows of Hamlet + "
        f"Sonnets ({report['data']['heldout_label_tokens']} tokens), one scoring function for both sides.",
        "",
        f"CPU class: {h.cpu_class(report['machine'])}; "
        f"torch {report['machine'].get('torch')}, transformers {report['machine'].get('transformers')}, "
        f"peft {report['machine'].get('peft')}, bitsandbytes {report['machine'].get('bitsandbytes')}; "
        f"qtune --recompute {report['machine'].get('recompute', 'default')}"
        + (f", --max-memory {report['machine']['max_memory']}" + (" (each pair's peer peak RSS, the peer run first)"
                                                                  if report['machine']['max_memory'] == "peer" else " GiB")
           if report['machine'].get('max_memory') else "")
        + f"; the policy the qtune runs ran: {policies(report)}.",
        "",
        f"{short} GEMM rate ({GEMM_N}³, median of 5, start/end): {report['gemm']['start']['gflops']:.0f} / "
        f"{report['gemm']['end']['gflops']:.0f} GFLOP/s → {rate:.0f} GFLOP/s used. Step FLOPs "
        f"(forward + recomputation + input-gradient backward, formula in tools/harness.py step_flops): "
        f"{flops / 1e9:.0f} GFLOP with every linear recomputed (the peer)"
        + "".join(f"; qtune {m} {v / 1e9:.0f} GFLOP (what its policy reruns)"
                  for m, v in report.get("qtune_flops", {}).items() if v)
        + ". % of GEMM limit: each side's own FLOPs over s/step × the rate.",
        "",
        "| method | side | s/step | tokens/s | peak RSS GiB: run (with scoring) | held-out loss before → after | "
        "% of GEMM limit | tokens/s ratio | RSS ratio: run (with scoring) | loss after ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["methods"]:
        e = report["results"][m]
        for side in ("qtune", "peer"):
            s = e.get(side)
            if side == "peer" and m in PEERLESS:
                lines.append(f"| {m} | peer | – | – | – | – | – | no peer: vs qtune {PEERLESS[m]} | | |")
                continue
            if e.get("unavailable") and side == "qtune":
                lines.append(f"| {m} | qtune | unavailable in this qtune | | | | | | | |")
                continue
            if s is None:
                if not e.get("unavailable"):
                    lines.append(f"| {m} | {side} | failed (see {stem}.json) | | | | | | | |")
                continue
            own = report.get("qtune_flops", {}).get(m) if side == "qtune" else None
            frac = (own or flops) / (s["s_per_step"] * rate * 1e9)
            r = e.get("ratios") if side == "qtune" else None
            rat = (f"{r['tokens_per_s']:.2f}× | {r['peak_rss']:.2f}× ({r['process_peak_rss']:.2f}×) | "
                   f"{r['heldout_after']:.4f}" if r else " | | ")
            lines.append(f"| {m} | {side} | {s['s_per_step']:.3f} | {s['tokens_per_s']:.0f} | "
                         f"{s['peak_rss_gib']:.2f} ({s['process_peak_rss_gib']:.2f}) | "
                         f"{s['heldout_before']:.4f} → {s['heldout_after']:.4f} | {100 * frac:.1f}% | {rat} |")
    lines += ["", "Ratios are qtune/peer, the median over alternating pairs (qrosa: over qtune qlora's runs). Peak RSS "
              "of the run: the worker's VmHWM at the end of training (loading included); in parentheses the "
              "process's peak after the benchmark's held-out scoring too (transformers' full-vocabulary logits, "
              "one row at a time, the same function for both sides)."]
    q = report["results"].get("qlora", {}).get("ratios")
    budgeted = (report["machine"].get("max_memory") and report["machine"].get("recompute") == "auto")
    if q and budgeted:  # --recompute auto within a memory budget: the speed issue's second goal
        runs = report["results"]["qlora"]["runs"]["qtune"]
        within = all(r.get("max_memory_gib") and r["train_peak_rss_bytes"] <= r["max_memory_gib"] * 2**30 for r in runs)
        # the goal: 2.5x in bf16 (moonshot 3x); in float32 (AVX2-only CPUs) 2.0x
        goal = 2.0 if report["args"].get("compute_dtype") == "float32" else 2.5
        ok = [q["tokens_per_s"] >= goal, within, abs(q["heldout_after"] - 1) <= 0.01]
        moonshot = "" if goal == 2.0 else f" (3× moonshot: {'reached' if q['tokens_per_s'] >= 3 else 'not reached'})"
        lines += ["", f"Targets (QLoRA, --recompute auto): tokens/s ≥ {goal}× peer: {q['tokens_per_s']:.2f}× "
                  f"{'PASS' if ok[0] else 'FAIL'}{moonshot}; "
                  f"each run's peak RSS within its --max-memory: {'PASS' if ok[1] else 'FAIL'} "
                  f"({q['peak_rss']:.2f}× the peer's); held-out loss within ±1% of the peer's: "
                  f"{100 * (q['heldout_after'] - 1):+.2f}% {'PASS' if ok[2] else 'FAIL'} (the default policy's own "
                  "held-out loss is the one to compare it with: see bench_peft.md)."]
    elif q:
        ok = [q["tokens_per_s"] >= 2.0, q["peak_rss"] <= 0.5, abs(q["heldout_after"] - 1) <= 0.01]
        lines += ["", f"Targets (QLoRA, default policy): tokens/s ≥ 2.0× peer: {q['tokens_per_s']:.2f}× {'PASS' if ok[0] else 'FAIL'}; "
                  f"peak RSS of the run ≤ 0.5× peer: {q['peak_rss']:.2f}× {'PASS' if ok[1] else 'FAIL'} "
                  f"(with the scoring: {q['process_peak_rss']:.2f}×); "
                  f"held-out loss within ±1%: {100 * (q['heldout_after'] - 1):+.2f}% {'PASS' if ok[2] else 'FAIL'}."]
    prep = report.get("peer_pissa_prep")
    if prep and "prep_s" in prep:
        lines += ["", f"Peer QPiSSA preprocessing (fp32 load + PiSSA SVD + save residual and adapter; PEFT's separate "
                  f"step, not in the peer's training run): {prep['prep_s']:.1f} s, peak RSS "
                  f"{prep['peak_rss_bytes'] / 2**30:.2f} GiB. qtune's qpissa does its SVD inside its run."]
    lines += ["", "Peer evaluation runs in train mode (dropout 0) under no_grad: bitsandbytes' CPU Linear4bit in eval "
              "mode repacks weights and asserts out_features % 32 == 0 on AVX512-bf16 CPUs."]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(report, out_dir / f"{stem}.png")
    print("\n".join(lines))


def rebuild_report(out_dir: Path, compute_dtype: str = "bfloat16", tag: str | None = None) -> None:
    """Summaries and ratios again from the raw runs kept in bench_peft.json (bench_peft_fp32.json for
    float32; after a change of how they are summarized), then the same markdown and chart."""
    report = json.loads((out_dir / f"{report_stem(compute_dtype, tag)}.json").read_text())
    results = report["results"]
    for m, e in results.items():
        runs = e["runs"]
        e.update(qtune=aggregate(runs["qtune"]), peer=aggregate(runs["peer"]), ratios=pair_ratios(runs["qtune"], runs["peer"]))
    for m, ref in PEERLESS.items():
        if m in results and ref in results and results[m]["qtune"] and results[ref]["qtune"]:
            results[m]["ratios"] = pair_ratios(results[m]["runs"]["qtune"], results[ref]["runs"]["qtune"])
    write_report(report, out_dir)


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in report["methods"] if report["results"][m].get("qtune")]
    if not methods:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(methods))
    w = 0.38
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"),
                           (axes[1], "peak_rss_gib", "peak RSS of the run, GiB (lower is better)")):
        q = [report["results"][m]["qtune"][key] for m in methods]
        p = [(report["results"][m].get("peer") or {}).get(key, 0) for m in methods]
        ax.bar([i - w / 2 for i in x], q, w, label="qtune", color="tab:blue")
        ax.bar([i + w / 2 for i in x], p, w, label="transformers+bnb+PEFT", color="tab:orange")
        for i, m in enumerate(methods):
            r = report["results"][m].get("ratios")
            if r:
                ratio = r["tokens_per_s" if key == "tokens_per_s" else "peak_rss"]
                ax.annotate(f"{ratio:.2f}×", (i, max(q[i], p[i])), ha="center", va="bottom", fontsize=9)
        ax.set_xticks(list(x))
        ax.set_xticklabels(methods)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)  # below: never over a bar's label
    fig.suptitle(f"SmolLM2-135M, seq {SEQ_LEN}×{BATCH}, r={RANK}, {short_dtype(report)}, {report['args']['steps']} timed steps "
                 f"(qtune/peer ratios annotated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)



# --- the parent: data, alternation, report -----------------------------------------------------

def parent_main(args) -> None:
    import shutil

    import torch

    from qtune.embedded import smollm2_hf_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; use some of {','.join(METHODS)}")
    for m, ref in PEERLESS.items():  # qrosa is compared with qtune's qlora: run that too when it is not asked for
        if m in methods and ref not in methods:
            methods.insert(methods.index(m), ref)
    args.model_dir = Path(args.model_dir) if args.model_dir else smollm2_hf_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-peft-"))
    try:
        data_info = h.prepare_data(work, args.model_dir, args.plays, args.eval_rows, args.warmup + args.steps)
        print(f"data: {data_info['train_rows']} train rows, {len(data_info['heldout_rows_used'])} held-out rows; "
              f"work folder {work}", file=sys.stderr)
        gemm_start = h.gemm_rate(dtype=args.compute_dtype)
        print(f"{args.compute_dtype} GEMM: {gemm_start['gflops']:.0f} GFLOP/s", file=sys.stderr)
        h.run_worker(args, work, "prep", "qtune-cache", "prep-qtune-cache")
        prep = h.run_worker(args, work, "prep", "qpissa", "prep-peer-pissa") if "qpissa" in methods else None
        results: dict[str, dict] = {}
        for m in methods:
            runs = {"qtune": [], "peer": []}
            unavailable = None
            for rep in range(args.repeats):
                if args.max_memory == "peer" and m not in PEERLESS:
                    # the peer runs first in each pair: its measured peak RSS is the next qtune run's --max-memory
                    runs["peer"].append(h.run_worker(args, work, "peer", m, f"{m}-peer-{rep}"))
                    if "train_peak_rss_bytes" not in runs["peer"][-1]:
                        raise SystemExit(f"--max-memory peer: the peer's run {rep} failed, so there is no budget to give "
                                         f"qtune's ({runs['peer'][-1].get('error', '')[:300]})")
                    os.environ[workers.MAX_MEMORY_ENV] = f"{runs['peer'][-1]['train_peak_rss_bytes'] / 2**30:.4f}"
                r = h.run_worker(args, work, "qtune", m, f"{m}-qtune-{rep}")
                if "unavailable" in r:
                    unavailable = r["unavailable"]
                    break
                r["max_memory_gib"] = float(os.environ[workers.MAX_MEMORY_ENV]) if os.environ.get(workers.MAX_MEMORY_ENV) else None
                runs["qtune"].append(r)
                if m not in PEERLESS and args.max_memory != "peer":
                    runs["peer"].append(h.run_worker(args, work, "peer", m, f"{m}-peer-{rep}"))
            results[m] = {"unavailable": unavailable, "runs": runs,
                          "qtune": aggregate(runs["qtune"]), "peer": aggregate(runs["peer"]),
                          "ratios": pair_ratios(runs["qtune"], runs["peer"])}
        for m, ref in PEERLESS.items():  # qrosa: ratios against qtune's own qlora
            if m in results and ref in results and results[m]["qtune"] and results[ref]["qtune"]:
                results[m]["ratios"] = pair_ratios(results[m]["runs"]["qtune"], results[ref]["runs"]["qtune"])
        gemm_end = h.gemm_rate(dtype=args.compute_dtype)
        config = json.loads((args.model_dir / "config.json").read_text())
        import bitsandbytes
        import peft
        import transformers

        report = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "methods": methods, "data": data_info,
            "machine": {"cpu": h.cpu_name(), **h.cpu_bf16(), "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "recompute": args.recompute or "default",
                        "max_memory": args.max_memory,
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
            "gemm": {"start": gemm_start, "end": gemm_end,  # the rate used: median over all 10 timed products
                     "gflops": 2 * GEMM_N ** 3 / statistics.median(gemm_start["times_s"] + gemm_end["times_s"]) / 1e9},
            "flops": h.step_flops(config, BATCH, SEQ_LEN, RANK),
            "qtune_flops": {m: qtune_flops(config, results[m]["runs"]["qtune"]) for m in results},
            "peer_pissa_prep": prep, "results": results}
        write_report(report, Path(args.out_dir))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--repeats", type=int, default=2, help="alternating qtune/peer pairs per method")
    ap.add_argument("--plays", type=int, default=4, help="training plays (the first N, alphabetically)")
    ap.add_argument("--eval-rows", type=int, default=16, help="held-out rows scored before and after")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every process (0 = torch's default)")
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="both sides' compute dtype: auto (default: bfloat16 where the CPU has bf16 kernels, float32 "
                         "where it does not, as qtune's own auto), bfloat16 (the peer under autocast) or float32 "
                         "(tools/bench_dtype.py; writes bench_peft_fp32.*)")
    ap.add_argument("--recompute", default=None, choices=RECOMPUTE_CHOICES,
                    help="qtune's --recompute in its workers (default: qtune's default policy)")
    ap.add_argument("--max-memory", default=None, metavar="GIB|peer",
                    help="qtune's --max-memory in its workers (the budget of --recompute auto): GiB, or `peer`: each pair "
                         "runs the peer first and gives the qtune run the peer's measured peak RSS")
    ap.add_argument("--model-dir", default=None, help="bf16 HF folder (default: the embedded SmolLM2-135M)")
    h.add_isa_argument(ap)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None, help="suffix of the result files (bench_peft_TAG.*), e.g. newest or auto")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, run folders)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the table, ratios and chart from --out-dir's bench_peft.json runs; run nothing")
    ap.add_argument("--worker", nargs=2, metavar=("SIDE", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--lockstep-ack-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    h.cap_isa(args.isa)
    if args.compute_dtype == "auto":
        from qtune.precision import resolve_compute_dtype

        args.compute_dtype = resolve_compute_dtype("auto", "cpu", warn=False)
    if args.recompute:  # the qtune workers read it (tools/workers.py)
        os.environ[workers.RECOMPUTE_ENV] = args.recompute
    if args.max_memory not in (None, "peer"):
        try:
            float(args.max_memory)
        except ValueError:
            raise SystemExit(f"--max-memory {args.max_memory!r}: give GiB (e.g. 2.5) or `peer`") from None
        os.environ[workers.MAX_MEMORY_ENV] = args.max_memory
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.plays < 1 or args.eval_rows < 1:
        raise SystemExit("--steps, --repeats, --plays and --eval-rows must be >= 1, --warmup >= 0")
    if args.report_only:
        rebuild_report(Path(args.out_dir), args.compute_dtype, args.tag)
    elif args.worker:
        workers.worker_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
