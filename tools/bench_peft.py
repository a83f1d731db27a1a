"""qtune against the peer stack (transformers + bitsandbytes NF4 + PEFT), side by side, alternating.

    python tools/bench_peft.py                                   # all methods, 20 timed steps, 2 repeats
    python tools/bench_peft.py --methods qlora --steps 40 --repeats 3
    python tools/bench_peft.py --compute-dtype float32           # both sides in fp32: CPUs without bf16 kernels

Setting (both sides): SmolLM2-135M-Instruct, the first --plays Shakespeare training plays, seq 256 ×
batch 4, rank 16 on all 7 linears of every decoder layer, alpha 16 (scale 1), dropout 0, gradient
checkpointing (non-reentrant), bf16 compute, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), lr
2e-4 constant with no warmup, gradient-norm clipping at 1.0 (qtune's default, applied on both sides).

--compute-dtype float32 (for CPUs without bf16 GEMM kernels, such as AVX2-only x86, where a bf16 step
takes minutes: tools/bench_dtype.py): both sides compute in fp32. qtune runs --compute-dtype float32 (what
its default `auto` picks on such a CPU); the peer loads its model in fp32 with bnb_4bit_compute_dtype
float32 and runs without autocast (lora16's peer: the fp32 base; qtune's lora16 then keeps its 16-bit
path's base in fp32 too). The GEMM rate is then fp32's, and the results go to bench_peft_fp32.* so the
bf16 table stays.

Methods and their peers:
    qlora   qtune --method qlora            | PEFT LoRA on a bitsandbytes NF4 (double-quant) base
    qdora   qtune --method qdora            | PEFT LoRA use_dora=True on the same base
    qpissa  qtune --method qpissa           | PEFT PiSSA (init_lora_weights="pissa_niter_4") computed on
                                              the fp32 model, residual saved and reloaded in NF4 + the
                                              saved adapter (PEFT's examples/pissa_finetuning recipe)
    qrosa   qtune --method qrosa            | no peer: compared with qtune's own qlora
    lora16  qtune --method qlora --bits 16  | PEFT LoRA on the bf16 base (no quantization)

How it measures:
  * Every (side, method) run is its own process (`--worker SIDE METHOD`), so its peak RSS (VmHWM) is that
    run's own. For each method the parent runs qtune, peer, qtune, peer, ... (--repeats pairs), and
    reports medians over runs and the median over pairs of the per-pair ratio qtune/peer.
  * Same tokens: the parent tokenizes once (qtune.data.load_splits on symlink folders of the plays and
    of the held-out works, Hamlet + Sonnets) and hands both sides the same token rows, the same
    micro-batch order (qtune.train.micro_batch_rows, seed 0) and the same held-out rows.
  * Steps: --warmup untimed steps, then --steps timed ones; a step's wall time covers slicing its rows,
    forward, backward, clipping, the optimizer step and zero_grad. tokens/s = non-pad tokens / time.
  * Held-out loss, before training and after the last step, is ONE function (heldout_loss) for both
    sides: row by row, model(input_ids, attention_mask).logits → fp32 → mean next-token cross-entropy
    over the labelled tokens. Both models are kept in train mode (dropout is 0, so that equals eval
    mode) under torch.no_grad: bitsandbytes' CPU Linear4bit, in eval mode with an input that needs no
    grad, repacks its weight for a fused kernel and asserts out_features % 32 == 0 on AVX512-bf16
    CPUs, which some of this model's layers break.
  * The qtune side is qtune.model.build_model + the body of qtune.train.train's step (causal_lm_loss,
    backward of loss / labelled tokens, clip_grad_norm_, make_optimizer's AdamW, LambdaLR(lr_factor),
    the MemoryMeter hooks); only metric logging and checkpointing are left out. qtune's quantized
    cache is filled before the first timed run (as after any first `qtune train`), and qpissa's
    randomized SVD runs inside the qtune run (qtune does it while loading). The peer's PiSSA
    preprocessing (fp32 model + SVD + save) is PEFT's separate step: it runs once in its own process,
    and its time and peak RSS are reported apart from the training runs.
  * Speed limit: this machine's GEMM rate in the compute dtype (median of 5 timed 2048×2048×2048 matmuls, at the
    start and at the end of the benchmark) and the step's useful FLOPs (see step_flops) give
    fraction of limit = FLOPs / (s/step × GEMM rate).

Writes tools/results/bench_peft.md (table), bench_peft.png (chart) and bench_peft.json (raw numbers);
bench_peft_fp32.* under --compute-dtype float32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qtune.memory import peak_rss_bytes  # VmHWM: ru_maxrss would carry over the parent's peak

METHODS = ("qlora", "qdora", "qpissa", "qrosa", "lora16")
PEERLESS = {"qrosa": "qlora"}  # method -> the qtune method it is compared with instead
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ_LEN, BATCH, RANK, ALPHA, LR, MAX_GRAD_NORM, SEED = 256, 4, 16, 16, 2e-4, 1.0, 0
GEMM_N = 2048
IGNORE_INDEX = -100


def quiet_bitsandbytes():
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


# --- shared by both sides ----------------------------------------------------------------------

def heldout_loss(model, data: dict, autocast: bool, logits_fn=None) -> float:
    """Mean next-token cross-entropy (fp32, from the logits) over the labelled tokens of the held-out rows.

    The same function scores both sides: row by row, model(input_ids, attention_mask).logits (qtune's:
    its engine's final hidden states through the head, `logits_fn`). The model
    stays in train mode (dropout 0 on both sides, so this is eval-mode math) — see the module docstring
    for the bitsandbytes CPU eval-mode quirk that rules eval mode out for the peer."""
    import torch
    import torch.nn.functional as F

    ids, mask, labels = data["eval_input_ids"], data["eval_attention_mask"], data["eval_labels"]
    was_training = model.training
    model.train()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(ids.shape[0]):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx:
                if logits_fn is not None:
                    logits = logits_fn(ids[i:i + 1], mask[i:i + 1])  # (1, t, vocab)
                else:
                    logits = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
            target = labels[i, 1:]  # position j predicts token j + 1
            total += float(F.cross_entropy(logits[0, :-1].float(), target, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((target != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def short_dtype(report: dict) -> str:
    """A report's compute dtype as its table and chart name it: bf16 or fp32."""
    return {"bfloat16": "bf16", "float32": "fp32"}[report["args"].get("compute_dtype", "bfloat16")]


def report_stem(compute_dtype: str) -> str:
    """The result files' name: bench_peft.* for the issue's bf16 setting, bench_peft_fp32.* for fp32."""
    return "bench_peft" if compute_dtype == "bfloat16" else "bench_peft_fp32"


def gemm_rate(n: int = GEMM_N, runs: int = 5, dtype: str = "bfloat16") -> dict:
    """Matmul rate of this machine in `dtype`: median of `runs` timed n×n×n products (after 2 untimed)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(getattr(torch, dtype))
    b = torch.randn(n, n, generator=g).to(getattr(torch, dtype))
    for _ in range(2):
        a @ b
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"n": n, "runs": runs, "dtype": dtype, "times_s": times, "gflops": 2 * n ** 3 / t / 1e9,
            "threads": torch.get_num_threads()}


def step_flops(config: dict, batch: int, seq: int, rank: int, targets=TARGETS) -> dict:
    """Useful FLOPs of one training step with frozen base weights and gradient checkpointing.

    T = batch·seq positions (padding included: the GEMMs run over it), L layers, h hidden, V vocab.
      decoder linears, one forward:  F_lin  = 2 · N_lin · T        (N_lin = weights of all decoder linears)
      attention, one forward:        F_att  = 4 · L · seq² · h · batch   (QKᵀ and PV, full seq² — SDPA on
                                                                          CPU does not halve causal work;
                                                                          qtune's causal halves do 3/4 of it)
      adapters, one forward:         F_ad   = 2 · T · r · Σ(in + out) over the adapted linears
      head, one forward:             F_head = 2 · h · V · T
    step = forward + recomputation of the decoder layers in backward + backward:
      linears  3·F_lin   (forward, recomputation, input gradient only: the base is frozen, no weight-grad GEMM)
      attention 4·F_att  (forward, recomputation, backward = 2 forwards: dQ, dK, dV and dP)
      adapters 4·F_ad    (forward, recomputation, backward = 2 forwards: input grad + A, B grads)
      head     2·F_head  (forward, input-gradient backward; the tied embedding is frozen)
    Not counted: norms, RoPE, SiLU, softmax, the optimizer (all O(T·h) or O(params)), DoRA's norm terms
    (A·Wᵀ: ~r/T of the linear forward) and qtune's recomputation of the head chunks in backward."""
    h, i_sz, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads) * hd
    q = heads * hd
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i_sz), "up_proj": (h, i_sz), "down_proj": (i_sz, h)}  # (in, out)
    T = batch * seq
    n_lin = L * sum(a * b for a, b in shapes.values())
    f_lin = 2 * n_lin * T
    f_att = 4 * L * seq * seq * q * batch
    f_ad = 2 * T * rank * L * sum(a + b for name, (a, b) in shapes.items() if name in targets)
    f_head = 2 * h * config["vocab_size"] * T
    parts = {"linears": 3 * f_lin, "attention": 4 * f_att, "adapters": 4 * f_ad, "head": 2 * f_head}
    return {"positions": T, "decoder_linear_params": n_lin, "forward": {"linears": f_lin, "attention": f_att,
            "adapters": f_ad, "head": f_head}, "step": parts, "total": sum(parts.values())}


# --- workers: one training run each ------------------------------------------------------------

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


GATE: LockstepGate | None = None  # set by worker_main under --lockstep-ack-fd


def _train_loop(step_fn, data: dict, warmup: int, steps: int) -> dict:
    """Run warmup + steps steps of step_fn(input_ids, attention_mask, labels) -> loss; time the last `steps`
    (in lockstep, each step waits for the parent's go, untimed)."""
    order = data["order"]  # (warmup + steps, batch) row indices
    ids_all, mask_all, lab_all = data["input_ids"], data["attention_mask"], data["labels"]
    times, tokens, losses = [], [], []
    if GATE is not None:
        GATE.ready()
    for s in range(warmup + steps):
        if GATE is not None:
            GATE.wait()
        t0 = time.perf_counter()
        rows = order[s]
        ids, mask, labels = ids_all[rows], mask_all[rows], lab_all[rows]
        n_input = int(mask.sum())
        loss = step_fn(ids, mask, labels)
        dt = time.perf_counter() - t0
        if GATE is not None:
            GATE.done()
        losses.append(loss)
        if s >= warmup:
            times.append(dt)
            tokens.append(n_input)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {s + 1}")
    return {"step_times_s": times, "step_tokens": tokens, "train_losses": losses}


def worker_qtune(method: str, data: dict, work: Path, warmup: int, steps: int, compute_dtype: str = "bfloat16") -> dict:
    import torch

    from qtune.adapters.rosa_mask import choose_supports
    from qtune.config import TrainConfig
    from qtune.errors import QtuneError
    from qtune.memory import MemoryMeter, configure_host_allocator
    from qtune.model import build_model, decoder_layers
    from qtune.train import lr_factor, make_optimizer, train_step

    configure_host_allocator(torch.device("cpu"), rss_bounded=False)  # as qtune.train does on CPU before loading
    total = warmup + steps
    run_dir = Path(tempfile.mkdtemp(prefix=f"qtune-{method}-", dir=work))
    cfg = TrainConfig(method="qlora" if method == "lora16" else method, bits=16 if method == "lora16" else 4,
                      quant_type="nf4", double_quant=True, rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS,
                      seq_len=SEQ_LEN, batch_size=BATCH, grad_accum=1, lr=LR, lr_scheduler="constant", warmup_steps=0,
                      weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, optim="adamw", max_steps=total, seed=SEED,
                      gradient_checkpointing=True, compute_dtype=compute_dtype, output=str(run_dir))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    try:
        model, _, _, _ = build_model(cfg, run_dir, progress=False)
    except QtuneError as e:
        if "not available" in str(e):
            return {"unavailable": str(e)}
        raise
    # RoSA: choose the sparse support from the first batches, as qtune.train does before the optimizer
    order = data["order"]
    choose_supports(model, ({"input_ids": data["input_ids"][order[k]], "attention_mask": data["attention_mask"][order[k]],
                             "labels": data["labels"][order[k]]} for k in range(min(cfg.rosa_mask_steps, len(order)))),
                    cfg.rosa_density, run_dir)
    setup_s = time.perf_counter() - t0
    setup_rss = peak_rss_bytes()
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.lr_scheduler))
    meter = MemoryMeter(torch.device("cpu")).attach(decoder_layers(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    logits = lambda ids, mask: model.lm_head(model.qtune_engine.hidden_states(ids, mask))  # noqa: E731
    before = heldout_loss(model, data, autocast=False, logits_fn=logits)
    model.train()

    done = [0]

    def step(ids, mask, labels):  # qtune.train.train_step, as train() runs it (grad_accum 1)
        done[0] += 1
        meter.begin_step(done[0])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return train_step(model, optimizer, scheduler, [batch], cfg.max_grad_norm)["loss"]

    res = _train_loop(step, data, warmup, steps)
    res["execution"] = model.qtune_engine.execution_report(1)  # which path the layers ran: a speed path must say
    train_rss = peak_rss_bytes()
    after = heldout_loss(model, data, autocast=False, logits_fn=logits)
    meter.detach()
    return {**res, "setup_s": setup_s, "setup_peak_rss_bytes": setup_rss, "train_peak_rss_bytes": train_rss,
            "heldout_before": before, "heldout_after": after,
            "trainable_params": sum(p.numel() for p in trainable), "peak_heap_bytes": meter.peak_bytes()}


def _bnb_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                      task_type="CAUSAL_LM", **kw)


def prep_peer_pissa(model_dir: Path, out: Path) -> dict:
    """PEFT's QPiSSA preprocessing (examples/pissa_finetuning): PiSSA on the fp32 model, then save the
    adapter (as pissa_init/, marked to load as-is) and the residual model (unload())."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, _lora_config(init_lora_weights="pissa_niter_4"))
    peft_model.peft_config["default"].init_lora_weights = True  # reload A, B as saved, no second SVD
    peft_model.save_pretrained(out / "pissa_init")
    residual = peft_model.unload()
    residual.save_pretrained(out)
    return {"prep_s": time.perf_counter() - t0, "prep_peak_rss_bytes": peak_rss_bytes()}


def worker_peer(method: str, data: dict, model_dir: Path, pissa_dir: Path | None, warmup: int, steps: int,
                compute_dtype: str = "bfloat16") -> dict:
    """The peer's run. bfloat16: a bf16 model under autocast bf16 (the issue's pinned setting); float32:
    an fp32 model and bnb compute dtype, no autocast."""
    import torch
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, compute_dtype)
    autocast = dtype == torch.bfloat16
    torch.manual_seed(SEED)
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
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    before = heldout_loss(model, data, autocast=autocast)
    model.train()  # from_pretrained returns eval mode

    def step(ids, mask, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    res = _train_loop(step, data, warmup, steps)
    res["execution"] = model.qtune_engine.execution_report(1)  # which path the layers ran: a speed path must say
    train_rss = peak_rss_bytes()
    after = heldout_loss(model, data, autocast=autocast)
    return {**res, "setup_s": setup_s, "setup_peak_rss_bytes": setup_rss, "train_peak_rss_bytes": train_rss,
            "heldout_before": before, "heldout_after": after, "trainable_params": sum(p.numel() for p in trainable)}


def worker_main(args) -> None:
    global GATE
    quiet_bitsandbytes()
    import torch

    if args.lockstep_ack_fd is not None:
        GATE = LockstepGate(args.lockstep_ack_fd)
    if args.threads:
        torch.set_num_threads(args.threads)
    side, method = args.worker
    work = Path(args.work)
    if side == "prep":  # once per benchmark, before any timed run
        if method == "qtune-cache":  # fill qtune's quantized cache, as any first `qtune train` does
            from qtune.loader import QuantSpec, load_model

            load_model(Path(args.model_dir), QuantSpec(4, "nf4", True), getattr(torch, args.compute_dtype),
                       progress=False)  # the cache is keyed by the compute dtype
            out = {"peak_rss_bytes": peak_rss_bytes()}
        else:
            out = prep_peer_pissa(Path(args.model_dir), work / "peer_pissa")
    else:
        from safetensors.torch import load_file

        data = load_file(work / "data.safetensors")
        t0 = time.perf_counter()
        if side == "qtune":
            out = worker_qtune(method, data, work, args.warmup, args.steps, args.compute_dtype)
        else:
            out = worker_peer(method, data, Path(args.model_dir), work / "peer_pissa", args.warmup, args.steps,
                              args.compute_dtype)
        out["wall_s"] = time.perf_counter() - t0
    out.update(side=side, method=method, peak_rss_bytes=peak_rss_bytes(), threads=torch.get_num_threads())
    Path(args.result).write_text(json.dumps(out))


# --- the parent: data, alternation, report -----------------------------------------------------

def link_folder(folder: Path, files) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in files:
        (folder / p.name).symlink_to(p)
    return folder


def prepare_data(work: Path, model_dir: Path, plays: int, eval_rows: int, n_steps: int) -> dict:
    import torch

    from qtune.data import load_splits
    from qtune.embedded import shakespeare_texts
    from qtune.loader import load_tokenizer
    from qtune.train import micro_batch_rows

    train_dir = link_folder(work / "train", shakespeare_texts("train")[:plays])
    held_dir = link_folder(work / "held", shakespeare_texts("eval"))
    tok = load_tokenizer(model_dir)
    train, held, stats = load_splits(train_dir, held_dir, tok, SEQ_LEN)
    # a fixed subset of the held-out rows, evenly spread over Hamlet and the Sonnets
    pick = sorted({round(i * (len(held) - 1) / max(eval_rows - 1, 1)) for i in range(min(eval_rows, len(held)))})
    order = torch.stack([micro_batch_rows(s, len(train), BATCH, SEED) for s in range(n_steps)])  # (steps, batch)
    data = {"input_ids": train.input_ids, "attention_mask": train.attention_mask, "labels": train.labels,
            "eval_input_ids": held.input_ids[pick], "eval_attention_mask": held.attention_mask[pick],
            "eval_labels": held.labels[pick], "order": order}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in data.items()}, work / "data.safetensors")
    return {"plays": [p.name for p in shakespeare_texts("train")[:plays]], "train_rows": len(train),
            "heldout_rows_total": len(held), "heldout_rows_used": pick,
            "heldout_label_tokens": int((held.labels[pick][:, 1:] != IGNORE_INDEX).sum()),
            "train_tokens": stats.train_tokens}


def worker_command(args, work: Path, side: str, method: str, tag: str, tree: Path | None = None) -> tuple[list[str], Path, Path]:
    """(command line, result file, log file) of one worker process; `tree`: another checkout of this
    repository (tools/bench_methods.py --against-tree) whose worker and packages the process runs
    instead of this one's (it puts the tree first on PYTHONPATH: see worker_env)."""
    result = work / f"{tag}.json"
    script = Path(tree) / "tools" / "bench_peft.py" if tree else Path(os.path.abspath(__file__))
    cmd = [sys.executable, str(script), "--worker", side, method, "--work", str(work),
           "--result", str(result), "--model-dir", str(args.model_dir), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
    dtype = getattr(args, "compute_dtype", "bfloat16")
    if dtype != "bfloat16":  # only then: a worker of an older tree (--against-tree) knows no such flag
        cmd += ["--compute-dtype", dtype]
    return cmd, result, work / f"{tag}.log"


def worker_env(tree: Path | None) -> dict | None:
    """The environment of a worker that runs another checkout's qtune and quant (None: this one's):
    PYTHONPATH's entries come before the editable install's finder, so `import qtune` finds the tree's."""
    if tree is None:
        return None
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tree).resolve())] +
                                                         ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}


def start_gated_worker(args, work: Path, side: str, method: str, tag: str, tree: Path | None = None):
    """A worker under the lockstep gate (LockstepGate): (process, ack pipe, result file, log file). The
    parent writes a line to its stdin to start each step and reads b"r" (loaded) once, then b"d" after
    each step from the ack pipe. `tree`: run another checkout's code (worker_command)."""
    cmd, result, log = worker_command(args, work, side, method, tag, tree)
    ack_r, ack_w = os.pipe()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + ["--lockstep-ack-fd", str(ack_w)], stdin=subprocess.PIPE, stdout=f,
                                stderr=subprocess.STDOUT, pass_fds=(ack_w,), env=worker_env(tree))
    os.close(ack_w)
    return proc, os.fdopen(ack_r, "rb", buffering=0), result, log


def run_worker(args, work: Path, side: str, method: str, tag: str) -> dict:
    cmd, result, log = worker_command(args, work, side, method, tag)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    return read_worker_result(result, log, rc, side, method, tag, t0)


def read_worker_result(result: Path, log: Path, rc: int, side: str, method: str, tag: str, t0: float) -> dict:
    """A finished worker's JSON result (or an error entry with its log's tail), with a one-line summary."""
    if rc != 0 or not result.is_file():
        tail = log.read_text()[-3000:]
        print(f"  {tag}: FAILED (exit {rc})\n{tail}", file=sys.stderr)
        return {"side": side, "method": method, "error": f"exit {rc}: {tail[-600:]}"}
    out = json.loads(result.read_text())
    if "unavailable" in out:
        print(f"  {tag}: unavailable: {out['unavailable']}", file=sys.stderr)
    elif "step_times_s" in out:
        print(f"  {tag}: {statistics.median(out['step_times_s']):.3f} s/step, peak RSS "
              f"{out['peak_rss_bytes'] / 2**30:.2f} GiB, held-out {out['heldout_before']:.4f} -> "
              f"{out['heldout_after']:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out


def summarize_run(r: dict) -> dict:
    tok_s = [n / t for n, t in zip(r["step_tokens"], r["step_times_s"])]
    return {"s_per_step": statistics.median(r["step_times_s"]), "tokens_per_s": statistics.median(tok_s),
            "tokens_per_s_mean": sum(r["step_tokens"]) / sum(r["step_times_s"]),
            # the run: loading + training (what a fine-tuning run holds); the process peak adds the
            # benchmark's own held-out scoring afterwards (full-vocabulary logits per row, same for both)
            "peak_rss_gib": r["train_peak_rss_bytes"] / 2**30, "process_peak_rss_gib": r["peak_rss_bytes"] / 2**30,
            "heldout_before": r["heldout_before"],
            "heldout_after": r["heldout_after"]}


def aggregate(runs: list[dict]) -> dict | None:
    ok = [summarize_run(r) for r in runs if "step_times_s" in r]
    if not ok:
        return None
    return {k: statistics.median(s[k] for s in ok) for k in ok[0]} | {"runs": len(ok)}


def pair_ratios(q_runs: list[dict], p_runs: list[dict]) -> dict | None:
    """Median over alternating pairs (qtune run i, peer run i) of qtune/peer."""
    pairs = [(summarize_run(q), summarize_run(p)) for q, p in zip(q_runs, p_runs)
             if "step_times_s" in q and "step_times_s" in p]
    if not pairs:
        return None
    return {"tokens_per_s": statistics.median(q["tokens_per_s"] / p["tokens_per_s"] for q, p in pairs),
            "peak_rss": statistics.median(q["peak_rss_gib"] / p["peak_rss_gib"] for q, p in pairs),
            "process_peak_rss": statistics.median(q["process_peak_rss_gib"] / p["process_peak_rss_gib"] for q, p in pairs),
            "heldout_after": statistics.median(q["heldout_after"] / p["heldout_after"] for q, p in pairs),
            "pairs": len(pairs)}


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report["args"].get("compute_dtype", "bfloat16"))
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    short = short_dtype(report)
    rate = report["gemm"]["gflops"]
    flops = report["flops"]["total"]
    a = report["args"]
    lines = [
        f"# qtune vs transformers + bitsandbytes + PEFT ({report['machine']['cpu']}, {report['machine']['threads']} threads)",
        "",
        f"SmolLM2-135M-Instruct, {a['plays']} Shakespeare plays ({report['data']['train_rows']} rows), seq {SEQ_LEN} × "
        f"batch {BATCH}, r={RANK}, α={ALPHA}, all 7 linears, gradient checkpointing, {short} compute "
        f"({'peer: autocast bf16' if short == 'bf16' else 'peer: fp32 model, bnb compute dtype fp32, no autocast'}), "
        f"AdamW lr {LR} "
        f"constant, clip 1.0; {a['warmup']} warm-up + {a['steps']} timed steps; {a['repeats']} alternating "
        f"qtune/peer pair(s) per method, medians. Held-out: {len(report['data']['heldout_rows_used'])} rows of Hamlet + "
        f"Sonnets ({report['data']['heldout_label_tokens']} tokens), one scoring function for both sides.",
        "",
        f"{short} GEMM rate ({GEMM_N}³, median of 5, start/end): {report['gemm']['start']['gflops']:.0f} / "
        f"{report['gemm']['end']['gflops']:.0f} GFLOP/s → {rate:.0f} GFLOP/s used. Step FLOPs "
        f"(forward + recomputation + input-gradient backward, formula in tools/bench_peft.py step_flops): "
        f"{flops / 1e9:.0f} GFLOP.",
        "",
        "| method | side | s/step | tokens/s | peak RSS GiB: run (with scoring) | held-out loss before → after | "
        "% of GEMM limit | tokens/s ratio | RSS ratio: run (with scoring) | loss after ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["methods"]:
        e = report["results"][m]
        for side in ("qtune", "peer"):
            s = e.get(side)
            if side == "peer" and m in PEERLESS:
                lines.append(f"| {m} | peer | – | – | – | – | – | no peer: vs qtune {PEERLESS[m]} | | |")
                continue
            if e.get("unavailable") and side == "qtune":
                lines.append(f"| {m} | qtune | unavailable in this qtune | | | | | | | |")
                continue
            if s is None:
                if not e.get("unavailable"):
                    lines.append(f"| {m} | {side} | failed (see {stem}.json) | | | | | | | |")
                continue
            frac = flops / (s["s_per_step"] * rate * 1e9)
            r = e.get("ratios") if side == "qtune" else None
            rat = (f"{r['tokens_per_s']:.2f}× | {r['peak_rss']:.2f}× ({r['process_peak_rss']:.2f}×) | "
                   f"{r['heldout_after']:.4f}" if r else " | | ")
            lines.append(f"| {m} | {side} | {s['s_per_step']:.3f} | {s['tokens_per_s']:.0f} | "
                         f"{s['peak_rss_gib']:.2f} ({s['process_peak_rss_gib']:.2f}) | "
                         f"{s['heldout_before']:.4f} → {s['heldout_after']:.4f} | {100 * frac:.1f}% | {rat} |")
    lines += ["", "Ratios are qtune/peer, the median over alternating pairs (qrosa: over qtune qlora's runs). Peak RSS "
              "of the run: the worker's VmHWM at the end of training (loading included); in parentheses the "
              "process's peak after the benchmark's held-out scoring too (transformers' full-vocabulary logits, "
              "one row at a time, the same function for both sides)."]
    q = report["results"].get("qlora", {}).get("ratios")
    if q:
        ok = [q["tokens_per_s"] >= 2.0, q["peak_rss"] <= 0.5, abs(q["heldout_after"] - 1) <= 0.01]
        lines += ["", f"Targets (QLoRA): tokens/s ≥ 2.0× peer: {q['tokens_per_s']:.2f}× {'PASS' if ok[0] else 'FAIL'}; "
                  f"peak RSS of the run ≤ 0.5× peer: {q['peak_rss']:.2f}× {'PASS' if ok[1] else 'FAIL'} "
                  f"(with the scoring: {q['process_peak_rss']:.2f}×); "
                  f"held-out loss within ±1%: {100 * (q['heldout_after'] - 1):+.2f}% {'PASS' if ok[2] else 'FAIL'}."]
    prep = report.get("peer_pissa_prep")
    if prep and "prep_s" in prep:
        lines += ["", f"Peer QPiSSA preprocessing (fp32 load + PiSSA SVD + save residual and adapter; PEFT's separate "
                  f"step, not in the peer's training run): {prep['prep_s']:.1f} s, peak RSS "
                  f"{prep['peak_rss_bytes'] / 2**30:.2f} GiB. qtune's qpissa does its SVD inside its run."]
    lines += ["", "Peer evaluation runs in train mode (dropout 0) under no_grad: bitsandbytes' CPU Linear4bit in eval "
              "mode repacks weights and asserts out_features % 32 == 0 on AVX512-bf16 CPUs."]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(report, out_dir / f"{stem}.png")
    print("\n".join(lines))


def rebuild_report(out_dir: Path, compute_dtype: str = "bfloat16") -> None:
    """Summaries and ratios again from the raw runs kept in bench_peft.json (bench_peft_fp32.json for
    float32; after a change of how they are summarized), then the same markdown and chart."""
    report = json.loads((out_dir / f"{report_stem(compute_dtype)}.json").read_text())
    results = report["results"]
    for m, e in results.items():
        runs = e["runs"]
        e.update(qtune=aggregate(runs["qtune"]), peer=aggregate(runs["peer"]), ratios=pair_ratios(runs["qtune"], runs["peer"]))
    for m, ref in PEERLESS.items():
        if m in results and ref in results and results[m]["qtune"] and results[ref]["qtune"]:
            results[m]["ratios"] = pair_ratios(results[m]["runs"]["qtune"], results[ref]["runs"]["qtune"])
    write_report(report, out_dir)


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in report["methods"] if report["results"][m].get("qtune")]
    if not methods:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(methods))
    w = 0.38
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"),
                           (axes[1], "peak_rss_gib", "peak RSS of the run, GiB (lower is better)")):
        q = [report["results"][m]["qtune"][key] for m in methods]
        p = [(report["results"][m].get("peer") or {}).get(key, 0) for m in methods]
        ax.bar([i - w / 2 for i in x], q, w, label="qtune", color="tab:blue")
        ax.bar([i + w / 2 for i in x], p, w, label="transformers+bnb+PEFT", color="tab:orange")
        for i, m in enumerate(methods):
            r = report["results"][m].get("ratios")
            if r:
                ratio = r["tokens_per_s" if key == "tokens_per_s" else "peak_rss"]
                ax.annotate(f"{ratio:.2f}×", (i, max(q[i], p[i])), ha="center", va="bottom", fontsize=9)
        ax.set_xticks(list(x))
        ax.set_xticklabels(methods)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)  # below: never over a bar's label
    fig.suptitle(f"SmolLM2-135M, seq {SEQ_LEN}×{BATCH}, r={RANK}, {short_dtype(report)}, {report['args']['steps']} timed steps "
                 f"(qtune/peer ratios annotated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parent_main(args) -> None:
    import shutil

    import torch

    from qtune.embedded import default_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; use some of {','.join(METHODS)}")
    for m, ref in PEERLESS.items():  # qrosa is compared with qtune's qlora: run that too when it is not asked for
        if m in methods and ref not in methods:
            methods.insert(methods.index(m), ref)
    args.model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-peft-"))
    try:
        data_info = prepare_data(work, args.model_dir, args.plays, args.eval_rows, args.warmup + args.steps)
        print(f"data: {data_info['train_rows']} train rows, {len(data_info['heldout_rows_used'])} held-out rows; "
              f"work folder {work}", file=sys.stderr)
        gemm_start = gemm_rate(dtype=args.compute_dtype)
        print(f"{args.compute_dtype} GEMM: {gemm_start['gflops']:.0f} GFLOP/s", file=sys.stderr)
        run_worker(args, work, "prep", "qtune-cache", "prep-qtune-cache")
        prep = run_worker(args, work, "prep", "qpissa", "prep-peer-pissa") if "qpissa" in methods else None
        results: dict[str, dict] = {}
        for m in methods:
            runs = {"qtune": [], "peer": []}
            unavailable = None
            for rep in range(args.repeats):
                r = run_worker(args, work, "qtune", m, f"{m}-qtune-{rep}")
                if "unavailable" in r:
                    unavailable = r["unavailable"]
                    break
                runs["qtune"].append(r)
                if m not in PEERLESS:
                    runs["peer"].append(run_worker(args, work, "peer", m, f"{m}-peer-{rep}"))
            results[m] = {"unavailable": unavailable, "runs": runs,
                          "qtune": aggregate(runs["qtune"]), "peer": aggregate(runs["peer"]),
                          "ratios": pair_ratios(runs["qtune"], runs["peer"])}
        for m, ref in PEERLESS.items():  # qrosa: ratios against qtune's own qlora
            if m in results and ref in results and results[m]["qtune"] and results[ref]["qtune"]:
                results[m]["ratios"] = pair_ratios(results[m]["runs"]["qtune"], results[ref]["runs"]["qtune"])
        gemm_end = gemm_rate(dtype=args.compute_dtype)
        config = json.loads((args.model_dir / "config.json").read_text())
        import bitsandbytes
        import peft
        import transformers

        report = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "methods": methods, "data": data_info,
            "machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
            "gemm": {"start": gemm_start, "end": gemm_end,  # the rate used: median over all 10 timed products
                     "gflops": 2 * GEMM_N ** 3 / statistics.median(gemm_start["times_s"] + gemm_end["times_s"]) / 1e9},
            "flops": step_flops(config, BATCH, SEQ_LEN, RANK),
            "peer_pissa_prep": prep, "results": results}
        write_report(report, Path(args.out_dir))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--repeats", type=int, default=2, help="alternating qtune/peer pairs per method")
    ap.add_argument("--plays", type=int, default=4, help="training plays (the first N, alphabetically)")
    ap.add_argument("--eval-rows", type=int, default=16, help="held-out rows scored before and after")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every process (0 = torch's default)")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="both sides' compute dtype: bfloat16 (the issue's setting; the peer under autocast) or "
                         "float32 (CPUs without bf16 kernels, tools/bench_dtype.py; writes bench_peft_fp32.*)")
    ap.add_argument("--model-dir", default=None, help="bf16 HF folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, run folders)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the table, ratios and chart from --out-dir's bench_peft.json runs; run nothing")
    ap.add_argument("--worker", nargs=2, metavar=("SIDE", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--lockstep-ack-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.plays < 1 or args.eval_rows < 1:
        raise SystemExit("--steps, --repeats, --plays and --eval-rows must be >= 1, --warmup >= 0")
    if args.report_only:
        rebuild_report(Path(args.out_dir), args.compute_dtype)
    elif args.worker:
        worker_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
