"""The benchmarks' shared harness: one setting, one data preparation, one qtune training run (on
qtune's public API), and the parent's side of the worker processes.

Used by tools/bench_peft.py (qtune against the peer stack), tools/bench_methods.py (lockstep step
pairs, --against-tree A/B), tools/profile_step.py (torch.profiler over the same step) and
tools/workers.py (the worker processes: one run each, qtune's or the peer's, and their protocol).

The setting (both sides of every benchmark): SmolLM2-135M-Instruct, the first --plays Shakespeare
training plays, seq 256 × batch 4, rank 16 on all 7 linears of every decoder layer, alpha 16 (scale 1),
dropout 0, gradient checkpointing, bf16 compute (or float32), AdamW (betas 0.9/0.999, eps 1e-8, no
weight decay), lr 2e-4 constant with no warmup, gradient-norm clipping at 1.0.

The qtune side (QtuneRun) is what `qtune train` runs, minus metric logging and checkpoints:
qtune.model.build_model, RoSA's support chosen from the first batches (qtune.adapters.rosa_mask),
qtune.train.make_optimizer, a LambdaLR over qtune.train.lr_factor, the MemoryMeter on the decoder
layers, and each step is qtune.train.train_step.

Worker processes (tools/workers.py has the protocol: the command line, data file and JSON result
that every checkout's `tools/bench_peft.py --worker SIDE METHOD ...` speaks, and the lockstep gate).
Here, the parent's side: worker_command builds a worker's command line (this checkout's or another
tree's), run_worker runs one to its end, start_gated_worker starts one under the lockstep gate.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qtune.memory import peak_rss_bytes  # VmHWM: ru_maxrss would carry over the parent's peak

ROOT = Path(__file__).resolve().parents[1]  # this checkout
WORKER_SCRIPT = Path("tools") / "bench_peft.py"  # every checkout's worker entry point, relative to its root

METHODS = ("qlora", "qdora", "qpissa", "qrosa", "lora16")  # the ones bench_peft.py compares with a peer
# the second wave (tools/bench_methods.py measures them against our QLoRA): each on its own default targets
# (all-linear, IA3's k/v/down, every norm), at a learning rate that moves it in a few steps
SECOND_WAVE = ("adalora", "loradash", "spectral", "loha", "lokr", "bone", "bat", "ia3", "lntuning", "bitfit")
SECOND_WAVE_LR = {"ia3": 3e-2, "lntuning": 1e-2, "bitfit": 1e-2, "bone": 3e-3, "bat": 3e-3}
PEERLESS = {"qrosa": "qlora"}  # method -> the qtune method it is compared with instead of a peer
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ_LEN, BATCH, RANK, ALPHA, LR, MAX_GRAD_NORM, SEED = 256, 4, 16, 16, 2e-4, 1.0, 0
GEMM_N = 2048
IGNORE_INDEX = -100


def quiet_bitsandbytes() -> None:
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --isa avx2: the AVX2-only class on an AVX-512 machine. torch's kernels (ATen and inductor's generated C++), MKL's
# GEMMs and oneDNN read these when they load, so the process must start with them (cap_isa re-executes it).
ISA_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
ISA_VARS = sorted({k for caps in ISA_CAPS.values() for k in caps})


def cap_isa(isa: str | None) -> None:
    """Run this benchmark with the instruction sets capped at `isa` (ISA_CAPS; None: as the CPU has them): where
    the environment lacks the caps, re-execute the same command line with them set. Every worker inherits them.
    The peer's bitsandbytes native CPU library is not capped (it dispatches on the CPU's own flags)."""
    if isa is None:
        return
    caps = ISA_CAPS[isa]
    if all(os.environ.get(k) == v for k, v in caps.items()):
        return
    print(f"--isa {isa}: restarting with {caps_text(caps, ' ')}", file=sys.stderr, flush=True)
    os.execve(sys.executable, list(sys.orig_argv), {**os.environ, **caps})


def add_isa_argument(ap) -> None:
    """The benchmarks' --isa option (their main calls cap_isa(args.isa) first)."""
    ap.add_argument("--isa", default=None, choices=sorted(ISA_CAPS),
                    help="cap the instruction sets of every process (torch's kernels, inductor's, MKL, oneDNN) at this "
                         "one: avx2 measures the AVX2-only class on an AVX-512 machine (tools/harness.py cap_isa)")


def isa_caps() -> dict:
    """The instruction-set caps this process runs under (cap_isa's variables that are set)."""
    return {k: os.environ[k] for k in ISA_VARS if os.environ.get(k)}


def caps_text(caps: dict, sep: str = ", ") -> str:
    return sep.join(f"{k}={v}" for k, v in caps.items())


def isa_note() -> str:
    """'' or, under cap_isa's caps, what the report's machine line adds: the code paths its kernels ran."""
    caps = isa_caps()
    return f", instruction sets capped: {caps_text(caps)}" if caps else ""


def cpu_bf16() -> dict:
    """What decides this CPU's class: whether oneDNN has bf16 kernels for it, and their measured rate over float32's
    (qtune.precision: what --compute-dtype auto decides by); and the instruction set torch's kernels run, with any
    caps set in the environment (cap_isa)."""
    import torch

    from qtune.precision import cpu_bf16_speedup, cpu_has_bf16_kernels

    return {"bf16_kernels": cpu_has_bf16_kernels(), "bf16_speedup": cpu_bf16_speedup(),
            "isa": torch.backends.cpu.get_cpu_capability(),
            "isa_caps": isa_caps()}


def cpu_class(machine: dict) -> str:
    """The CPU class a report ran on, from what it recorded (older reports: bf16_kernels only)."""
    if "bf16_kernels" not in machine:
        return "not recorded"
    if machine.get("isa_caps"):
        return (f"{machine['isa']} code paths forced on a CPU with more ({caps_text(machine['isa_caps'])}): the "
                f"{'AVX2-only' if machine['isa'] == 'AVX2' else machine['isa']} class emulated, "
                f"{'bf16 kernels' if machine['bf16_kernels'] else 'no bf16 kernels'}")
    if not machine["bf16_kernels"]:
        return "no bf16 kernels (AVX2-only class)"
    speedup = machine.get("bf16_speedup")
    if speedup is None:
        return "bf16 kernels (AVX512-BF16/AMX)"
    from qtune.precision import BF16_MIN_SPEEDUP

    if speedup >= BF16_MIN_SPEEDUP:
        return f"fast bf16 kernels (bf16 GEMMs {speedup:.1f}x float32's rate, as with AMX)"
    return f"bf16 kernels slower than float32 (bf16 GEMMs {speedup:.2f}x float32's rate, as with AVX512-BF16 without AMX)"


# --- the machine's limit and the step's work ---------------------------------------------------

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


def step_flops(config: dict, batch: int, seq: int, rank: int, targets=TARGETS, recomputed=None,
               checkpointing: bool = True) -> dict:
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
    That is the peer's step (its checkpointing reruns every linear). qtune's recomputation reruns fewer
    (qtune.engine.recompute): `recomputed` names the linears whose base GEMM it reruns (None: all, the
    formula above), and the recomputation then costs Σ F_lin over those and, of the adapters, every x·Aᵀ
    but only their h·Bᵀ (recomputed_linears gives the names from a run's execution line);
    `checkpointing=False` (--recompute none) reruns nothing: linears 2·F_lin, attention 3·F_att,
    adapters 3·F_ad.
    Not counted: norms, RoPE, SiLU, softmax, the optimizer (all O(T·h) or O(params)), DoRA's norm terms
    (A·Wᵀ: ~r/T of the linear forward), qtune's causal halves (its attention does 3/4 of F_att) and the
    head chunks' recomputation in backward."""
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
    if not checkpointing:
        recomputed = ()
    rerun = [name for name in shapes if recomputed is None or name in recomputed]
    f_lin_rerun = 2 * T * L * sum(a * b for name, (a, b) in shapes.items() if name in rerun)
    f_ad_rerun = 2 * T * rank * L * sum((a if checkpointing else 0) + (b if name in rerun else 0)
                                        for name, (a, b) in shapes.items() if name in targets)
    parts = {"linears": 2 * f_lin + f_lin_rerun, "attention": (3 + checkpointing) * f_att,
             "adapters": 3 * f_ad + f_ad_rerun, "head": 2 * f_head}
    return {"positions": T, "decoder_linear_params": n_lin, "forward": {"linears": f_lin, "attention": f_att,
            "adapters": f_ad, "head": f_head}, "step": parts, "total": sum(parts.values())}


def recomputed_linears(recompute: dict) -> tuple[str, ...]:
    """The decoder linears whose base GEMM a qtune run's recomputation reruns, from its execution line's
    recompute entry (qtune.engine.recompute.RecomputePolicy's flags): q/k/v/o unless the attention's
    products are kept, gate/up unless the MLP's are, down_proj never (LoRA and RoSA skip it; DoRA keeps
    its product u under every level but full, where this undercounts it); none where nothing is
    checkpointed."""
    if not recompute.get("checkpointing", True):
        return ()
    names = [] if recompute.get("keep_attention") else ["q_proj", "k_proj", "v_proj", "o_proj"]
    return tuple(names + ([] if recompute.get("keep_mlp") else ["gate_proj", "up_proj"]))


def policy_step_flops(config: dict, recompute: dict | None) -> dict:
    """step_flops at the benchmark's setting for a run whose execution line's recompute entry is `recompute`
    (None or empty: every linear rerun, the peer's step)."""
    if not recompute:
        return step_flops(config, BATCH, SEQ_LEN, RANK)
    return step_flops(config, BATCH, SEQ_LEN, RANK, recomputed=recomputed_linears(recompute),
                      checkpointing=recompute.get("checkpointing", True))


# --- data: tokenized once by the parent, the same rows for every worker ------------------------

def link_folder(folder: Path, files) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in files:
        (folder / p.name).symlink_to(p)
    return folder


def prepare_data(work: Path, model_dir: Path, plays: int, eval_rows: int, n_steps: int) -> dict:
    """Tokenize the first `plays` training plays and the held-out works (Hamlet + Sonnets) with
    qtune.data.load_splits, fix `n_steps` micro-batches of row indices (qtune.train.micro_batch_rows,
    seed 0) and `eval_rows` held-out rows spread evenly; write them to work/data.safetensors (what
    every worker reads, load_data) and return what was prepared."""
    import torch
    from safetensors.torch import save_file

    from qtune.data import load_splits
    from qtune.embedded import shakespeare_texts
    from qtune.loader import load_tokenizer
    from qtune.train import micro_batch_rows

    train_dir = link_folder(work / "train", shakespeare_texts("train")[:plays])
    held_dir = link_folder(work / "held", shakespeare_texts("eval"))
    tok = load_tokenizer(model_dir)
    train, held, stats = load_splits(train_dir, held_dir, tok, SEQ_LEN)
    pick = sorted({round(i * (len(held) - 1) / max(eval_rows - 1, 1)) for i in range(min(eval_rows, len(held)))})
    order = torch.stack([micro_batch_rows(s, len(train), BATCH, SEED) for s in range(n_steps)])  # (steps, batch)
    data = {"input_ids": train.input_ids, "attention_mask": train.attention_mask, "labels": train.labels,
            "eval_input_ids": held.input_ids[pick], "eval_attention_mask": held.attention_mask[pick],
            "eval_labels": held.labels[pick], "order": order}
    save_file({k: v.contiguous() for k, v in data.items()}, work / "data.safetensors")
    return {"plays": [p.name for p in shakespeare_texts("train")[:plays]], "train_rows": len(train),
            "heldout_rows_total": len(held), "heldout_rows_used": pick,
            "heldout_label_tokens": int((held.labels[pick][:, 1:] != IGNORE_INDEX).sum()),
            "train_tokens": stats.train_tokens}


def load_data(work: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(work) / "data.safetensors")


def batch_of(data: dict, s: int) -> dict:
    """Micro-batch `s` of the prepared order for qtune: {input_ids, segment_ids, labels}. The rows are plain-text
    windows, one document each, so their attention mask is their segment ids (qtune.data.TokenBlocks)."""
    rows = data["order"][s]
    return {"input_ids": data["input_ids"][rows], "segment_ids": data["attention_mask"][rows],
            "labels": data["labels"][rows]}


def heldout_loss(model, data: dict, autocast: bool, logits_fn=None) -> float:
    """Mean next-token cross-entropy (fp32, from the logits) over the labelled tokens of the held-out rows.

    The same function scores both sides: row by row, model(input_ids, attention_mask).logits (qtune's:
    its engine's final hidden states through the head, `logits_fn`). The model stays in train mode
    under no_grad (dropout 0 on both sides, so this is eval-mode math): bitsandbytes' CPU Linear4bit,
    in eval mode with an input that needs no grad, repacks its weight for a fused kernel and asserts
    out_features % 32 == 0 on AVX512-bf16 CPUs, which some of this model's layers break."""
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


# --- qtune's side: one training run on the public API ------------------------------------------

def bench_config(method: str, total_steps: int, compute_dtype: str, run_dir: Path, **overrides):
    """The benchmark's TrainConfig for `method` (lora16: qlora on the 16-bit base)."""
    from qtune.config import TrainConfig

    if method in SECOND_WAVE:
        own = {"target_modules": ["all-linear"], "lr": SECOND_WAVE_LR.get(method, LR)}
        if method == "loradash":  # the switch a third of the way in
            own["dash_steps"] = max(1, total_steps // 3)
        overrides = {**own, **overrides}
    return TrainConfig(**{**dict(
        method="qlora" if method == "lora16" else method, bits=16 if method == "lora16" else 4, quant_type="nf4",
        double_quant=True, rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=list(TARGETS), seq_len=SEQ_LEN,
        batch_size=BATCH, grad_accum=1, lr=LR, lr_scheduler="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, optim="adamw", max_steps=total_steps, seed=SEED, gradient_checkpointing=True,
        compute_dtype=compute_dtype, output=str(run_dir)), **overrides})


class QtuneRun:
    """The benchmark's qtune training run in this process (see the module docstring).

    meter_cls: the qtune.memory.MemoryMeter (sub)class attached to the decoder layers.
    Raises qtune.errors.QtuneError if this qtune does not have the method."""

    def __init__(self, method: str, data: dict, work: Path, total_steps: int, compute_dtype: str = "bfloat16",
                 meter_cls=None, **overrides):
        import torch

        from qtune.adapters.rosa_mask import choose_supports
        from qtune.memory import MemoryMeter, configure_host_allocator
        from qtune.model import build_model, decoder_layers
        from qtune.train import lr_factor, make_optimizer, returns_freed_memory

        self.run_dir = Path(tempfile.mkdtemp(prefix=f"qtune-{method}-", dir=work))
        self.cfg = cfg = bench_config(method, total_steps, compute_dtype, self.run_dir, **overrides)
        configure_host_allocator(torch.device("cpu"), rss_bounded=returns_freed_memory(cfg))  # as qtune.train, before loading
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        self.model, _, _, _ = build_model(cfg, self.run_dir, progress=False)
        # RoSA: the sparse support from the first batches, as qtune.train chooses it before the optimizer
        n_mask = min(cfg.rosa_mask_steps, len(data["order"]))
        choose_supports(self.model, (batch_of(data, k) for k in range(n_mask)), cfg.rosa_density, self.run_dir,
                        self.model.qtune_engine.mean_loss)  # as qtune.train
        self.setup_s = time.perf_counter() - t0
        self.setup_peak_rss_bytes = peak_rss_bytes()
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.lr_scheduler))
        self.meter = (meter_cls or MemoryMeter)(torch.device("cpu")).attach(decoder_layers(self.model))
        self.steps_done = 0
        from qtune.adapters import adapter_layer_for, adapter_layers

        adapter_layer_for(cfg.method).start_training(adapter_layers(self.model), total_steps, self.run_dir)  # as qtune.train
        self.model.train()

    def step(self, batch: dict) -> dict:
        """One optimizer step (qtune.train.train_step) over one micro-batch; its result dict."""
        from qtune.train import train_step

        self.steps_done += 1
        self.meter.begin_step(self.steps_done)
        return train_step(self.model, self.optimizer, self.scheduler, [batch], self.cfg.max_grad_norm)

    def logits(self, input_ids, attention_mask):
        """(b, t, vocab) logits: the engine's final hidden states through the head."""
        return self.model.qtune_engine.logits(input_ids, attention_mask)

    def heldout(self, data: dict) -> float:
        return heldout_loss(self.model, data, autocast=False, logits_fn=self.logits)

    def execution(self) -> dict:
        """Which path each decoder layer ran in the last step (qtune.engine's execution report)."""
        return self.model.qtune_engine.execution_report(self.steps_done)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def close(self) -> None:
        self.meter.detach()


# --- the parent: starting workers of this checkout or another one ------------------------------

def worker_command(args, work: Path, side: str, method: str, tag: str, tree: Path | None = None) -> tuple[list[str], Path, Path]:
    """(command line, result file, log file) of one worker process: `tree`'s tools/bench_peft.py (another
    checkout of this repository: tools/bench_methods.py --against-tree), or this checkout's. Only flags
    every checkout's worker knows."""
    result = work / f"{tag}.json"
    script = Path(tree or ROOT) / WORKER_SCRIPT
    cmd = [sys.executable, str(script), "--worker", side, method, "--work", str(work),
           "--result", str(result), "--model-dir", str(args.model_dir), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
    # always: a worker's own default is --compute-dtype auto, which resolves to float32 on CPUs whose bf16 GEMMs are
    # slower (qtune.precision), so a bf16 benchmark that left it out ran float32 there
    cmd += ["--compute-dtype", getattr(args, "compute_dtype", "bfloat16")]
    return cmd, result, work / f"{tag}.log"


def worker_env(tree: Path | None = None) -> dict:
    """The environment of a worker that runs `tree`'s qtune and quant (None: this checkout's):
    PYTHONPATH's entries come before the editable install's finder, so `import qtune` finds the tree's."""
    root = str(Path(tree or ROOT).resolve())
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root] + ([os.environ["PYTHONPATH"]]
                                                                 if os.environ.get("PYTHONPATH") else []))}


def start_gated_worker(args, work: Path, side: str, method: str, tag: str, tree: Path | None = None,
                       env: dict | None = None):
    """A worker under the lockstep gate (workers.LockstepGate): (process, ack pipe, result file, log
    file). The parent writes a line to its stdin to start each step and reads b"r" (loaded) once, then
    b"d" after each step from the ack pipe. `tree`: run another checkout's code (worker_command);
    `env`: variables added to its environment (e.g. QTUNE_GENERIC=1)."""
    cmd, result, log = worker_command(args, work, side, method, tag, tree)
    ack_r, ack_w = os.pipe()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + ["--lockstep-ack-fd", str(ack_w)], stdin=subprocess.PIPE, stdout=f,
                                stderr=subprocess.STDOUT, pass_fds=(ack_w,), env={**worker_env(tree), **(env or {})})
    os.close(ack_w)
    return proc, os.fdopen(ack_r, "rb", buffering=0), result, log


def lockstep(args, work: Path, sides: dict, tag: str) -> dict[str, dict]:
    """Workers side by side under the lockstep gate, stepped alternately: step k of each in turn, the
    order reversed every step (ABBA: no side always goes first), each waiting untimed while the others
    run, so each step pair sees the same machine. `sides`: label -> (side, method, tree, env) as
    start_gated_worker takes them ("qtune" or "peer"; tree None: this checkout). Loading and the
    held-out scoring overlap; the steps never do. {label: its worker's result (read_worker_result)}.
    For two qtune workers (tools/bench_methods.py) only: tried for qtune against the peer (bench_peft, float32,
    2026-12-06), the peer's steps ran 5.00-5.97 s in lockstep against 4.30 and 4.46 s in runs alone just
    before, and a peer against itself slowed the same way while qtune against itself did not, so a
    lockstep ratio against the peer would favour qtune (docs/benchmarks.md)."""
    procs = {}
    try:
        for label, (side, method, tree, env) in sides.items():
            procs[label] = start_gated_worker(args, work, side, method, f"{label}-{tag}".replace("@", "-"), tree, env)
        t0 = time.perf_counter()

        def expect(label: str, byte: bytes) -> None:
            got = procs[label][1].read(1)
            if got != byte:
                proc = procs[label][0]
                raise RuntimeError(f"lockstep: worker {label} stopped (exit {proc.wait()}; log {procs[label][3]})")

        labels = list(sides)
        for label in labels:
            expect(label, b"r")  # loaded, before its first step
        for k in range(args.warmup + args.steps):
            for label in (labels if k % 2 == 0 else labels[::-1]):
                procs[label][0].stdin.write(b"go\n")
                procs[label][0].stdin.flush()
                expect(label, b"d")
        for label in labels:  # release them together (workers.train_loop waits for it; older checkouts' ignore it)
            procs[label][0].stdin.write(b"go\n")
            procs[label][0].stdin.flush()
        out = {}
        for label, (side, method, _, _) in sides.items():
            proc, ack, result, log = procs[label]
            proc.stdin.close()
            rc = proc.wait()
            out[label] = read_worker_result(result, log, rc, side, method, f"{label}-{tag}", t0)
        return out
    finally:
        for proc, ack, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            ack.close()


def run_worker(args, work: Path, side: str, method: str, tag: str) -> dict:
    """Run one worker of this checkout to its end; its result (read_worker_result)."""
    cmd, result, log = worker_command(args, work, side, method, tag)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=worker_env()).returncode
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
        layers = out.get("execution", {}).get("layers")  # older checkouts' workers do not report it
        paths = f", layers compiled {layers['compiled']}/{layers['compiled'] + layers['eager']}" if layers else ""
        print(f"  {tag}: {statistics.median(out['step_times_s']):.3f} s/step, peak RSS "
              f"{out['peak_rss_bytes'] / 2**30:.2f} GiB, held-out {out['heldout_before']:.4f} -> "
              f"{out['heldout_after']:.4f}{paths} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out
