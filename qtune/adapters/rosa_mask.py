"""RoSA's sparse support: chosen once per run before training, and kept with the run.

The mask of each RoSA layer keeps the entries of W with the largest accumulated squared gradient
(dL/dW = Σ grad_outᵀ·x) over `rosa_mask_steps` batches (RoSA, arXiv 2401.04679 §3.3). The
accumulators are memory-mapped files in the run folder (a 7B model's fp32 scores live on disk, not
in memory), one layer's dense gradient is formed at a time, and the files are deleted once the masks
are chosen. The indices are saved as RUN/rosa_mask.safetensors: resume and export reload them.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qtune.adapters.base import Adapter
from qtune.adapters.rosa import RoSALinear

def select_sparse_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat int64 indices of the ceil(density·numel) largest entries of a (out, in) score matrix.

    Ties at the threshold go to the lowest flat indices, so the mask is deterministic."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    flat = scores.detach().reshape(-1)
    k = min(math.ceil(density * flat.numel()), flat.numel())
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=flat.device)
    threshold = torch.topk(flat, k, sorted=False).values.min()  # the k-th largest score
    above = (flat > threshold).nonzero().squeeze(1)
    ties = (flat == threshold).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def mmap_accumulators(shapes: dict[str, tuple[int, int]], folder: Path) -> dict[str, torch.Tensor]:
    """Zero-filled fp32 (out, in) accumulators backed by files in `folder` (one per layer), so that
    the squared gradients of every weight of a 7B model (28 GB) sit on disk, not in memory."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    accumulators = {}
    for name, (out_f, in_f) in shapes.items():
        path = folder / f"{name}.f32"
        with open(path, "wb") as f:  # a fresh (sparse) file of zeros, whatever was there before
            f.truncate(out_f * in_f * 4)
        mapped = torch.from_file(str(path), shared=True, size=out_f * in_f, dtype=torch.float32)
        accumulators[name] = mapped.view(out_f, in_f)
    return accumulators


class _GradSquareTap(torch.autograd.Function):
    """Identity on a frozen linear's output y; its backward adds (dL/dW)² = (grad_yᵀ x)² to an accumulator.

    x goes through save_for_backward (not a side dict), so gradient checkpointing frees and recomputes
    it like any activation, and a recomputed forward (whose graph never runs backward) counts nothing.
    `anchor` (a scalar that requires grad) makes the output require grad although nothing upstream
    does (the model is frozen), so that backward reaches every tap."""

    @staticmethod
    def forward(ctx, y, x, accumulator, anchor):
        ctx.save_for_backward(x)
        ctx.accumulator = accumulator
        return y.clone()  # a new tensor, not a view: later in-place ops on the layer output stay legal

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
        ctx.accumulator.add_(grad_w.square_().to(ctx.accumulator.device))  # then grad_w is freed
        return grad_y, None, None, None


def accumulate_weight_grad_squares(model: nn.Module, layer_names: list[str], batches: Iterable[dict],
                                   accumulators: dict[str, torch.Tensor], loss_fn=None) -> None:
    """accumulators[name] += (dL/dW)² per batch, dL/dW = grad_outᵀ x (fp32, (out, in)), for frozen linears.

    L is `loss_fn(batch)` (the mean token loss; default the model's own, `model(**batch).loss`). Each
    named layer may be the linear itself or an adapter wrapping it (its base_layer). A forward hook on
    the linear taps its output; in backward the tap forms ONE layer's (out, in) gradient, adds its
    square in place and frees it and x: at most one dense temporary at a time. The model's mode is
    kept: in train mode with gradient checkpointing on, activations stay bounded as in training (the
    tap saves x as autograd does, so it is recomputed, not kept, and the hooks firing twice on
    recomputation count once). Batches are moved to the model's device; no .grad is written; the
    requires_grad flags are restored."""
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    anchor = torch.zeros((), device=device, requires_grad=True)
    handles = []

    def tap(name):
        return lambda module, args, y: _GradSquareTap.apply(y, args[0].detach(), accumulators[name], anchor)

    try:
        model.requires_grad_(False)  # no .grad anywhere: the taps' anchor carries the graph
        for name in layer_names:
            layer = model.get_submodule(name)
            base = layer.base_layer if isinstance(layer, Adapter) else layer
            handles.append(base.register_forward_hook(tap(name)))
        for batch in batches:
            with torch.enable_grad():
                batch = {k: v.to(device) for k, v in batch.items()}
                (loss_fn(batch) if loss_fn is not None else model(**batch).loss).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)


MASK_FILE = "rosa_mask.safetensors"


def rosa_layers(model: nn.Module) -> dict[str, RoSALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RoSALinear)}


def restore_supports(model: nn.Module, run_dir: Path | None) -> bool:
    """Load saved masks into the model's RoSA layers; False if there are none to load."""
    layers = rosa_layers(model)
    path = Path(run_dir) / MASK_FILE if run_dir is not None else None
    if not layers or path is None or not path.is_file():
        return False
    saved = load_file(path)
    for name, layer in layers.items():
        layer.set_support(saved[name])
    return True


def choose_supports(model: nn.Module, batches, density: float, run_dir: Path, loss_fn=None) -> dict | None:
    """Pick every RoSA layer's support from accumulated squared gradients (of `loss_fn(batch)`, default the
    model's own loss) and save it."""
    layers = rosa_layers(model)
    if not layers:
        return None
    folder = Path(run_dir) / ".rosa_scores"
    try:
        scores = mmap_accumulators({n: (l.out_features, l.in_features) for n, l in layers.items()}, folder)
        accumulate_weight_grad_squares(model, list(layers), batches, scores, loss_fn)
        masks = {n: select_sparse_mask(scores[n], density) for n in layers}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for name, layer in layers.items():
        layer.set_support(masks[name])
    tmp = Path(run_dir) / f".{MASK_FILE}.tmp"
    save_file(masks, tmp)
    os.replace(tmp, Path(run_dir) / MASK_FILE)
    return {"layers": len(masks), "nnz": sum(int(m.numel()) for m in masks.values())}
