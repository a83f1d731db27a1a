"""Peak memory of a training run, on any device.

- CUDA: torch.cuda.max_memory_allocated — the peak bytes of live tensors, exact.
- CPU: torch has no allocator statistics for host memory, so we sample glibc's count of heap bytes
  in use (mallinfo2: small-block arenas + mmap'd large blocks; torch's CPU tensors are allocated
  there) at every decoder layer's forward entry and exit (which, with gradient checkpointing, also
  fires during the backward recomputation) and at step boundaries. That is the live heap, i.e.
  tensors plus the interpreter's own objects; the process's peak RSS is reported alongside.
  Where mallinfo2 is unavailable (non-glibc), peak RSS is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import resource
import sys

import torch
from torch import nn

from quant.linear import MEMORY_PROBES


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
        fn.restype = _MallInfo2
        fn()
        return fn
    except (OSError, AttributeError):
        return None


_mallinfo2 = _load_mallinfo2() if sys.platform.startswith("linux") else None


def heap_in_use_bytes() -> int:
    """Bytes the process's heap has handed out and not freed (0 if unknown)."""
    if _mallinfo2 is None:
        return 0
    info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


def current_rss_bytes() -> int:
    """The process's resident set size now (Linux; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)


def _mallopt(*settings: tuple[int, int]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(bool(libc.mallopt(param, value)) for param, value in settings)
    except (OSError, AttributeError):
        return False


def keep_freed_memory_for_reuse(trim_threshold: int = 256 * 2**20, mmap_threshold: int = 32 * 2**20) -> bool:
    """Make glibc keep the memory a training step frees at the top of its heap (up to
    `trim_threshold` bytes) for the next step's same-sized tensors, instead of handing it back to the
    OS and faulting fresh zeroed pages in again.

    By default glibc raises its mmap threshold to each large block freed (capped at 32 MiB) and trims
    the heap's top once more than twice that threshold is free, so every step gave its blocks back and
    faulted fresh zeroed pages in again (docs/benchmarks.md). Here the mmap threshold is fixed at that
    32 MiB cap (blocks above it are mapped and unmapped as before; a larger threshold let torch's
    aligned allocations miss the freed holes and grow RSS a block a round) and only the trimming waits
    until `trim_threshold` is free. Peak RSS stays what it was: a step's largest live
    set is the same, and its memory is only not given back between steps. Used for CPU runs whose
    RSS is not bounded (qtune.train); with --offload disk or --max-memory,
    release_freed_memory_promptly instead. Returns False where there is no glibc (nothing changed)."""
    return _mallopt((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold))


def configure_host_allocator(device: torch.device, rss_bounded: bool) -> bool:
    """The allocator policy of a training run: on CPU, give freed memory back promptly where RSS is
    bounded (--max-memory, --offload disk), else keep it for reuse; nothing on an accelerator."""
    if device.type != "cpu":
        return False
    return release_freed_memory_promptly() if rss_bounded else keep_freed_memory_for_reuse()


def release_freed_memory_promptly(threshold: int = 4 * 2**20, arenas: int = 2) -> bool:
    """Make glibc give freed host memory back to the OS instead of keeping it for reuse (CPU runs
    with --offload disk or --max-memory, where RSS is what is bounded).

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB),
    so the multi-MiB tensors a step allocates and frees (streamed weights, activations) end up in
    its arenas, where freed space stays resident (a large share of the RSS of a model streamed from
    disk: docs/benchmarks.md). A fixed threshold sends every block of ≥ `threshold` bytes to its own
    mapping, unmapped on free, and fewer arenas fragment less; the cost is page faults on fresh
    mappings. Returns False where there is no glibc (nothing changed)."""
    return _mallopt((M_MMAP_THRESHOLD, threshold), (M_ARENA_MAX, arenas))


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far.

    On Linux this is /proc/self/status's VmHWM, the high-water mark of this program's own address
    space. getrusage's ru_maxrss is not: the kernel carries it over from the parent across exec (and a
    vfork'ed child starts from the parent's mark), so `qtune train` launched from a large Jupyter or
    pytest process would report at least that process's peak (tests/test_plan.py shows it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class MemoryMeter:
    """Tracks peak memory; `peak_bytes()` is what metrics.jsonl logs as peak_memory_bytes."""

    # A CPU sample walks the allocator's bins, and a step takes hundreds: sampling every step would
    # cost a noticeable share of it. Steps repeat the same shapes, so the meter samples the first SAMPLED_STEPS steps and every
    # SAMPLE_EVERY-th one after; the other steps cost one sample at their end.
    SAMPLED_STEPS, SAMPLE_EVERY = 3, 50

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            gc.collect()  # garbage from before the run is not the run's, and freed during it would sink the readings
        self.baseline = heap_in_use_bytes() if self.device.type != "cuda" else 0
        self.peak = 0
        self.active = True
        self._handles = []

    def begin_step(self, step: int) -> None:
        """Before step `step` (1-based): whether its layers, linears and loss chunks are sampled."""
        self.active = step <= self.SAMPLED_STEPS or step % self.SAMPLE_EVERY == 0

    def attach(self, layers: list[nn.Module]) -> "MemoryMeter":
        """Sample at each decoder layer's forward entry and exit (also during recomputation), in
        every quantized linear's forward and backward (with its dequantized weight alive), and in
        each cross-entropy chunk (qtune.model calls `probe()`)."""
        if self.device.type != "cuda":
            for layer in layers:
                self._handles.append(layer.register_forward_pre_hook(lambda *a: self.sample()))
                self._handles.append(layer.register_forward_hook(lambda *a: self.sample()))
            MEMORY_PROBES.append(self.sample)
        return self

    def sample(self) -> None:
        if self.active:
            self._sample()

    def _sample(self) -> None:
        if self.device.type == "cuda":
            return
        in_use = heap_in_use_bytes()
        # below the baseline, heap that was there before the run has been freed (a garbage collection): the rest of
        # the run is measured from here, or its readings would stay at or under zero
        self.baseline = min(self.baseline, in_use)
        self.peak = max(self.peak, in_use - self.baseline)

    @contextlib.contextmanager
    def excluding(self):
        """Heap that the block allocates and keeps is not counted: host objects that are no tensors
        of the run (the tokenizer's vocabulary tables), which a CUDA meter would not see either."""
        before = heap_in_use_bytes()
        try:
            yield
        finally:
            if self.device.type != "cuda":
                self.baseline += max(0, heap_in_use_bytes() - before)

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        self._sample()
        return self.peak if _mallinfo2 is not None else peak_rss_bytes()  # the process's peak where the heap is unknown

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.sample in MEMORY_PROBES:
            MEMORY_PROBES.remove(self.sample)


def probe() -> None:
    """Let every attached meter sample now (call where a large temporary is alive)."""
    for fn in MEMORY_PROBES:
        fn()
