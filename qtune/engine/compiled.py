"""torch.compile in qtune: small pure functions (maybe_compile) and whole decoder blocks, checkpointed or
not (BlockRunner), each with an eager fallback that never crashes and never stays silent.

A block is "compiled" only when measured so: it ran through torch.compile with fullgraph=True (so its
forward, its recomputation and its backward are each one graph: a graph break raises instead of
splitting it) and dynamo compiled nothing new for it beyond the first block of its input signature (no recompilation).
BlockRunner records each layer's path; Engine.execution_report turns that into metrics.jsonl's
execution line. Inductor's artifacts are cached under $QTUNE_CACHE/inductor/cpu-ISA (inductor_cache_dir). Off with QTUNE_COMPILE=0
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


_INDUCTOR_DIR_AT_IMPORT = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
_BASE_ENV = "QTUNE_INDUCTOR_CACHE_BASE"  # the folder a qtune process keeps its per-ISA folders in (children inherit it)
_chosen_dir: str | None = None


def inductor_cache_dir() -> str:
    """Where inductor keeps its artifacts: BASE/cpu-ISA, one folder per vector ISA that inductor generates C++ for,
    where BASE is the TORCHINDUCTOR_CACHE_DIR the user set, else $QTUNE_CACHE/inductor.

    Inductor's FX-graph cache keys a graph's generated C++ without that ISA (torch 2.13; only the built
    .so is keyed by the compiler's flags). A cache written where AVX-512 was picked and read where AVX2 is
    (a home folder shared by machines of two CPU classes, or ATEN_CPU_CAPABILITY=avx2) builds 16-lane loops
    against 8-lane vectors: wrong losses, then a segmentation fault (docs/benchmarks.md, 2026-12-06 22:08).
    A TORCHINDUCTOR_CACHE_DIR equal to torch's own default is not the user's: torch writes it into the
    environment the first time it asks for the folder. A child of a qtune process keeps its parent's BASE
    (its TORCHINDUCTOR_CACHE_DIR is the parent's ISA folder, which may not be the child's ISA)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from qtune.embedded import cache_dir

    base = os.environ.get(_BASE_ENV)
    if not base:
        user = _INDUCTOR_DIR_AT_IMPORT
        default = os.path.abspath(default_cache_dir())
        base = user if user and os.path.abspath(user) != default else str(cache_dir() / "inductor")
    isa = "-".join(str(pick_vec_isa()).split()) or "scalar"
    return os.path.join(base, f"cpu-{isa}")


def _cache_dir() -> None:
    """Point inductor at inductor_cache_dir(), chosen once per process (before anything compiles)."""
    global _chosen_dir
    if _chosen_dir is None:
        _chosen_dir = inductor_cache_dir()
        os.environ[_BASE_ENV] = os.path.dirname(_chosen_dir)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _chosen_dir


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


# --- a check of the C++ compiler's half-precision kernels --------------------------------------------

# The kernels check_half_kernels compiles: two bf16 (64, 64) transpositions in one graph, which inductor turns
# into one C++ function of two tiled 32x32 transposes (AVX-512). On a 2-core Xeon with avx512_bf16 and no AMX
# (torch 2.13.0, g++ 12.2) that function came back with garbage in all but the first 4 values of each row:
# inductor's flags (-O3 with -DSTANDALONE_TORCH_HEADER, whose TORCH_CHECK throws) miscompile ATen's
# transpose_mxn<BFloat16, 32, 32> there, and a checkpointed compiled decoder block in bf16 then trains to NaN.
# 256-bit kernels (16x16 tiles, another implementation) are correct there.
HALF_KERNEL_SIZE = 64
KERNEL_NOTE: str | None = None  # what check_half_kernels changed (None: nothing), for the execution line
_verdicts: dict[str, str] = {}  # check_half_kernels' verdicts of this process


def _transposes(x: torch.Tensor, y: torch.Tensor):
    return x.t().contiguous().float(), (y * 2).t().contiguous()


def _half_kernels_correct(dtype: torch.dtype, tag: str) -> bool:
    """Whether inductor's compiled _transposes equals its eager result for `dtype` inputs (a fresh copy of the
    function each call, so that dynamo compiles it under the current inductor config)."""
    code = _transposes.__code__.replace(co_name=f"qtune_kernel_check_{tag}")
    fn = types.FunctionType(code, _transposes.__globals__, code.co_name)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(HALF_KERNEL_SIZE, HALF_KERNEL_SIZE, generator=g).to(dtype) for _ in range(2))
    got = torch.compile(fn, fullgraph=True, dynamic=False)(x, y)
    return all(torch.equal(a, b) for a, b in zip(got, _transposes(x, y)))


def _kernel_check_key(dtype: torch.dtype) -> str:
    import hashlib
    import platform

    from torch._inductor import config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    try:
        from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

        compiler = get_compiler_version_info(get_cpp_compiler())
    except Exception:  # an older or newer torch without these helpers: the compiler's config name
        compiler = str(inductor_config.cpp.cxx)
    text = "|".join([torch.__version__, str(dtype), str(pick_vec_isa()), compiler, flags])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_half_kernels(dtype: torch.dtype) -> str | None:
    """Before a CPU run compiles in a half-precision dtype: check that this machine's C++ compiler builds
    inductor's vectorised kernels for it correctly (see HALF_KERNEL_SIZE's comment). If not, compile 256-bit
    kernels instead (torch._inductor.config.cpp.simdlen = 256) and check again; if those are wrong too,
    turn compiling off. Either change warns once and is returned (and kept in KERNEL_NOTE, which the execution
    line reports); None where nothing changed. The verdict is kept under $QTUNE_CACHE per torch version,
    compiler, vector ISA and CPU flags, so the check compiles once per machine."""
    global KERNEL_NOTE, _failed
    from torch._inductor import config as inductor_config

    if dtype not in (torch.bfloat16, torch.float16) or not enabled():
        return None
    _cache_dir()
    from qtune.embedded import machine_record

    def probe() -> str:
        if _half_kernels_correct(dtype, "512"):
            return "ok"
        with inductor_config.patch({"cpp.simdlen": 256}):
            return "simdlen 256" if _half_kernels_correct(dtype, "256") else "eager"

    key = _kernel_check_key(dtype)
    try:  # a process checks once, whatever $QTUNE_CACHE it moves to
        verdict = machine_record("kernel_check.json", key, lambda: _verdicts.get(key) or probe())
    except compile_errors():  # no working compiler: the compiled paths' own fallbacks handle it
        return None
    _verdicts[key] = verdict
    if verdict == "ok":
        return None
    what = str(dtype).removeprefix("torch.")
    if verdict == "simdlen 256":
        inductor_config.cpp.simdlen = 256
        KERNEL_NOTE = f"256-bit {what} kernels (the C++ compiler miscompiled the 512-bit ones)"
        warnings.warn(f"torch.compile's 512-bit {what} CPU kernels came out wrong on this machine (its C++ compiler "
                      "miscompiles them: qtune.engine.compiled.check_half_kernels); qtune compiles 256-bit kernels "
                      "instead (correct, somewhat slower). --compute-dtype float32 avoids it.", stacklevel=2)
    else:
        _failed = True
        KERNEL_NOTE = f"compiling off: the C++ compiler miscompiled {what} kernels"
        warnings.warn(f"torch.compile's {what} CPU kernels came out wrong on this machine, 512- and 256-bit alike "
                      "(qtune.engine.compiled.check_half_kernels); qtune runs eagerly (same results, slower). "
                      "--compute-dtype float32 avoids it.", stacklevel=2)
    return KERNEL_NOTE


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

    def run(self, index: int, function, args: tuple, reason: str | None, checkpoint: bool, variant=None):
        """function(*args) for layer `index`; `reason`: why it cannot compile (None: it may). `variant`: what
        else makes this layer's graph differ from another's (--hold-layers: whether it holds its dequantized
        base), so that its first compile counts as a new signature, not a recompilation."""
        if not torch.is_grad_enabled():
            return function(*args)
        if reason is None and not (enabled() and layers_env_enabled()):
            reason = "compile off"
        if reason is None and self.failure is not None:
            reason = self.failure
        if reason is None:
            out = self._run_compiled(index, function, args, checkpoint, variant)
            if out is not None:
                return out
            reason = self.failure
        self.paths[index] = reason
        if not checkpoint:
            return function(*args)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=self.eager_context_fn)

    def _run_compiled(self, index, function, args, checkpoint: bool = True, variant=None):
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
                          for a in args) + (variant,)
        new = _graphs_compiled() - before
        if new > (0 if signature in self._signatures else 1):
            self.paths[index] = f"recompiled ({new} new graphs)"
        else:
            self.paths[index] = COMPILED
        self._signatures.add(signature)
        return out
