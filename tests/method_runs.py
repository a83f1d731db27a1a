"""Helpers the method tests share: a tiny run's configuration, its logits, and a resume check."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qtune.config import TrainConfig

IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12, 3, 60]])


def run_cfg(model_dir, corpus, out, **kw) -> TrainConfig:
    """A tiny fp32 run: 4 steps of batch 2 × 32 tokens, checkpoints every 2 steps; `kw` overrides."""
    base = dict(model=str(model_dir), data=str(corpus), output=str(out), seq_len=32, batch_size=2, rank=4, alpha=8,
                compute_dtype="float32", max_steps=4, eval_every=0, save_every=2, lr=1e-2, warmup_steps=0)
    base.update(kw)
    return TrainConfig(**base)


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def started(run: Path) -> dict:
    """The run's start line of metrics.jsonl (its trainable parameter count, total steps, data)."""
    from qtune.train import read_metrics

    return next(r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "start")


def merged_export_error(run: Path, out: Path, want: torch.Tensor, ids: torch.Tensor = IDS) -> float:
    """max |Δlogit| / max |logit| of the run's merged fp16 export, loaded by plain transformers in fp32, against
    `want` (the adapter model's logits of `ids`)."""
    from transformers import AutoModelForCausalLM

    from qtune.export import export_merged

    merged = AutoModelForCausalLM.from_pretrained(export_merged(run, out, progress=False), dtype=torch.float32)
    return ((logits(merged, ids) - want).abs().max() / want.abs().max()).item()


def resumed_checkpoint(run: Path, cfg: TrainConfig, step: int, out: Path) -> tuple[dict, dict]:
    """Copy `run`, delete its step-`step` checkpoint (the last), resume it to the end; (the uninterrupted run's
    step-`step` adapter tensors, the resumed run's)."""
    from safetensors.torch import load_file

    from qtune.train import train

    name = f"step-{step:06d}"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints" / name)
    train(TrainConfig.from_dict({**cfg.to_dict(), "output": str(out)}), resume=True, progress=False)
    return (load_file(run / "checkpoints" / name / "adapter.safetensors"),
            load_file(out / "checkpoints" / name / "adapter.safetensors"))
