"""The training loop: one function that reads top to bottom, and the small pieces it uses."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qtune.adapters import adapter_layer_for, adapter_layers, adapter_state_dict, load_adapter_state_dict
from qtune.checkpoint import (complete_checkpoints, load_checkpoint, prune_checkpoints, remove_stale_tmp,
                              save_checkpoint, set_rng_state, unflatten_optimizer_state)
from qtune.config import TrainConfig
from qtune.data import load_splits
from qtune.distributed import ONE_PROCESS, Dist, setup, teardown
from qtune.fsdp import base_bytes_on_rank
from qtune.errors import QtuneError
from qtune.memory import MemoryMeter, configure_host_allocator, current_rss_bytes, peak_rss_bytes
from qtune.adapters.rosa_mask import MASK_FILE, choose_supports, restore_supports
from qtune.engine import causal_lm_loss, engine_of
from qtune.model import build_model, decoder_layers, evaluate
from qtune.precision import resolve_compute_dtype

RESUME_FREE_KEYS = ("output", "max_steps", "offload", "offload_activations", "max_memory", "compile", "hold_layers")  # flags that may differ on --resume (same math)
# may differ on --resume while processes × batch × accumulation (the rows of one optimizer step) stays the same
RESUME_BATCH_KEYS = ("batch_size", "grad_accum")


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- run folder --------------------------------------------------------------------------------

def prepare_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.output)
    if resume:
        if not (run_dir / "run.yaml").is_file():
            raise QtuneError(f"Cannot resume: {run_dir} has no run.yaml. Check --output, or start a new run without --resume.")
        remove_stale_tmp(run_dir)
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise QtuneError(f"Output folder {run_dir} exists and is not empty. Pass --overwrite to replace it, "
                             "--resume to continue it, or choose another --output.")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "run.yaml")
    return run_dir


def resume_config(run_dir: Path, flags: dict) -> TrainConfig:
    """run.yaml is the configuration of a resumed run; differing flags are refused, naming each."""
    from qtune.config import load_run_yaml

    if not (Path(run_dir) / "run.yaml").is_file():
        raise QtuneError(f"Cannot resume: {run_dir} has no run.yaml. Check --output, or start a new run without --resume.")
    values = load_run_yaml(run_dir)
    values.setdefault("packing", "contaminated")  # a run from before --packing attended across its packed examples
    saved = TrainConfig.from_dict(values)
    saved.output = str(run_dir)  # the folder being resumed, wherever the run was first written
    given = TrainConfig.from_dict({**saved.to_dict(), **{k: v for k, v in flags.items() if v is not None}})
    if given.compute_dtype == "auto":  # what it picks on this machine is what must match the run's dtype
        given.compute_dtype = resolve_compute_dtype("auto", compute_device().type)
    diffs = [f"{k}: run has {getattr(saved, k)!r}, flag says {getattr(given, k)!r}" for k in saved.to_dict()
             if k not in RESUME_FREE_KEYS + RESUME_BATCH_KEYS and getattr(saved, k) != getattr(given, k)]
    if diffs:
        raise QtuneError("--resume uses the run's own configuration, and these flags differ from it: "
                         + "; ".join(diffs) + ". Drop those flags, or start a new run with another --output.")
    changed = [k for k in ("max_steps",) + RESUME_BATCH_KEYS if getattr(given, k) != getattr(saved, k)]
    for k in changed:  # batch and accumulation: train() checks the global batch against the checkpoint's
        setattr(saved, k, getattr(given, k))
    if changed:
        saved.save(Path(run_dir) / "run.yaml")
    return saved


# --- optimizer and schedule -------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors; LoRA+ gives B its own learning rate (ratio × lr)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    b_params = [p for n, p in named if n.endswith("lora_B")]
    others = [p for n, p in named if not n.endswith("lora_B")]
    groups = [{"params": others, "lr": cfg.lr}]
    if b_params:
        groups.append({"params": b_params, "lr": cfg.lr * cfg.lora_plus_ratio})
    for g in groups:
        g["initial_lr"] = g["lr"]
    kw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw":
        # torch's fused AdamW: one kernel per tensor instead of ~10 ops; the same update up to rounding order
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in named)
        return torch.optim.AdamW(groups, fused=fused or None, **kw)
    from quant._bnb import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW32bit,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[cfg.optim]
    if cfg.optim.startswith("paged") and not torch.cuda.is_available():
        # bitsandbytes pages optimizer state through CUDA unified memory; without CUDA it keeps the
        # state in ordinary memory (same math, no paging) and says so once per tensor: say it once.
        warnings.warn(f"--optim {cfg.optim}: paging needs CUDA; on this machine the state stays in CPU memory "
                      "(same updates, no paging).", stacklevel=2)
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return cls(groups, **kw)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine/linear/constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# --- data order -------------------------------------------------------------------------------

def micro_batch_rows(index: int, n_rows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of micro-batch `index` in the endless, per-epoch shuffled stream of rows.

    A pure function of (index, n_rows, batch_size, seed): resuming at a saved index replays the
    same order on any machine."""
    out = []
    for s in range(index * batch_size, (index + 1) * batch_size):
        epoch, pos = divmod(s, n_rows)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out.append(int(torch.randperm(n_rows, generator=g)[pos]))
    return torch.tensor(out)


# --- the loop ---------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True,
          distributed: str | None = None) -> dict:
    """Run (or resume) training; returns a summary. Writes run.yaml, metrics.jsonl, checkpoints/, loss.png.

    Under torchrun (qtune train --nproc-per-node N), each worker calls this: `distributed` is ddp or fsdp
    (None: the launcher's choice), and the N processes train as one process with batch N·batch_size
    (qtune.distributed)."""
    device = compute_device()
    d = setup(distributed, device.type)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    try:
        return _train(cfg, resume, overwrite, progress, d, device)
    finally:
        teardown(d)


def returns_freed_memory(cfg: TrainConfig) -> bool:
    """Whether a CPU run gives freed blocks back to the OS at once (qtune.memory.release_freed_memory_promptly): with
    --offload disk, whose streamed weights otherwise stay resident as free arena space. Other runs, --max-memory
    included, keep them for the next step: giving them back made `qtune train --max-memory` run 0.879x the tokens/s
    of the bench worker, which kept them (1.005x once the CLI kept them too), for 0.15-0.2 GiB less peak RSS
    (float32, the bench setting, tools/bench_cli.py --max-memory), which auto's CPU margin covers
    (qtune.plan.auto_cpu_headroom). tools/harness.py asks this function too, so the benchmark runs what
    `qtune train` runs."""
    return cfg.offload == "disk"


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, progress: bool, d: Dist, device: torch.device) -> dict:
    cfg.compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device.type)  # run.yaml holds what "auto" chose
    if d.fsdp:
        from qtune.fsdp import check_supported

        check_supported(cfg)
    run_dir = d.on_main(lambda: prepare_run_dir(cfg, resume, overwrite), Path(cfg.output))
    d.on_main(lambda: warn_if_plan_does_not_fit(cfg, device, d))
    configure_host_allocator(device, rss_bounded=returns_freed_memory(cfg))
    torch.manual_seed(cfg.seed)
    _warm_up_libraries()
    meter = MemoryMeter(device)  # its baseline: the heap before the model exists
    # rank 0 fills the quantized cache (and writes an initialiser's base into the run folder); then the
    # others read what it wrote instead of quantizing the same model again
    model, tokenizer, model_dir, init_report = d.main_first(
        lambda: build_model(cfg, run_dir, progress=progress and d.is_main, meter=meter))
    if not d.fsdp:  # fsdp: the model stays in host memory until each layer's shard goes to the device (qtune.fsdp)
        model.to(device)
    train_rows, eval_rows, stats = load_splits(cfg.data, cfg.eval_data, tokenizer, cfg.seq_len,
                                               seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows, packing=cfg.packing)
    check_vocab(train_rows, eval_rows, model)
    micro = cfg.batch_size * d.world  # rows of one global micro-batch
    if not resume or not (run_dir / MASK_FILE).is_file():  # RoSA layers (if any) get their sparse support
        def choose():  # (fsdp: on the model in host memory, before it is sharded)
            mask_batches = ({k: v.to(next(model.parameters()).device) for k, v in _rows_dict(train_rows, micro_batch_rows(
                k, len(train_rows), micro, cfg.seed)).items()} for k in range(cfg.rosa_mask_steps))
            return choose_supports(model, mask_batches, cfg.rosa_density, run_dir, engine_of(model).mean_loss)

        d.on_main(choose)  # chosen once, on rank 0, over the global micro-batches; the others read its file
        if not d.is_main:
            restore_supports(model, run_dir)
    d.broadcast_tensors(_trainable(model))  # every rank starts from rank 0's adapters (as DDP does)
    if d.fsdp:
        from qtune.fsdp import shard_model

        shard_model(model, d, device)
    micro_per_epoch = math.ceil(len(train_rows) / micro)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.lr_scheduler))
    meter.attach(decoder_layers(model))
    over_limit_warned = False
    metrics_path = run_dir / "metrics.jsonl"

    def log(record: dict) -> None:  # metrics.jsonl is rank 0's
        if d.is_main:
            _log(metrics_path, record)

    step, micro_index = 0, 0
    if resume and complete_checkpoints(run_dir):
        step, micro_index = _restore(complete_checkpoints(run_dir)[-1], model, optimizer, scheduler, cfg, d)
        d.on_main(lambda: _truncate_metrics(metrics_path, step))
    elif resume:
        d.on_main(lambda: _truncate_metrics(metrics_path, 0))
    layers = adapter_layers(model)
    method_cls = adapter_layer_for(cfg.method)
    method_cls.start_training(layers, total_steps, run_dir if d.is_main else None)  # files: rank 0's
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log({"event": "start", "step": step, "trainable_params": trainable, "total_steps": total_steps,
         "data": vars(stats), "packing": cfg.packing, "model_dir": str(model_dir), "device": str(device),
         "world_size": d.world, "distributed": d.strategy, "global_batch": micro * cfg.grad_accum,
         "quantized_base_bytes_per_rank": int(d.max([base_bytes_on_rank(model)])[0]),
         "threads_per_rank": torch.get_num_threads() if device.type == "cpu" else None,
         "init_report": init_report})
    if step == 0:
        log({"step": 0, "eval_loss": evaluate(model, eval_rows, cfg.batch_size, cfg.eval_batches, d)})

    model.train()
    start_step = step
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not (progress and d.is_main))
    last_loss = float("nan")
    while step < total_steps:
        meter.begin_step(step + 1)
        t0 = time.perf_counter()
        batches = [my_rows(micro_batch_rows(micro_index + k, len(train_rows), micro, cfg.seed), d)
                   for k in range(cfg.grad_accum)]
        micro_batches = [{k: t[rows].to(device) for k, t in (("input_ids", train_rows.input_ids),
                                                             ("segment_ids", train_rows.segment_ids),
                                                             ("labels", train_rows.labels))} for rows in batches]
        result = train_step(model, optimizer, scheduler, micro_batches, cfg.max_grad_norm, d)
        last_loss = result["loss"]
        if not math.isfinite(last_loss):
            kept = complete_checkpoints(run_dir)
            raise QtuneError(f"The loss became {last_loss} at step {step + 1}; training stopped. "
                             f"{'The last good checkpoint is ' + str(kept[-1]) if kept else 'No checkpoint was written'}. "
                             "Lower --lr (or raise --warmup-steps) and resume or restart.")
        micro_index += cfg.grad_accum
        step += 1
        dt = time.perf_counter() - t0
        n_input = result["tokens"]
        peak_rss = peak_rss_bytes()
        record = {"step": step, "loss": last_loss, "lr": result["lr"],
                  "tokens_per_s": n_input / dt, "step_time_s": dt, "tokens": n_input,
                  "label_tokens": result["label_tokens"], "grad_norm": result["grad_norm"],
                  "peak_memory_bytes": meter.peak_bytes(), "peak_rss_bytes": peak_rss}
        if d.enabled:  # the largest rank's memory: what each of the machine's devices must hold
            record["peak_memory_bytes"], record["peak_rss_bytes"] = (
                int(v) for v in d.max([record["peak_memory_bytes"], peak_rss]))
        log(record)
        if step == start_step + 1:  # which path each decoder layer ran, measured (qtune.engine)
            log(model.qtune_engine.execution_report(step))
        used = record["peak_memory_bytes"] if device.type == "cuda" else record["peak_rss_bytes"]  # what the limit bounds
        if cfg.max_memory > 0 and not over_limit_warned and used > cfg.max_memory * 2**30 and d.is_main:
            over_limit_warned = True
            warnings.warn(f"step {step}: peak {'memory' if device.type == 'cuda' else 'RSS'} {used / 2**30:.2f} GiB "
                          f"is over --max-memory "
                          f"{cfg.max_memory:g} GiB (the plan said it would fit: please report it). Lower --batch-size "
                          "or --seq-len, or use --offload disk.", stacklevel=2)
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{n_input / dt:.0f}")
        bar.update()
        final = step == total_steps
        if final or (cfg.eval_every and step % cfg.eval_every == 0):
            log({"step": step, "eval_loss": evaluate(model, eval_rows, cfg.batch_size, cfg.eval_batches, d)})
            reported = method_cls.report(layers)
            if reported is not None:
                log({"event": "method", "step": step, "method": cfg.method, **reported})
        if final or (cfg.save_every and step % cfg.save_every == 0):
            adapter, optim_state = full_state(model, optimizer, d)  # fsdp: gathered from the shards (collective)
            trainer = {"step": step, "micro_index": micro_index, "total_steps": total_steps, "world_size": d.world,
                       "global_batch": micro * cfg.grad_accum, "rows_seen": micro_index * micro}

            def save():
                save_checkpoint(run_dir / "checkpoints" / f"step-{step:06d}", adapter, optimizer, trainer, scheduler,
                                optimizer_state=optim_state)
                prune_checkpoints(run_dir, cfg.keep_checkpoints)

            d.on_main(save)
    bar.close()
    meter.detach()
    summary = d.on_main(lambda: summarize(metrics_path))
    d.on_main(lambda: plot_loss(metrics_path, run_dir / "loss.png"))
    return summary


def my_rows(rows: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's slice of a global micro-batch's rows (all of them in one process)."""
    b = len(rows) // d.world
    return rows[d.rank * b:(d.rank + 1) * b]


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> tuple[dict, dict | None]:
    """(the adapter's tensors, the optimizer's state_dict or None for optimizer.state_dict()), unsharded."""
    if d.fsdp:
        from qtune.fsdp import full_adapter_state, full_optimizer_state

        return full_adapter_state(model), full_optimizer_state(model, optimizer)
    return adapter_state_dict(model), None


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, micro_batches: list[dict],
               max_grad_norm: float = 0.0, d: Dist = ONE_PROCESS) -> dict:
    """One optimizer step over `micro_batches` (dicts of input_ids, segment_ids, labels on the model's
    device): the loss is the mean over all their labelled tokens (plus the adapters' extra loss terms),
    then gradient clipping, the update, the schedule and the adapters' after-step hooks.
    Returns {"loss", "lr", "grad_norm", "tokens", "label_tokens"}; used by train() and by tools/.

    Several processes (d): each holds its slice of the micro-batches; the labelled tokens are counted over
    all ranks, each rank's loss is divided by that global count and the gradients are summed, so the step
    is the one process's over all the rows; tokens and loss are the global ones."""
    n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    n_input = sum(int((b["segment_ids"] > 0).sum()) for b in micro_batches)
    n_labels, n_input = (int(v) for v in d.sum([n_labels, n_input]))
    layers = adapter_layers(model)
    adapters = list(layers.values())
    loss_sum = 0.0
    with engine_of(model).parameters_fixed():  # until optimizer.step(): QDoRA's norms are computed once
        for b in micro_batches:
            loss, _ = causal_lm_loss(model, b["input_ids"], b["segment_ids"], b["labels"])
            (loss / max(n_labels, 1) * d.grad_scale).backward()  # × 1 is exact: one process as before
            loss_sum += loss.item()
    (loss_sum,) = d.sum([loss_sum])
    extra = [t for t in (a.extra_loss() for a in adapters) if t is not None]
    if extra:  # the same term on every rank: each contributes 1/N of its gradient
        extra_sum = torch.stack([t.float() for t in extra]).sum()
        (extra_sum * (d.grad_scale / d.world)).backward()
        loss_sum += extra_sum.item() * max(n_labels, 1)
    d.sum_gradients(_trainable(model))  # ddp; fsdp reduce-scatters in backward
    mean = loss_sum / max(n_labels, 1)
    grad_norm = None
    if math.isfinite(mean) and max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(_trainable(model), max_grad_norm))
    lr = optimizer.param_groups[0]["lr"]  # the rate this step used
    if math.isfinite(mean):
        optimizer.step()
        scheduler.step()
        for kind in {type(a) for a in adapters}:  # each method's hook, with all its layers
            kind.after_step({n: a for n, a in layers.items() if type(a) is kind}, scheduler.last_epoch)
    optimizer.zero_grad(set_to_none=True)
    return {"loss": mean, "lr": lr, "grad_norm": grad_norm, "tokens": n_input, "label_tokens": n_labels}


def check_vocab(train_rows, eval_rows, model) -> None:
    """Token ids must index the model's embedding: a tokenizer from another model is caught here."""
    vocab = model.get_input_embeddings().weight.shape[0]
    top = max(int(b.input_ids.max()) if len(b) else -1 for b in (train_rows, eval_rows))
    if top >= vocab:
        raise QtuneError(f"The tokenizer produces token id {top}, but the model's embedding has only {vocab} rows: "
                         "the tokenizer does not belong to this model. Put the model's own tokenizer files in its folder.")


def device_memory_bytes(device: torch.device) -> int:
    """What the device has: the GPU's total memory, or the machine's physical RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def warn_if_plan_does_not_fit(cfg: TrainConfig, device: torch.device, d: Dist = ONE_PROCESS) -> None:
    """Before loading anything: if the memory plan (of one rank) exceeds the device, say so and what would fit."""
    from qtune.plan import plan_memory, suggestions

    try:
        plan = plan_memory(cfg, device.type, world=d.world, strategy=d.strategy)
    except Exception:  # noqa: BLE001 - the plan is advice; a problem with the model is reported by loading it
        return
    need, have = plan.total_bytes + plan.overhead_bytes, device_memory_bytes(device)
    if cfg.max_memory > 0:
        # on CPU the limit bounds the process's RSS, which also holds the libraries already loaded
        runtime = current_rss_bytes() if device.type == "cpu" else 0
        limit = int(cfg.max_memory * 2**30)
        if need + runtime > limit:
            tips = "; ".join(suggestions(cfg, limit - runtime, device.type, d.world, d.strategy)[:3])
            raise QtuneError(f"qtune plan predicts {need / 2**30:.2f} GiB for this run"
                             + (f" (+ {runtime / 2**30:.2f} GiB of loaded libraries)" if runtime else "")
                             + f", over --max-memory {cfg.max_memory:g} GiB. Would fit better: {tips}. "
                             "See `qtune plan` with the same flags.")
        return
    if need > have:
        tips = "; ".join(suggestions(cfg, have, device.type, d.world, d.strategy)[:3])
        warnings.warn(f"qtune plan predicts {need / 2**30:.1f} GiB for this run, more than the {have / 2**30:.1f} GiB "
                      f"this {device.type} has: it will probably run out of memory. Would fit better: {tips}. "
                      "See `qtune plan` with the same flags.", stacklevel=2)


def _rows_dict(blocks, rows: torch.Tensor) -> dict:
    return {"input_ids": blocks.input_ids[rows], "segment_ids": blocks.segment_ids[rows],
            "labels": blocks.labels[rows]}


def _warm_up_libraries() -> None:
    """Import what loading uses, so that its module-level allocations precede the meter's baseline."""
    import transformers.models.llama.modeling_llama  # noqa: F401
    from quant import quantize

    quantize(torch.randn(64, 64))


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _restore(ckpt: Path, model, optimizer, scheduler, cfg: TrainConfig, d: Dist = ONE_PROCESS) -> tuple[int, int]:
    """Load a checkpoint into the model, optimizer and schedule; (step, micro-batch index in this run's units).

    Another number of processes, batch or accumulation resumes the same stream of rows if and only if the
    rows of one optimizer step (processes × batch × accumulation) are unchanged; else it is refused."""
    state = load_checkpoint(ckpt)
    trainer = state["trainer"]
    micro = cfg.batch_size * d.world
    saved_batch = trainer.get("global_batch")  # None: a checkpoint from before several processes (micro_index is ours)
    if saved_batch is not None and saved_batch != micro * cfg.grad_accum:
        raise QtuneError(f"Cannot resume {ckpt.parent.parent}: it was trained with {saved_batch} rows per optimizer step "
                         f"({trainer.get('world_size', 1)} process(es) × batch × accumulation), and this run has "
                         f"{micro * cfg.grad_accum} ({d.world} × --batch-size {cfg.batch_size} × --grad-accum "
                         f"{cfg.grad_accum}). Choose --nproc-per-node, --batch-size and --grad-accum whose product is "
                         f"{saved_batch}, or start a new run.")
    rows_seen = trainer.get("rows_seen")
    micro_index = int(trainer["micro_index"]) if rows_seen is None else int(rows_seen) // micro
    if d.fsdp:
        from qtune.fsdp import load_full_state

        load_full_state(model, optimizer, state["adapter"],
                        unflatten_optimizer_state(state["optimizer_tensors"], trainer["optimizer"]))
    else:
        load_adapter_state_dict(model, state["adapter"])
        optimizer.load_state_dict(unflatten_optimizer_state(state["optimizer_tensors"], trainer["optimizer"]))
    if trainer.get("scheduler"):
        scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(state["rng"])
    return int(trainer["step"]), micro_index


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines after `step` (a resumed run appends from its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line torn by a kill or a full disk
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarize(path: Path) -> dict:
    rows = read_metrics(path)
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    times = [r["step_time_s"] for r in train_rows[1:]] or [r["step_time_s"] for r in train_rows]
    return {"steps": train_rows[-1]["step"] if train_rows else 0,
            "first_loss": train_rows[0]["loss"] if train_rows else None,
            "last_loss": train_rows[-1]["loss"] if train_rows else None,
            "eval_loss_before": evals[0]["eval_loss"] if evals else None,
            "eval_loss_after": evals[-1]["eval_loss"] if evals else None,
            "median_step_s": sorted(times)[len(times) // 2] if times else None,
            "median_tokens_per_s": sorted(r["tokens_per_s"] for r in train_rows)[len(train_rows) // 2] if train_rows else None,
            "peak_memory_bytes": max((r["peak_memory_bytes"] for r in train_rows), default=None)}


def plot_loss(metrics: Path, out: Path) -> None:
    """loss.png: training loss per step and held-out loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean per-token loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
