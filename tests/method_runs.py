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
