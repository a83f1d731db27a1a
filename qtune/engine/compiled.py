"""torch.compile in qtune: small pure functions (maybe_compile) and whole decoder blocks, checkpointed or
not (BlockRunner), each with an eager fallback that never crashes and never stays silent.

A block is "compiled" only when measured so: it ran through torch.compile with fullgraph=True (so its
forward, its recomputation and its backward are each one graph: a graph break raises instead of
splitting it) and dynamo compiled nothing new for it beyond the first block of its input signature (no recompilation).
BlockRunner records each layer's path; Engine.execution_report turns that into metrics.jsonl's
execution line. Inductor's artifacts are cached under $QTUNE_CACHE/inductor. Off with QTUNE_COMPILE=0
(or --no-compile); QTUNE_COMPILE_LAYERS=0 keeps the blocks eager and the small functions compiled.
"""

from __future__ import annotations

import functools
import os
import types
import warnings

import torch
import torch.utils.checkpoint


def env_enabled() -> bool:
    """QTUNE_COMPILE=0 turns compiling off whatever the run's config says."""
    return os.environ.get("QTUNE_COMPILE", "1") not in ("0", "false", "no")


def layers_env_enabled() -> bool:
    """QTUNE_COMPILE_LAYERS=0 keeps the decoder blocks eager (the elementwise pieces stay compiled)."""
    return os.environ.get("QTUNE_COMPILE_LAYERS", "1") not in ("0", "false", "no")


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


def compile_errors() -> tuple[type[BaseException], ...]:
    """What a failing compile raises (a graph break under fullgraph, no C++ compiler, a failed build,
    dynamo's recompilation limit)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    return (TorchDynamoException, FailOnRecompileLimitHit)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def maybe_compile(fn):
    """fn, compiled on first use when compiling is enabled; fn itself when disabled, inside a compiled
    block (traced into its graph), or after a compile failure (one warning)."""
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        global _failed
        if not enabled() or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            _cache_dir()
            compiled = torch.compile(fn, dynamic=True)
        try:
            return compiled(*args, **kwargs)
        except compile_errors() as e:
            _failed = True
            warnings.warn(f"torch.compile failed ({_first_line(e)}); qtune continues without compiling (slower, "
                          "same results). Set QTUNE_COMPILE=0 to skip the attempt.", stacklevel=2)
            return fn(*args, **kwargs)

    run.eager = fn
    return run


# --- whole checkpointed blocks ---------------------------------------------------------------------

def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    from qtune.engine.ops import SAVED_OPS

    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_checkpoint(function, *args):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))


def _whole(function, *args):
    return function(*args)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


COMPILED = "compiled"


class BlockRunner:
    """Runs decoder blocks (checkpointed unless `checkpoint` is False) as one compiled graph each where they
    can, else eagerly (with torch.utils.checkpoint and the eager recomputation context), and records which path each layer ran:
    `paths[i]` is COMPILED or the reason layer i ran eager."""

    def __init__(self, eager_context_fn):
        self.eager_context_fn = eager_context_fn
        self.paths: dict[int, str] = {}
        self.failure: str | None = None
        self._compiled = None
        self._checkpointed = True  # whether _compiled runs the block under a checkpoint
        self._signatures: set = set()  # the inputs' shapes, dtypes and grad flags each compile was for

    def run(self, index: int, function, args: tuple, reason: str | None, checkpoint: bool):
        """function(*args) for layer `index`; `reason`: why it cannot compile (None: it may)."""
        if not torch.is_grad_enabled():
            return function(*args)
        if reason is None and not (enabled() and layers_env_enabled()):
            reason = "compile off"
        if reason is None and self.failure is not None:
            reason = self.failure
        if reason is None:
            out = self._run_compiled(index, function, args, checkpoint)
            if out is not None:
                return out
            reason = self.failure
        self.paths[index] = reason
        if not checkpoint:
            return function(*args)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=self.eager_context_fn)

    def _run_compiled(self, index, function, args, checkpoint: bool = True):
        if self._compiled is None or self._checkpointed != checkpoint:
            _cache_dir()
            # a copy of the function's code per runner: dynamo keys its cache and recompilation limit on
            # the code object, so each model's engine gets its own (a process may build several models).
            # Without a checkpoint (--recompute none), the block is one graph whose backward reads what the forward saved
            # (inductor's partitioner chooses, recomputing only cheap elementwise work)
            body = _selective_checkpoint if checkpoint else _whole
            code = body.__code__.replace(co_name=f"qtune_block_{id(self):x}{'' if checkpoint else '_whole'}")
            fn = types.FunctionType(code, body.__globals__, code.co_name)
            self._compiled, self._checkpointed = torch.compile(fn, fullgraph=True), checkpoint
        before = _graphs_compiled()
        try:
            out = self._compiled(function, *args)
        except compile_errors() as e:
            self.failure = f"compile failed: {_first_line(e)}"
            return None
        # a new signature (the first layer's input needs no gradient, a new sequence length) compiles
        # once; anything else dynamo compiled for this call is a recompilation
        signature = tuple((tuple(a.shape), a.dtype, a.requires_grad) if isinstance(a, torch.Tensor) else type(a)
                          for a in args)
        new = _graphs_compiled() - before
        if new > (0 if signature in self._signatures else 1):
            self.paths[index] = f"recompiled ({new} new graphs)"
        else:
            self.paths[index] = COMPILED
        self._signatures.add(signature)
        return out
