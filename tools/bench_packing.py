"""What per-example packing costs and changes on the default run (SmolLM2-135M-Instruct from the shipped
GGUF, the shipped pirate-chat data, seq 256 x batch 4, QLoRA r 16; every `qtune train` default).

    python -m tools.bench_packing                       # step time, lockstep: 2 warm-up + 20 timed pairs
    python -m tools.bench_packing --steps 40 --runs     # and two whole default runs: held-out loss, pirate rate

Step time. One process builds the default run's model once and steps it with the same micro-batches
(qtune.train.micro_batch_rows) packed two ways: per-example (block-diagonal masks, positions restarting
per example: the default) and contaminated (one segment per row: qtune's behaviour before). Step k of
one, then step k of the other, the order swapped every pair (ABBA); the ratio is the median over the
pairs of per-example / contaminated, with the bootstrap 95% interval of that median. The rows are the
same (first fit does not depend on the masks), so the difference is the masks' cost alone.

Runs (--runs). `qtune train` with every default, once with --packing contaminated and once with the
default per-example, then for each: its own held-out loss (metrics.jsonl, scored with its own masks), the
held-out loss of the same eval split scored per-example (what the model does on an example alone) and
contaminated, and the share of the 68 held-out prompts (qtune/data/pirate_chat_eval_prompts.jsonl)
answered in the pirate style (greedy, starts with "Arr"). Writes tools/results/bench_packing.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tools import harness as h
from tools.bench_methods import median_interval

OUT = Path(__file__).parent / "results"


def rows_for(tokenizer, packing: str):
    from qtune.config import TrainConfig
    from qtune.data import load_splits

    cfg = TrainConfig()
    return load_splits(cfg.data, cfg.eval_data, tokenizer, cfg.seq_len, seed=cfg.seed, packing=packing)


def lockstep(steps: int, warmup: int, work: Path) -> dict:
    import torch

    from qtune.config import TrainConfig
    from qtune.model import build_model
    from qtune.precision import resolve_compute_dtype
    from qtune.train import make_optimizer, micro_batch_rows, train_step

    cfg = TrainConfig(output=str(work / "lockstep"), max_steps=warmup + steps)
    cfg.compute_dtype = resolve_compute_dtype(cfg.compute_dtype, "cpu")
    torch.manual_seed(cfg.seed)
    model, tokenizer, *_ = build_model(cfg, work / "lockstep", progress=False)
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    data = {p: rows_for(tokenizer, p)[0] for p in ("per-example", "contaminated")}
    assert torch.equal(data["per-example"].input_ids, data["contaminated"].input_ids), "packing changed the rows"
    n_rows = len(data["per-example"])
    segments = data["per-example"].segment_ids
    times = {p: [] for p in data}
    for k in range(warmup + steps):
        rows = micro_batch_rows(k, n_rows, cfg.batch_size, cfg.seed)
        order = list(data) if k % 2 == 0 else list(data)[::-1]
        for p in order:
            blocks = data[p]
            batch = {"input_ids": blocks.input_ids[rows], "segment_ids": blocks.segment_ids[rows],
                     "labels": blocks.labels[rows]}
            t0 = time.perf_counter()
            train_step(model, optimizer, scheduler, [batch], cfg.max_grad_norm)
            if k >= warmup:
                times[p].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["per-example"], times["contaminated"])]
    lo, hi = median_interval(ratios)
    per_row = [len(set(r.tolist()) - {0}) for r in segments]
    return {"steps": steps, "warmup": warmup, "compute_dtype": cfg.compute_dtype,
            "execution": model.qtune_engine.execution_report(warmup + steps),
            "median_step_s": {p: statistics.median(t) for p, t in times.items()},
            "ratio_median": statistics.median(ratios), "ratio_ci95": [lo, hi],
            "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
            "train_rows": n_rows, "examples_per_row_mean": sum(per_row) / n_rows, "examples_per_row_max": max(per_row),
            "step_times_s": times}


def whole_runs(work: Path) -> dict:
    import torch

    from qtune.config import TrainConfig
    from qtune.data import default_data_path
    from qtune.evaluate import score
    from qtune.export import load_run
    from qtune.generate import prefix_rate
    from qtune.train import train

    prompts = [json.loads(line)["prompt"] for line in
               default_data_path().with_name("pirate_chat_eval_prompts.jsonl").read_text().splitlines()]
    out = {}
    for packing in ("contaminated", "per-example"):
        run = work / f"run-{packing}"
        t0 = time.perf_counter()
        summary = train(TrainConfig(output=str(run), packing=packing), progress=False)
        seconds = time.perf_counter() - t0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        step_times = [r["step_time_s"] for r in records if "step_time_s" in r]
        _, model, tok, *_ = load_run(run, progress=False)
        heldout = {}
        for scored_as in ("per-example", "contaminated"):
            _, eval_rows, _ = rows_for(tok, scored_as)
            heldout[scored_as] = score(model, eval_rows, progress=False)[0]
        with torch.no_grad():
            rate = prefix_rate(model, tok, prompts, "Arr")
        out[packing] = {"eval_loss_before": summary["eval_loss_before"], "eval_loss_after": summary["eval_loss_after"],
                        "heldout_scored": heldout, "pirate_rate": rate, "prompts": len(prompts),
                        "median_step_s": statistics.median(step_times), "seconds": seconds,
                        "steps": len(step_times)}
    return out


def report(result: dict) -> str:
    ls = result["lockstep"]
    lines = [f"# Per-example packing on the default run ({result['date']})", "",
             f"Machine: {result['cpu']} ({result['cpu_class']}), {result['threads']} threads; "
             f"{ls['compute_dtype']}; torch {result['versions']['torch']}, transformers {result['versions']['transformers']}.",
             f"The default data packs {ls['examples_per_row_mean']:.1f} examples per row on average "
             f"(at most {ls['examples_per_row_max']}) into {ls['train_rows']} rows of 256.", "",
             "## Step time, lockstep (same process, same micro-batches, ABBA)", "",
             "| packing | median s/step |", "|---|---|"]
    lines += [f"| {p} | {s:.3f} |" for p, s in ls["median_step_s"].items()]
    q = ls["ratio_quartiles"]
    lines += ["", f"per-example / contaminated: **{ls['ratio_median']:.3f}x** (95% interval {ls['ratio_ci95'][0]:.3f}–"
              f"{ls['ratio_ci95'][1]:.3f}, middle half {q[0]:.3f}–{q[-1]:.3f}; {ls['steps']} pairs after "
              f"{ls['warmup']} warm-up). Goal: ≤ 1.05. Layers: {ls['execution']['layers']}."]
    if "runs" in result:
        lines += ["", "## Whole default runs (`qtune train`, 108 steps)", "",
                  "| trained with | held-out loss before → after (own masks) | after, scored per-example | after, scored contaminated | pirate style on 68 held-out prompts | median s/step |",
                  "|---|---|---|---|---|---|"]
        for p, r in result["runs"].items():
            lines.append(f"| {p} | {r['eval_loss_before']:.3f} → {r['eval_loss_after']:.3f} | "
                         f"{r['heldout_scored']['per-example']:.3f} | {r['heldout_scored']['contaminated']:.3f} | "
                         f"{r['pirate_rate']:.0%} | {r['median_step_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", action="store_true", help="also two whole default runs (about 10 minutes here)")
    ap.add_argument("--out-dir", type=Path, default=OUT)
    args = ap.parse_args()
    import torch
    import transformers


    h.quiet_bitsandbytes()
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as tmp:
        work = Path(tmp)
        result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": h.cpu_name(), "cpu_class": h.cpu_class(h.cpu_bf16()),
                  "threads": torch.get_num_threads(),
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                  "lockstep": lockstep(args.steps, args.warmup, work)}
        if args.runs:
            result["runs"] = whole_runs(work)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_packing.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (args.out_dir / "bench_packing.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
