"""Gradient-checkpoint recomputation that skips what backward never reads.

With checkpointing, each decoder layer's forward runs twice: once without keeping its internals,
and again during backward to rebuild the tensors autograd saved. The second run does not need the
layer's output, only those saved tensors. The last linear of a Llama-family layer (mlp.down_proj)
feeds only the residual add, which saves nothing, so in the recomputation its frozen base GEMM
(and its dequantization: a quarter of a layer's weights) can be skipped. Its adapter still runs:
its saved inputs are needed for the adapter's gradients.

torch.utils.checkpoint's `context_fn` gives the recomputation its own context; inside it
`recomputing()` is true. Thread-local: on CUDA the recomputation runs on autograd's device thread.
"""

from __future__ import annotations

import contextlib
import threading

from quant import QuantLinear

_state = threading.local()


def recomputing() -> bool:
    return getattr(_state, "on", False)


class _Recomputation:
    """recomputing() is true inside. Re-enterable: the checkpoint enters the one context it got for
    each recomputation, and a retain_graph backward recomputes again."""

    def __enter__(self):
        self.previous = recomputing()
        _state.on = True

    def __exit__(self, *exc):
        _state.on = self.previous
        return False


def context_fn():
    """For torch.utils.checkpoint(context_fn=...): (forward context, recomputation context)."""
    return contextlib.nullcontext(), _Recomputation()


def can_skip(adapter) -> bool:
    """True inside a recomputation, for a flagged adapter whose base may be skipped: a QuantLinear
    (its autograd function saves no tensor, so the recomputation saves the same tensors without it)
    with no hooks (RoSA's mask selection taps the base layer's output)."""
    base = adapter.base_layer
    return (adapter.skip_base_in_recompute and recomputing() and isinstance(base, QuantLinear)
            and not base._forward_hooks and not base._forward_pre_hooks)


def mark_output_unused_in_recompute(model, stash: bool = True) -> int:
    """Flag each decoder layer's mlp.down_proj adapter (LoRA, RoSA: the base output is only summed);
    returns how many were flagged. DoRA's magnitude gradient reads that output, so a DoRA down_proj
    is flagged (with `stash`) to keep it from the forward instead: the recomputation then skips the
    GEMM too, for one more (tokens × hidden) tensor per layer held until that layer's backward."""
    n = 0
    for layer in getattr(getattr(model, "model", None), "layers", []):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if down is not None and hasattr(down, "skip_base_in_recompute"):
            down.skip_base_in_recompute = True
            n += 1
        elif down is not None and hasattr(down, "stash_output_for_recompute"):
            down.stash_output_for_recompute = stash
            n += stash
    return n
