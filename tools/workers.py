"""The worker processes of the benchmarks: one training run each, qtune's (harness.QtuneRun) or the
peer's (transformers + bitsandbytes + PEFT), and the worker's side of the lockstep protocol.

Every (side, method) run is its own process, `tools/bench_peft.py --worker SIDE METHOD --work DIR
--result FILE --model-dir DIR --steps N --warmup N [--threads N] [--compute-dtype DTYPE]
[--lockstep-ack-fd FD]` (worker_main): it reads DIR/data.safetensors (harness.prepare_data), trains,
and writes a JSON result (step_times_s, step_tokens, train_losses, heldout_before/after, setup_s,
setup_peak_rss_bytes, train_peak_rss_bytes, peak_rss_bytes, ...). That command line, the data file
and the result are a protocol between checkouts: tools/bench_methods.py --against-tree runs another
checkout's own tools/bench_peft.py with it (older checkouts have nothing else), so keep all three
compatible. Under --lockstep-ack-fd the worker writes b"r" on that fd once loaded, then before each
step waits for a line on stdin and after it writes b"d" (LockstepGate), outside the timed region.
The parent's side (worker_command, start_gated_worker, run_worker) is in tools/harness.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from qtune.memory import peak_rss_bytes  # VmHWM: ru_maxrss would carry over the parent's peak

if __package__:  # tools.workers: python -m tools.bench_peft, or imported as tools.bench_peft
    from tools import harness as h
else:  # python tools/bench_peft.py --worker ...: how every checkout's workers are started, with
    import harness as h  # this file's folder first on sys.path


# --- one training run: the timed loop (under the lockstep gate), qtune's side ------------------

class LockstepGate:
    """A worker's side of a lockstep run (tools/bench_methods.py): before each step it waits for the
    parent's go (a line on stdin), after it says done (a byte on the ack pipe), outside the timed region.
    So two workers' steps alternate one by one and each pair of steps sees the same machine."""

    def __init__(self, ack_fd: int):
        self.ack_fd = ack_fd

    def ready(self) -> None:
        os.write(self.ack_fd, b"r")

    def wait(self) -> None:
        if not sys.stdin.readline():
            raise SystemExit("lockstep: the parent went away")

    def done(self) -> None:
        os.write(self.ack_fd, b"d")


def train_loop(step_fn, data: dict, warmup: int, steps: int, gate: LockstepGate | None = None) -> dict:
    """Run warmup + steps steps of step_fn(input_ids, attention_mask, labels) -> loss; time the last `steps`
    (under a gate, each step waits for the parent's go, untimed). A step's time covers slicing its rows,
    forward, backward, clipping, the optimizer step and zero_grad."""
    order = data["order"]  # (warmup + steps, batch) row indices
    ids_all, mask_all, lab_all = data["input_ids"], data["attention_mask"], data["labels"]
    times, tokens, losses = [], [], []
    if gate is not None:
        gate.ready()
    for s in range(warmup + steps):
        if gate is not None:
            gate.wait()
        t0 = time.perf_counter()
        rows = order[s]
        ids, mask, labels = ids_all[rows], mask_all[rows], lab_all[rows]
        n_input = int(mask.sum())
        loss = step_fn(ids, mask, labels)
        dt = time.perf_counter() - t0
        if gate is not None:
            gate.done()
        losses.append(loss)
        if s >= warmup:
            times.append(dt)
            tokens.append(n_input)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {s + 1}")
    if gate is not None:
        gate.wait()  # the parent's release once every worker has stepped: no one's scoring runs beside another's last step
    return {"step_times_s": times, "step_tokens": tokens, "train_losses": losses}


RECOMPUTE_ENV = "QTUNE_BENCH_RECOMPUTE"  # a qtune worker's --recompute (tools/bench_methods.py --recompute)
MAX_MEMORY_ENV = "QTUNE_BENCH_MAX_MEMORY"  # a qtune worker's --max-memory in GiB (tools/bench_peft.py --max-memory)
DTYPE_ENV = "QTUNE_BENCH_COMPUTE_DTYPE"  # a qtune worker's --compute-dtype, over the command line's (bench_methods --dtype)


def qtune_overrides() -> dict:
    """The qtune worker's config overrides that the parent passed through the environment."""
    overrides = {}
    if os.environ.get(RECOMPUTE_ENV):
        overrides["recompute"] = os.environ[RECOMPUTE_ENV]
    if os.environ.get(MAX_MEMORY_ENV):
        overrides["max_memory"] = float(os.environ[MAX_MEMORY_ENV])
    return overrides


def worker_qtune(method: str, data: dict, work: Path, warmup: int, steps: int, compute_dtype: str = "bfloat16",
                 gate: LockstepGate | None = None) -> dict:
    from qtune.errors import QtuneError

    compute_dtype = os.environ.get(DTYPE_ENV) or compute_dtype
    try:
        run = h.QtuneRun(method, data, work, warmup + steps, compute_dtype, **qtune_overrides())
    except QtuneError as e:
        if "not available" in str(e):
            return {"unavailable": str(e)}
        raise
    before = run.heldout(data)
    # the bench's rows are plain-text windows, one document each: their attention mask is their segment ids
    res = train_loop(lambda ids, mask, labels: run.step({"input_ids": ids, "segment_ids": mask,
                                                         "labels": labels})["loss"], data, warmup, steps, gate)
    res["execution"] = run.execution()  # which path the layers ran: a speed figure must say
    train_rss = peak_rss_bytes()
    after = run.heldout(data)
    run.close()
    return {**res, "setup_s": run.setup_s, "setup_peak_rss_bytes": run.setup_peak_rss_bytes,
            "train_peak_rss_bytes": train_rss, "heldout_before": before, "heldout_after": after,
            "trainable_params": run.trainable_params(), "peak_heap_bytes": run.meter.peak_bytes()}


# --- the peer's side: transformers + bitsandbytes + PEFT ---------------------------------------

def _bnb_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(r=h.RANK, lora_alpha=h.ALPHA, lora_dropout=0.0, target_modules=list(h.TARGETS), bias="none",
                      task_type="CAUSAL_LM", **kw)


def prep_peer_pissa(model_dir: Path, out: Path) -> dict:
    """PEFT's QPiSSA preprocessing (examples/pissa_finetuning): PiSSA on the fp32 model, then save the
    adapter (as pissa_init/, marked to load as-is) and the residual model (unload())."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(h.SEED)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, _lora_config(init_lora_weights="pissa_niter_4"))
    peft_model.peft_config["default"].init_lora_weights = True  # reload A, B as saved, no second SVD
    peft_model.save_pretrained(out / "pissa_init")
    residual = peft_model.unload()
    residual.save_pretrained(out)
    return {"prep_s": time.perf_counter() - t0, "prep_peak_rss_bytes": peak_rss_bytes()}


def worker_peer(method: str, data: dict, model_dir: Path, pissa_dir: Path | None, warmup: int, steps: int,
                compute_dtype: str = "bfloat16", gate: LockstepGate | None = None) -> dict:
    """The peer's run. bfloat16: a bf16 model under autocast bf16 (the issue's pinned setting); float32:
    an fp32 model and bnb compute dtype, no autocast."""
    import torch
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, compute_dtype)
    autocast = dtype == torch.bfloat16
    torch.manual_seed(h.SEED)
    ckpt = {"use_reentrant": False}
    t0 = time.perf_counter()
    if method == "lora16":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        model = get_peft_model(model, _lora_config())
    elif method == "qpissa":
        model = AutoModelForCausalLM.from_pretrained(pissa_dir, quantization_config=_bnb_config(dtype), dtype=dtype)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=ckpt)
        model = PeftModel.from_pretrained(model, pissa_dir, subfolder="pissa_init", is_trainable=True)
    elif method in ("qlora", "qdora"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=_bnb_config(dtype), dtype=dtype)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=ckpt)
        model = get_peft_model(model, _lora_config(use_dora=method == "qdora"))
    else:
        raise SystemExit(f"no peer for method {method!r}")
    model.config.use_cache = False
    setup_s = time.perf_counter() - t0
    setup_rss = peak_rss_bytes()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=h.LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    before = h.heldout_loss(model, data, autocast=autocast)
    model.train()  # from_pretrained returns eval mode

    def step(ids, mask, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, h.MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    res = train_loop(step, data, warmup, steps, gate)
    train_rss = peak_rss_bytes()
    after = h.heldout_loss(model, data, autocast=autocast)
    return {**res, "setup_s": setup_s, "setup_peak_rss_bytes": setup_rss, "train_peak_rss_bytes": train_rss,
            "heldout_before": before, "heldout_after": after, "trainable_params": sum(p.numel() for p in trainable)}


# --- the worker process ------------------------------------------------------------------------

def worker_main(args) -> None:
    """A worker process (`tools/bench_peft.py --worker SIDE METHOD ...`, see the module docstring).
    SIDE prep: once per benchmark, before any timed run (METHOD qtune-cache: fill qtune's quantized
    cache, as any first `qtune train` does; qpissa: the peer's PiSSA preprocessing)."""
    h.quiet_bitsandbytes()
    import torch

    gate = LockstepGate(args.lockstep_ack_fd) if args.lockstep_ack_fd is not None else None
    if args.threads:
        torch.set_num_threads(args.threads)
    side, method = args.worker
    work = Path(args.work)
    if side == "prep":
        if method == "qtune-cache":
            from qtune.loader import QuantSpec, load_model

            load_model(Path(args.model_dir), QuantSpec(4, "nf4", True), getattr(torch, args.compute_dtype),
                       progress=False)  # the cache is keyed by the compute dtype
            out = {"peak_rss_bytes": peak_rss_bytes()}
        else:
            out = prep_peer_pissa(Path(args.model_dir), work / "peer_pissa")
    else:
        data = h.load_data(work)
        t0 = time.perf_counter()
        if side == "qtune":
            out = worker_qtune(method, data, work, args.warmup, args.steps, args.compute_dtype, gate)
        else:
            out = worker_peer(method, data, Path(args.model_dir), work / "peer_pissa", args.warmup, args.steps,
                              args.compute_dtype, gate)
        out["wall_s"] = time.perf_counter() - t0
    out.update(side=side, method=method, peak_rss_bytes=peak_rss_bytes(), threads=torch.get_num_threads())
    Path(args.result).write_text(json.dumps(out))
