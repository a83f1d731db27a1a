"""torch.compile for the small fused pieces of a step, with an eager fallback that never crashes.

Only pure tensor functions are compiled (the chunked cross-entropy's softmax and gradient, RMSNorm,
SiLU·up, the rotary embedding): compiling whole decoder layers is slower here, because qtune's
custom autograd functions (the quantized linears) break the graph. Inductor's artifacts are cached
under $QTUNE_CACHE/inductor (unless TORCHINDUCTOR_CACHE_DIR is set), so only a machine's first run
pays the compile (~10 s).

Off with QTUNE_COMPILE=0 (or `compile: false` / --no-compile). Where compiling fails (no C++
compiler, an unsupported platform) qtune warns once and runs the same functions eagerly.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch


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
        if not enabled():
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
