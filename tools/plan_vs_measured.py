"""qtune plan against the meter: predicted peak of live tensors vs the peak_memory_bytes a real
training run logs, over several shapes, methods and models.

Each case trains for a few steps in its own process (the embedded SmolLM2-135M, and random-weight
models of larger shapes written here), then the plan for the same configuration is computed.

    python -m tools.plan_vs_measured                       # writes tools/results/plan_vs_measured.md
    python -m tools.plan_vs_measured --only "qdora" --out /tmp/plan.md   # the cases whose description has "qdora"
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qtune.config import TrainConfig
from qtune.plan import plan_memory

CASES = [
    ("SmolLM2-135M", {}),
    ("SmolLM2-135M", {"batch_size": 8}),
    ("SmolLM2-135M", {"seq_len": 512, "batch_size": 2}),
    ("SmolLM2-135M", {"recompute": "full"}),
    ("SmolLM2-135M", {"recompute": "max"}),
    ("SmolLM2-135M", {"recompute": "weights"}),
    ("SmolLM2-135M", {"recompute": "weights", "hold_layers": 20}),  # the first 20 of 30 layers' copies
    ("SmolLM2-135M", {"recompute": "none"}),
    ("SmolLM2-135M", {"recompute": "auto", "max_memory": 2.0}),  # the peer's peak RSS at this setting: weights fits
    ("SmolLM2-135M", {"method": "qdora"}),
    ("SmolLM2-135M", {"method": "qdora", "recompute": "full"}),
    ("SmolLM2-135M", {"method": "qrosa"}),
    ("SmolLM2-135M", {"bits": 16}),
    ("SmolLM2-135M", {"optim": "adamw8bit", "rank": 64}),
    ("SmolLM2-135M", {"gradient_checkpointing": False, "batch_size": 2}),
    *[("SmolLM2-135M", {"method": m, "lr": 1e-3}) for m in ("adalora", "loradash", "spectral", "loha", "lokr", "bone",
                                                            "bat", "ia3", "lntuning", "bitfit")],  # the second wave
    ("random-0.5B", {"batch_size": 2}),
    ("random-1B-wide", {"batch_size": 1, "seq_len": 512}),
]
RANDOM = {  # Llama geometries with random weights (bf16 on disk)
    "random-0.5B": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=16, vocab_size=49152),  # SmolLM2's tokenizer
    "random-1B-wide": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=4, vocab_size=49152),
}


def random_model(name: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qtune.embedded import smollm2_hf_dir
    from qtune.loader import TOKENIZER_FILES

    out = folder / name
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**RANDOM[name], max_position_embeddings=2048),
                                                 dtype=torch.bfloat16)
        model.save_pretrained(out)
        smol = smollm2_hf_dir()  # its tokenizer (ids < 49152) for the shipped data
        for f in TOKENIZER_FILES:
            if (smol / f).is_file():
                (out / f).write_bytes((smol / f).read_bytes())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan_vs_measured.md"))
    ap.add_argument("--only", default=None, help="run only the cases whose description contains this")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qtune-plan-"))
    rows = []
    for model_name, over in CASES:
        if args.only and args.only not in f"{model_name} {over}":
            continue
        model = None if model_name.startswith("SmolLM2") else str(random_model(model_name, work))
        cfg = TrainConfig(**{"model": model, "max_steps": args.steps, "eval_every": 0, "eval_batches": 1,
                             "save_every": 0, "output": str(work / "run"), **over})
        flags = []
        for k, v in {**over, "model": model, "max_steps": args.steps, "eval_every": 0, "eval_batches": 1,
                     "save_every": 0}.items():
            if v is None:
                continue
            name = "--" + k.replace("_", "-")
            flags += ([name] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [name, str(v)])
        res = subprocess.run([sys.executable, "-m", "qtune.cli", "train", *flags, "--output", str(work / "run"),
                              "--overwrite"], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{model_name} {over}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        lines = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        measured = max(x["peak_memory_bytes"] for x in lines if "loss" in x)
        rss = max(x["peak_rss_bytes"] for x in lines if "loss" in x)
        execution = next((x["recompute"] for x in lines if x.get("event") == "execution"), {})
        level, held = execution.get("level"), execution.get("held_layers", 0)
        if cfg.recompute == "auto":  # the run resolved it in its own process (its RSS is part of the budget)
            cfg = dataclasses.replace(cfg, recompute=level, hold_layers=held if level == "weights" else 0)
        planned = plan_memory(cfg, "cpu")
        err = planned.total_bytes / measured - 1
        desc = ", ".join(f"{k}={v}" for k, v in over.items()) or "defaults (qlora, b4 x 256, r16)"
        if over.get("recompute") == "auto":
            desc += f" (ran {level}{f', {held} layers held' if held else ''})"
        rows.append(f"| {model_name} | {desc} | {planned.total_bytes / 2**20:,.0f} | {measured / 2**20:,.0f} | "
                    f"{err:+.1%} | {planned.peak_phase} | {rss / 2**20:,.0f} |")
        print(rows[-1], file=sys.stderr)
    text = ("| model | configuration | plan MiB | measured MiB | plan error | planned peak at | process peak RSS MiB |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
