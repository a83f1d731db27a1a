"""Multi-process training on torch.distributed: the launcher, the process group and what a step needs of it.

    qtune train --nproc-per-node N [--distributed ddp|fsdp] …     starts N workers through torchrun's own API
    torchrun --nproc-per-node N -m qtune train …                    the same, started by hand (multi-node too)

Each worker runs the same `qtune train`. What makes N workers one run (qtune.train uses these):
- data: global micro-batch k is micro_batch_rows(k, rows, N·b, seed), the rows one process with batch N·b
  would take; rank r takes its r-th slice of b rows (`my_rows`).
- loss: each rank divides its sum of token losses by the global count of labelled tokens (all-reduced), and
  the gradients are summed across ranks: the gradient one process computes over the same rows.
- ddp: every rank holds the whole quantized base; the trainable gradients are all-reduced (summed) once per
  optimizer step, in one flat buffer per dtype (`Dist.sum_gradients`). Not torch's DistributedDataParallel
  wrapper: qtune's engine runs the decoder layers itself (not model.forward), so DDP's reducer would never
  see a forward; adapters that add parameters mid-run (LoRA-Dash) or loss terms outside the forward
  (AdaLoRA) need no reducer rebuild either.
- fsdp: FSDP2's fully_shard per decoder layer (qtune.fsdp), so each rank holds 1/N of the quantized base.
- rank 0 writes run.yaml, metrics.jsonl, checkpoints and loss.png; the others wait at barriers.
- threads: each rank gets the machine's cores divided by the ranks on the node (torchrun's default is 1).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qtune.errors import QtuneError

STRATEGIES = ("ddp", "fsdp")
THREADS_ENV = "QTUNE_THREADS_PER_RANK"  # overrides cores / ranks-per-node
STRATEGY_ENV = "QTUNE_DISTRIBUTED"  # the launcher's choice when --distributed was not given (fsdp when the plan says so)
TIMEOUT_ENV = "QTUNE_DIST_TIMEOUT_S"  # collectives' timeout (a rank that died does not hang the others forever)


def under_torchrun() -> bool:
    """Whether this process is a worker started by torchrun (or qtune's launcher, which is torchrun's API)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "LOCAL_RANK" in os.environ)


@dataclass
class Dist:
    """This process's place in the run: rank, world size, strategy (None: one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    strategy: str | None = None
    device: str = "cpu"  # where the small reductions' tensors live: nccl reduces CUDA tensors only

    @property
    def enabled(self) -> bool:
        return self.strategy is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def grad_scale(self) -> int:
        """What each rank multiplies its loss by so that the reduced gradient is the sum over the ranks: ddp
        sums (1); FSDP2's reduce-scatter averages (N)."""
        return self.world if self.fsdp else 1

    def on_main(self, fn, others=None):
        """fn() on rank 0 only; its QtuneError is raised on every rank (none waits forever for it). The
        other ranks return `others`."""
        if not self.enabled:
            return fn()
        result = self._on_rank0(fn)
        return result if self.is_main else others

    def main_first(self, fn):
        """fn() on rank 0, then on the others (it fills caches and files that they then read); a QtuneError
        on rank 0 is raised on every rank."""
        if not self.enabled:
            return fn()
        result = self._on_rank0(fn)
        return result if self.is_main else fn()

    def _on_rank0(self, fn):
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except QtuneError as e:
                error = str(e)
        (error,) = self.broadcast_object((error,))
        if error is not None:
            raise QtuneError(error)
        return result

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64: exact for counts, one rounding for losses)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (a small picklable value made by this code, never read from a file)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """ddp: each trainable tensor's gradient summed over the ranks, in one flat buffer per dtype.

        A tensor that has no gradient on any rank keeps None (the optimizer skips it, as in one process);
        one that has a gradient on some rank gets the sum (zeros where a rank had none)."""
        if self.strategy != "ddp" or not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has)
        live = [p for p, h in zip(params, has.tolist()) if h]
        by_device_dtype: dict = {}
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_device_dtype.setdefault((p.grad.device, p.grad.dtype), []).append(p)
        for group in by_device_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """ddp: rank 0's values of `tensors` (the trainable ones at start) on every rank, as DDP does at wrap."""
        if self.strategy != "ddp":
            return
        for t in tensors:
            dist.broadcast(t.data, src=0)


ONE_PROCESS = Dist()


def setup(strategy: str | None, device_type: str) -> Dist:
    """The process group of a torchrun worker (nccl on CUDA, gloo on the CPU), or ONE_PROCESS outside torchrun.

    strategy: --distributed as given (None: the launcher's choice in $QTUNE_DISTRIBUTED, else ddp)."""
    if not under_torchrun():
        if strategy is not None:
            raise QtuneError(f"--distributed {strategy} needs several processes. Add --nproc-per-node N (qtune starts "
                             "them), or start qtune under torchrun (`torchrun --nproc-per-node N -m qtune train …`).")
        return ONE_PROCESS
    strategy = strategy or os.environ.get(STRATEGY_ENV) or "ddp"
    if strategy not in STRATEGIES:
        raise QtuneError(f"Unknown --distributed {strategy!r}. Use ddp or fsdp.")
    d = Dist(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]),
             local_rank=int(os.environ.get("LOCAL_RANK", 0)), local_world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
             strategy=strategy)
    if device_type == "cuda":
        d.device = f"cuda:{d.local_rank}"
        if d.local_rank >= torch.cuda.device_count():
            raise QtuneError(f"Local rank {d.local_rank} has no GPU: this machine has {torch.cuda.device_count()}. "
                             f"Pass --nproc-per-node {torch.cuda.device_count()} or less.")
        torch.cuda.set_device(d.local_rank)
    else:
        torch.set_num_threads(threads_per_rank(d.local_world))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 600)))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return d


def teardown(d: Dist) -> None:
    """Leave the process group (after the model is gone: train() calls it once _train has returned)."""
    if d.enabled and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def threads_per_rank(local_world: int) -> int:
    """The machine's cores (this process's affinity) divided by the ranks on this node, at least 1."""
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world))


# --- the launcher ---------------------------------------------------------------------------------------

def launch(worker_args: list[str], nproc_per_node: int, nnodes: str = "1", node_rank: int | None = None,
           rdzv_endpoint: str | None = None, rdzv_id: str | None = None, strategy: str | None = None) -> int:
    """Start `python -m qtune <worker_args>` on nproc_per_node processes through torchrun's API
    (torch.distributed.run), with its rendezvous flags for several nodes. Returns the exit code: a worker
    that fails or is killed ends the others (torchrun's elastic agent, no restarts), and the run resumes
    with --resume from its last checkpoint."""
    from torch.distributed.run import get_args_parser, run

    if nproc_per_node < 1:
        raise QtuneError(f"--nproc-per-node must be at least 1, got {nproc_per_node}.")
    if torch.cuda.is_available() and nproc_per_node > torch.cuda.device_count():
        raise QtuneError(f"--nproc-per-node {nproc_per_node} is more than the {torch.cuda.device_count()} GPU(s) of "
                         f"this machine: one process per GPU. Pass --nproc-per-node {torch.cuda.device_count()} or less.")
    args = ["--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes), "--max-restarts", "0"]
    if node_rank is not None:
        args += ["--node-rank", str(node_rank)]
    if rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
        if rdzv_id:
            args += ["--rdzv-id", rdzv_id]
    elif str(nnodes) == "1":
        args += ["--standalone"]  # a free port on this machine
    args += ["-m", "qtune", *worker_args]
    env_threads = os.environ.get(THREADS_ENV)
    if not torch.cuda.is_available() and not env_threads:
        os.environ[THREADS_ENV] = str(threads_per_rank(nproc_per_node))
    if strategy:
        os.environ[STRATEGY_ENV] = strategy
    try:
        run(get_args_parser().parse_args(args))
    except Exception as e:  # noqa: BLE001 - torchrun's ChildFailedError: the workers printed their own errors
        failures = getattr(e, "failures", None)
        codes = sorted({f.exitcode for f in failures.values()}) if failures else [1]
        print(f"qtune: a worker failed (exit code {', '.join(map(str, codes))}); the others were stopped. "
              "The last complete checkpoint is kept: continue with --resume.", file=sys.stderr)
        return 2 if 2 in codes else 1
    finally:
        if env_threads is None:
            os.environ.pop(THREADS_ENV, None)
    return 0
