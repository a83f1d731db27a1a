"""The recomputation policy: what a checkpointed decoder block keeps from its forward so that its
recomputation (in backward) can skip the work that produced it.

One setting, `--recompute`:
- `default`: keep the attention's q, k, v (after the rotary embedding) and its output (o_proj's), or
  for DoRA projections their products u; and DoRA's down_proj product (its magnitude's gradient
  reads it). More memory (a few (tokens × width) tensors per layer, held until that layer's
  backward) for fewer GEMMs in the recomputation. A GEMM's output is kept as the GEMM wrote it (LoRA's and
  DoRA's: qtune.engine.ops' kept twins), the rotary embedding's q, k and v as copies.
- `full`: keep nothing that costs memory.
- `max`: default, and gate/up's outputs too (the MLP's two widest GEMMs and their dequantizations: the
  recomputation's most expensive work per byte kept), so that the recomputation runs only what feeds them
  no more: its norms and the adapters' skinny products. Compiled blocks.
- `weights`: max, and each quantized linear's dequantized weight in the compute dtype, made once when its layer
  first runs and held for the run (a non-persistent buffer, never saved): the step dequantizes nothing,
  neither in the forward nor in backward (the base is frozen, so the copy never goes stale). Costs the
  base's compute-dtype size; the far end of the policy: what the 4-bit base saves is given back for speed
  where the budget allows it. Compiled blocks, a quantized base held in memory (not with --offload or fsdp).
  `--hold-layers N` holds the first N layers' only (`held_layers`), the rest dequantizing as under max: what
  auto picks where max fits the budget and the whole base's copy does not.
- `none`: no recomputation at all: the decoder layers run without checkpointing (autograd keeps what each
  layer's backward reads; compiled blocks: what inductor's partitioner saves), and compiled blocks hold the
  dequantized base as `weights` does. The most memory (every layer's activations until its backward) for
  the fewest FLOPs: for budgets that leave the memory idle otherwise (a small model on a large GPU), where
  layers run eagerly (0.762x default's step there); compiled CPU layers measured 1.13x weights' step in bf16
  (the uncheckpointed graph saves and rereads more than weights recomputes). --no-gradient-checkpointing is
  the same without the held base.
- `auto`: the most of none > weights > weights of fewer layers > max > default > full whose plan (qtune.plan) fits the memory budget
  (none only where the layers run eagerly, weights only where they compile: qtune.plan.resolve_recompute):
  --max-memory, else 90% of the device's memory (qtune.plan.resolve_recompute). Chosen before loading;
  metrics.jsonl's execution line and `qtune plan` show the choice.
Independently of the setting, a linear whose output feeds only the block's residual sum (down_proj
of LoRA and RoSA) skips its base GEMM in the recomputation: backward reads only the adapter's inputs.
The older flags --keep-qkv and --dora-stash map onto `keep_attention` and `keep_down`.

`recomputing()` is true inside a recomputation (torch.utils.checkpoint's context_fn); thread-local,
since on CUDA the recomputation runs on autograd's device thread.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from qtune.config import RECOMPUTE as CHOICES  # the --recompute values (TrainConfig validates them)

LEVELS = ("none", "weights", "max", "default", "full")  # what auto chooses from, the most kept first


@dataclass(frozen=True)
class RecomputePolicy:
    keep_attention: bool = True
    """Keep q, k, v and the attention's output (compiled blocks)."""
    keep_down: bool = True
    """Keep DoRA's down_proj product u (compiled and eager blocks)."""
    keep_mlp: bool = False
    """Keep gate/up's outputs (DoRA: their products u) (compiled blocks)."""
    keep_weights: bool = False
    """Hold each quantized linear's dequantized weight for the run (compiled blocks)."""
    held_layers: int = 0
    """With keep_weights: only the first N decoder layers hold their dequantized base (0 = all) (--hold-layers)."""
    checkpointing: bool = True
    """Whether the decoder layers are checkpointed at all (False: --recompute none, --no-gradient-checkpointing)."""
    level: str = "default"
    """The --recompute value this is (auto resolved: none, weights, max, default or full)."""

    @classmethod
    def from_config(cls, cfg, device: str = "cpu") -> "RecomputePolicy":
        """From --recompute (auto resolved by the plan for `device`), with the older --keep-qkv / --dora-stash
        overriding their part when given."""
        level, held = cfg.recompute, getattr(cfg, "hold_layers", 0)
        if level == "auto":
            from qtune.plan import resolve_recompute

            level, held = resolve_recompute(cfg, device)
        checkpointing = getattr(cfg, "gradient_checkpointing", True) and level != "none"
        if not checkpointing:  # nothing is recomputed, so nothing needs keeping for a recomputation
            return cls(keep_attention=False, keep_down=False, keep_mlp=False, keep_weights=level in ("weights", "none"),
                       checkpointing=False, level=level)
        on = level in ("default", "max", "weights")
        keep_qkv, dora_stash = getattr(cfg, "keep_qkv", None), getattr(cfg, "dora_stash", None)
        return cls(keep_attention=on if keep_qkv is None else bool(keep_qkv),
                   keep_down=on if dora_stash is None else bool(dora_stash), keep_mlp=level in ("max", "weights"),
                   keep_weights=level == "weights", held_layers=held if level == "weights" else 0, level=level)


_state = threading.local()


def recomputing() -> bool:
    return getattr(_state, "on", False)


class _Recomputation:
    """recomputing() is true inside; re-enterable (a retain_graph backward recomputes again)."""

    def __enter__(self):
        self.previous = recomputing()
        _state.on = True

    def __exit__(self, *exc):
        _state.on = self.previous
        return False


def context_fn():
    """For torch.utils.checkpoint(context_fn=...): (forward context, recomputation context)."""
    return contextlib.nullcontext(), _Recomputation()
