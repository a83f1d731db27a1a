"""torch.compile for the small fused pieces of a step, with an eager fallback that never crashes.

Pure tensor functions are compiled (the chunked cross-entropy's softmax and gradient, RMSNorm,
SiLU·up, the rotary embedding); and on the CPU, a checkpointed decoder layer whose linears are plain
LoRA adapters (QLoRA, QPiSSA, 16-bit LoRA) runs as one compiled graph (CompiledLayerCheckpoint):
there the linears switch to traceable ops (qtune.adapters.lora.lora_traced, bitsandbytes' registered
dequantization operators), since a custom autograd function would break the graph; QDoRA with the
norm detached (the default) traces too (qtune.adapters.dora.dora_traced), and QRoSA once its support
is fixed (qtune.adapters.rosa.rosa_traced: the sparse term is a custom operator with its own backward). Inductor's artifacts are cached
under $QTUNE_CACHE/inductor (unless TORCHINDUCTOR_CACHE_DIR is set), so only a machine's first run
pays the compile (~10 s).

Off with QTUNE_COMPILE=0 (or `compile: false` / --no-compile). Where compiling fails (no C++
compiler, an unsupported platform) qtune warns once and runs the same functions eagerly.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch
import torch.utils.checkpoint


def env_enabled() -> bool:
    """QTUNE_COMPILE=0 turns compiling off whatever the run's config says."""
    return os.environ.get("QTUNE_COMPILE", "1") not in ("0", "false", "no")


_enabled = env_enabled()
_failed = False


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled and not _failed


def _cache_dir() -> None:
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from qtune.embedded import cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failing compile raises: dynamo wraps backend/inductor failures (no C++ compiler, a
    failed build) in TorchDynamoException subclasses."""
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


def maybe_compile(fn):
    """fn, compiled on first use when compiling is enabled; fn itself when disabled or if it fails."""
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        global _failed
        if not enabled() or torch.compiler.is_compiling():  # inside a compiled layer: traced into its graph
            return fn(*args, **kwargs)
        if compiled is None:
            _cache_dir()
            compiled = torch.compile(fn, dynamic=True)
        try:
            return compiled(*args, **kwargs)
        except _compile_errors() as e:  # a compiler failure (only: checkpointing's own control-flow
            # exceptions, e.g. its early stop of a recomputation, must pass through untouched)
            _failed = True
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
                          "qtune continues without compiling (slower, same results). Set QTUNE_COMPILE=0 to "
                          "skip the attempt.", stacklevel=2)
            return fn(*args, **kwargs)

    run.eager = fn
    return run


# --- whole decoder layers ------------------------------------------------------------------------

_layers_failed = False
_compiled_checkpoint = None


# operators whose outputs a compiled layer's checkpoint keeps from the forward instead of recomputing
# them (small outputs that are costly to redo), added where they are defined: DoRA's row norms, an
# (out,) vector per linear (qtune.adapters.dora)
SAVED_OPS: set = set()


# the tag of qtune's operators whose math does not depend on their inputs' strides: inductor may then
# hand them any layout, and one buffer to every operator that reads the same value. Without it, each
# custom operator's input is laid out afresh for it: a layer's normed input was written four times
# in the forward (once for the grouped down-projection, once for each of q, k and v's linear_lora)
FLEXIBLE = (torch.Tag.flexible_layout,) if hasattr(torch.Tag, "flexible_layout") else ()


@torch.library.custom_op("qtune::keep", mutates_args=(), tags=FLEXIBLE)
def keep(x: torch.Tensor) -> torch.Tensor:
    """x (a copy): a tensor that a compiled layer's checkpoint keeps from the forward (SAVED_OPS),
    so that its recomputation skips what produced it when backward reads nothing else from there
    (the attention's q, k and v after the rotary embedding: qtune.kernels). The gradient passes
    through unchanged."""
    return x.clone()


@keep.register_fake
def _(x):
    return torch.empty_like(x)


keep.register_autograd(lambda ctx, grad: grad, setup_context=lambda ctx, inputs, output: None)
SAVED_OPS.add(torch.ops.qtune.keep.default)


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint(function, *args):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))


class CompiledLayerCheckpoint:
    """A decoder layer's `_gradient_checkpointing_func` (what transformers' GradientCheckpointingLayer
    calls with the layer's forward and its inputs) that runs the checkpointed layer as one compiled
    graph: torch.compile traces the checkpoint (a higher-order op), so the layer's forward, its
    recomputation and its backward are each one compiled function — no per-op Python, autograd nodes
    or dispatch inside — and the compiler's partitioner recomputes only what backward reads.
    Under no_grad (evaluation in train mode) the layer runs eagerly without checkpointing. `eager`
    (the checkpoint function it replaced) runs where the compile failed (after one warning) and
    whenever `eligible(layer)` does not hold at the call: it is checked at every call, since a layer
    changes (RoSA's support selection hooks the linears, then fixes the support)."""

    def __init__(self, eager, layer, eligible):
        self.eager, self.eligible = eager, eligible
        self.layer = weakref.ref(layer)

    def __call__(self, function, *args):
        global _layers_failed, _compiled_checkpoint
        if not torch.is_grad_enabled():
            return function(*args)
        layer = self.layer()
        if _layers_failed or not enabled() or layer is None or not self.eligible(layer):
            return self.eager(function, *args)
        if _compiled_checkpoint is None:
            _cache_dir()
            _compiled_checkpoint = torch.compile(_checkpoint)
        try:
            return _compiled_checkpoint(function, *args)
        except _compile_errors() as e:
            _layers_failed = True
            warnings.warn(f"torch.compile of the decoder layers failed ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]}); qtune continues with eager layers (slower, "
                          "same results). Set QTUNE_COMPILE=0 to skip the attempt.", stacklevel=2)
            return self.eager(function, *args)


def layers_env_enabled() -> bool:
    """QTUNE_COMPILE_LAYERS=0 keeps the decoder layers eager (the elementwise pieces stay compiled)."""
    return os.environ.get("QTUNE_COMPILE_LAYERS", "1") not in ("0", "false", "no")


def compile_decoder_layers(layers, eligible) -> int:
    """Route each checkpointed decoder layer through CompiledLayerCheckpoint, which compiles it at
    the calls where `eligible(layer)` holds; returns how many are eligible now. Nothing when compiling
    is off, or with QTUNE_COMPILE_LAYERS=0 (only the elementwise pieces compiled: eager layers)."""
    if not enabled() or not layers_env_enabled():
        return 0
    n = 0
    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(layer, "gradient_checkpointing", False) and func is not None:
            if not isinstance(func, CompiledLayerCheckpoint):
                layer._gradient_checkpointing_func = CompiledLayerCheckpoint(func, layer, eligible)
            n += eligible(layer)
    return n
