"""tools/gpu_check.sh's helpers: a model of SmolLM2-135M's geometry (random weights, a small offline tokenizer)
written to a folder, and the one-line summary of a run's metrics.jsonl.

    python tools/gpu_check_model.py FOLDER               # write the model
    python tools/gpu_check_model.py --summary RUN_DIR    # median tokens/s, peak memory, execution path
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# SmolLM2-135M-Instruct's config.json, the fields that set its geometry
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def write_model(folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer  # the suite's byte-level BPE, trained offline

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SMOLLM2_135M))
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)


def summary(run: Path) -> str:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r][1:]  # the first step warms up
    execution = next((r for r in rows if r.get("event") == "execution"), {})
    if not steps:
        return f"   {run.name}: no timed step"
    return (f"   median tokens/s {statistics.median(r['tokens_per_s'] for r in steps):.0f}, peak memory "
            f"{max(r['peak_memory_bytes'] for r in steps) / 2**30:.2f} GiB, layers {execution.get('layers')}, "
            f"reasons {execution.get('reasons')}")


if __name__ == "__main__":
    if sys.argv[1] == "--summary":
        print(summary(Path(sys.argv[2])))
    else:
        write_model(Path(sys.argv[1]))
