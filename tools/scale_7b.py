"""A 7B-geometry model on this machine: write it quantized, train a QDoRA step with and without --offload disk.

    python -m tools.scale_7b                          # Llama-2-7B geometry, 2 steps at seq 256, both modes
    python -m tools.scale_7b --layers 10 --seq-len 64 --out /tmp/x.json   # ~1 GB of quantized weights

1. Writes a random-weight model (examples/configs/llama-2-7b.json: hidden 4096, MLP 11008, 32 layers,
   32 heads) straight into qtune's quantized on-disk format — the bitsandbytes-4-bit folder that
   `qtune train --model` loads as pre-quantized — one linear at a time: each weight is drawn in fp32
   (one matrix, ~180 MB, alive at a time), NF4-quantized with double quantization, and written to
   its layer's shard. No download, no fp16 copy of the model. The vocabulary is SmolLM2's (49,152
   ids, its tokenizer is copied in) instead of Llama-2's 32,000, so the shipped dataset tokenizes.
2. Runs `qtune train --method qdora --seq-len 256 --batch-size 1` for --steps steps on the shipped
   dataset, as a subprocess per mode (in memory, --offload disk), and reads each run's
   metrics.jsonl: step time, peak live-tensor memory (the meter) and the process's peak RSS.
3. Prints `qtune plan` for the same run and for Llama-1-65B (the QLoRA paper's 48 GB case).
Writes a markdown table (--md) and the raw figures (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINEARS = (("self_attn", "q_proj", "h", "q"), ("self_attn", "k_proj", "h", "kv"), ("self_attn", "v_proj", "h", "kv"),
           ("self_attn", "o_proj", "q", "h"), ("mlp", "gate_proj", "h", "i"), ("mlp", "up_proj", "h", "i"),
           ("mlp", "down_proj", "i", "h"))


def write_quantized_model(out: Path, geometry: dict, layers: int | None, seed: int = 0) -> dict:
    """The random model as a bnb-4bit folder (config.json + one shard per layer + index + tokenizer)."""
    import torch
    from safetensors.torch import save_file

    from quant import quantize
    from qtune.embedded import smollm2_hf_dir
    from qtune.loader import TOKENIZER_FILES

    src_tok = smollm2_hf_dir()
    cfg = dict(geometry)
    cfg.pop("torch_dtype", None)
    cfg.update(vocab_size=49152, dtype="bfloat16", bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if layers:
        cfg["num_hidden_layers"] = layers
    h, i_sz, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    dims = {"h": h, "i": i_sz, "q": cfg["num_attention_heads"] * d, "kv": cfg.get("num_key_value_heads", 32) * d}
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                  "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
                                  "llm_int8_skip_modules": ["lm_head"]}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    g = torch.Generator().manual_seed(seed)
    weight_map, n_params, q_bytes = {}, 0, 0
    t0 = time.perf_counter()

    def save(tensors: dict, name: str):
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    std = 0.02
    save({"model.embed_tokens.weight": (torch.randn(V, h, generator=g) * std).bfloat16(),
          "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
          "lm_head.weight": (torch.randn(V, h, generator=g) * std).bfloat16()}, "model-embed.safetensors")
    n_params += 2 * V * h + h
    for layer in range(L):
        tensors = {f"model.layers.{layer}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   f"model.layers.{layer}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        for block, name, din, dout in LINEARS:
            w = torch.randn(dims[dout], dims[din], generator=g) * std  # (out, in) fp32, one at a time
            qw = quantize(w, "nf4", True, torch.bfloat16)
            n_params += w.numel()
            del w
            part = qw.state_tensors(f"model.layers.{layer}.{block}.{name}.")
            q_bytes += sum(t.numel() * t.element_size() for t in part.values())
            tensors.update(part)
        save(tensors, f"model-layer{layer:03d}.safetensors")
        print(f"  layer {layer + 1}/{L} written ({time.perf_counter() - t0:.0f} s)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}, indent=2))
    for name in TOKENIZER_FILES:
        if (src_tok / name).is_file():
            shutil.copy2(src_tok / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"params": n_params, "quantized_linear_bytes": q_bytes, "layers": L, "write_s": time.perf_counter() - t0,
            "folder_bytes": sum(p.stat().st_size for p in out.iterdir())}


def train_once(model_dir: Path, offload: str, steps: int, seq_len: int, work: Path, method: str,
               max_memory: float = 0.0) -> dict:
    run = work / f"run-{offload}"
    cmd = [sys.executable, "-m", "qtune.cli", "train", "--model", str(model_dir), "--method", method,
           "--seq-len", str(seq_len), "--batch-size", "1", "--max-steps", str(steps), "--eval-every", "0",
           "--eval-batches", "1", "--save-every", "0", "--offload", offload, "--output", str(run)]
    if max_memory:
        cmd += ["--max-memory", str(max_memory)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"qtune train --offload {offload} failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "step_time_s" in r]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    out = {"offload": offload, "max_memory_gib": max_memory, "wall_s": wall, "step_times_s": [r["step_time_s"] for r in steps_rows],
           "losses": [r["loss"] for r in steps_rows],
           "peak_memory_bytes": max(r["peak_memory_bytes"] for r in steps_rows),
           "peak_rss_bytes": max(r["peak_rss_bytes"] for r in steps_rows), "summary": summary}
    shutil.rmtree(run, ignore_errors=True)
    return out


def plan_json(model: str, **flags) -> dict:
    cmd = [sys.executable, "-m", "qtune.cli", "plan", "--model", model, "--json"]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/configs/llama-2-7b.json"))
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: the config's)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--method", default="qdora")
    ap.add_argument("--modes", default="none,disk")
    ap.add_argument("--max-memory", type=float, default=3.0,
                    help="--max-memory (GiB) for the --offload disk run: below the quantized linears' size")
    ap.add_argument("--keep-model", action="store_true", help="reuse --work's model folder if it is there")
    ap.add_argument("--work", default=None, help="folder for the model and runs (default: a temp folder, removed)")
    ap.add_argument("--out", default=str(ROOT / "tools/results/scale_7b.json"))
    ap.add_argument("--md", default=str(ROOT / "tools/results/scale_7b.md"))
    ap.add_argument("--md-only", action="store_true", help="rewrite --md from --out's figures, run nothing")
    args = ap.parse_args()
    if args.md_only:
        return write_md(json.loads(Path(args.out).read_text()), Path(args.md))
    work = Path(args.work or tempfile.mkdtemp(prefix="qtune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    try:
        written_json = work / "written.json"
        if args.keep_model and written_json.is_file() and (model_dir / "config.json").is_file():
            written = json.loads(written_json.read_text())
        else:
            print(f"writing the quantized random model to {model_dir}", flush=True)
            written = write_quantized_model(model_dir, json.loads(Path(args.config).read_text()), args.layers)
            written_json.write_text(json.dumps(written))
        print(json.dumps(written), flush=True)
        runs = []
        for mode in args.modes.split(","):
            print(f"training --offload {mode} ...", flush=True)
            r = train_once(model_dir, mode, args.steps, args.seq_len, work, args.method,
                           args.max_memory if mode == "disk" else 0.0)
            print(f"  step times {['%.1f' % t for t in r['step_times_s']]} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB,"
                  f" meter {r['peak_memory_bytes'] / 2**30:.2f} GiB, losses {r['losses']}", flush=True)
            runs.append(r)
        plans = {mode: plan_json(str(model_dir), method=args.method, seq_len=args.seq_len, batch_size=1, offload=mode)
                 for mode in args.modes.split(",")}
        plan65 = plan_json(str(ROOT / "examples/configs/llama-1-65b.json"), method="qlora", rank=64, seq_len=512,
                           batch_size=1, optim="paged_adamw8bit", device_memory=48)
        plan65_disk = plan_json(str(ROOT / "examples/configs/llama-1-65b.json"), method="qlora", rank=64, seq_len=512,
                                batch_size=1, optim="paged_adamw8bit", offload="disk", device_memory=24)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report = {"model": written, "config": args.config, "method": args.method, "seq_len": args.seq_len,
              "steps": args.steps, "runs": runs, "plans": plans, "plan_65b": plan65, "plan_65b_offload_disk": plan65_disk,
              "cpu_threads": os.cpu_count()}
    Path(args.out).write_text(json.dumps(report, indent=1))
    write_md(report, Path(args.md))


def write_md(report: dict, path: Path) -> None:
    written, runs, plans = report["model"], report["runs"], report["plans"]
    plan65, plan65_disk = report["plan_65b"], report["plan_65b_offload_disk"]
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = [f"# {written['layers']}-layer Llama-2-7B-geometry model (random weights) on this CPU", "",
             f"{written['params'] / 1e9:.2f} B parameters; NF4 + double-quant linears {gib(written['quantized_linear_bytes'])} GiB, "
             f"folder {gib(written['folder_bytes'])} GiB, written in {written['write_s']:.0f} s without any fp16 copy. "
             f"`qtune train --method {report['method']} --seq-len {report['seq_len']} --batch-size 1`, "
             f"{report.get('steps', len(runs[0]['step_times_s']))} steps, shipped dataset, {report['cpu_threads']} CPU threads. "
             "Peak RSS is the process's (VmHWM, loading included); the meter is its live-tensor peak.", "",
             "| --offload | --max-memory GiB | step times (s) | peak RSS GiB | meter peak GiB | plan total GiB | losses |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        p = plans[r["offload"]]
        lines.append(f"| {r['offload']} | {r.get('max_memory_gib') or '–'} | {', '.join('%.1f' % t for t in r['step_times_s'])} | "
                     f"{gib(r['peak_rss_bytes'])} | {gib(r['peak_memory_bytes'])} | {gib(p['total_bytes'])} | "
                     f"{', '.join('%.4f' % x for x in r['losses'])} |")
    lines += ["", f"65B on paper (Llama-1-65B, QLoRA r64, batch 1 × 512, paged 8-bit AdamW): plan total "
              f"{plan65['total_bytes'] / 1e9:.1f} GB (+ {plan65['overhead_bytes'] / 1e9:.1f} GB overhead) for a 48 GB GPU; "
              f"with --offload disk {plan65_disk['total_bytes'] / 1e9:.1f} GB (+ {plan65_disk['overhead_bytes'] / 1e9:.1f}) "
              f"for a 24 GB GPU: fits = {plan65_disk.get('fits')}."]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
