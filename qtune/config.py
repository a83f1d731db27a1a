"""The run configuration: one typed dataclass, filled from built-in defaults < a YAML file < flags.

Every field is a `qtune train` flag (dashes for underscores) and a key of run.yaml. Validation
happens on construction, so a bad value fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from qtune.errors import QtuneError

METHOD_ALIASES = {"lora": "qlora", "dora": "qdora", "pissa": "qpissa", "rosa": "qrosa"}
METHODS = ("qlora", "qdora", "qpissa", "qrosa",  # the first wave
           "loha", "lokr", "ia3", "lntuning", "bitfit", "bone", "bat", "adalora", "loradash", "spectral")
# options that belong to one method: given to another, they are refused (None = not given; the method's default)
METHOD_OPTIONS = {"lokr_factor": ("lokr",), "rank_init": ("adalora",), "budget_start": ("adalora",),
                  "budget_end": ("adalora",), "dash_steps": ("loradash",), "dash_directions": ("loradash",),
                  "spectral_variant": ("spectral",)}
# how examples share rows (qtune.data.pack_examples): per-example: first fit, each example its own segment
# (attends to itself only, positions from 0); none: one example per row, padded; contaminated: first fit with
# one segment per row, so that an example attends to those packed before it and continues their positions
# (qtune's behaviour before per-example masks; kept for the benchmarks that measure the difference)
PACKING = ("per-example", "none", "contaminated")
RECOMPUTE = ("default", "full", "max", "weights", "none", "auto")  # --recompute (qtune.engine.recompute)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
DEFAULT_TARGETS = ("all-linear",)  # every linear inside the decoder layers (qtune.architectures)


@dataclass
class TrainConfig:
    """Everything that defines a training run; written to RUN_DIR/run.yaml."""

    model: str | None = None
    """Local folder (config.json + safetensors) or hub id; None = the embedded SmolLM2-135M-Instruct."""
    data: str | None = None
    """.jsonl / .txt file, folder of them, or a local HF dataset folder; None = the shipped dataset."""
    eval_data: str | None = None
    """Held-out data in the same formats; None = a fixed held-out split of `data`."""
    method: str = "qlora"
    """Adapter method: qlora | qdora | qpissa | qrosa (aliases lora, dora, pissa, rosa) | loha | lokr | ia3 |
    lntuning | bitfit | bone | bat | adalora | loradash | spectral (qtune.adapters)."""
    bits: int = 4
    """Storage of the frozen base linears: 4 (NF4/FP4), 8 (8-bit block-wise), 16 (not quantized, bf16)."""
    quant_type: str = "nf4"
    """4-bit code: nf4 (QLoRA's NormalFloat) or fp4."""
    double_quant: bool = True
    """Quantize the block scales again to 8 bits (QLoRA's double quantization, ~0.37 bit/param less)."""
    init: str = "default"
    """Adapter initialisation: default | pissa | milora | loftq."""
    pissa_niter: int = 4
    """Power iterations of the randomized SVD for PiSSA/MiLoRA/LoftQ init (0 = full SVD)."""
    loftq_iters: int = 5
    """Alternations of quantize-residual / SVD-of-error for --init loftq."""
    loftq_start: str = "pissa"
    """Where LoftQ's alternation starts: pissa (PiSSA's factors; lower error) or zero (as published)."""
    dora_detach_norm: bool = True
    """QDoRA: treat the weight norm as a constant in backward (DoRA §4.3); off = exact gradient."""
    recompute: str = "default"
    """What a checkpointed decoder layer keeps from its forward so that its recomputation skips work
    (qtune.engine.recompute): default (the attention's q, k, v and output; QDoRA's down_proj product),
    full (nothing extra: least memory), max (default and gate/up's outputs), weights (max and the base's
    dequantized weights, held for the run), none (no checkpointing at all, the base held as weights holds it)
    or auto (the most of none > weights > max > default > full that the plan fits in --max-memory, else in
    90% of the device; none only where the layers run eagerly)."""
    hold_layers: int = 0
    """--recompute weights: hold the dequantized base of the first N decoder layers only (0 = all of them); the
    others dequantize as under max. --recompute auto picks N where max fits the budget and all of them do not."""
    dora_stash: bool | None = None
    """Older form of recompute's QDoRA down_proj part; None = as recompute says."""
    keep_qkv: bool | None = None
    """Older form of recompute's attention part; None = as recompute says."""
    rosa_density: float = 0.01
    """Fraction of each matrix's entries in RoSA's sparse part."""
    rosa_mask_steps: int = 8
    """Batches of accumulated squared gradients used to choose RoSA's mask."""
    lokr_factor: int | None = None
    """LoKr (KronA): ΔW = A ⊗ B, the Kronecker factors' shapes split each dimension by this factor (as PEFT's
    decompose_factor; default −1: the most balanced split). See qtune.adapters.lokr."""
    rank_init: int | None = None
    """AdaLoRA: the rank each layer starts with, before the budget falls to --rank (default 1.5 × rank)."""
    budget_start: int | None = None
    """AdaLoRA: the step the rank budget starts to fall (the paper's t_i; default 10% of the run)."""
    budget_end: int | None = None
    """AdaLoRA: the step it reaches --rank (the paper's T − t_f; default 70% of the run)."""
    dash_steps: int | None = None
    """LoRA-Dash: steps of plain LoRA before the directions are chosen ("pre-launch", default 100)."""
    dash_directions: int | None = None
    """LoRA-Dash: directions learned per layer after the switch (default 8)."""
    spectral_variant: str | None = None
    """Spectral adapter: additive ([U₁ + A_U] S [V₁ + A_V]ᵀ, the default) or rotate (Cayley-orthogonal R_U, R_V)."""
    rank: int = 16
    """Adapter rank r."""
    alpha: float = 16.0
    """lora_alpha; the adapter scale is alpha/r (alpha/sqrt(r) with --rslora)."""
    rslora: bool = False
    """Use rsLoRA's scale alpha/sqrt(r) (arXiv 2312.03732)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Names of the linear layers that get adapters (last path component)."""
    lora_plus_ratio: float = 1.0
    """LoRA+: learning rate of B = ratio x learning rate of A (1 = plain LoRA)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 4
    """Sequences per micro-batch."""
    packing: str = "per-example"
    """How instruction/chat examples share rows: per-example (packed; each attends to itself only, positions
    restart) | none (one example per row, padded) | contaminated (packed, attending to the examples before it:
    qtune's behaviour before per-example masks, for benchmarks only)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """After warmup: cosine (to 10% of lr) | linear (to 0) | constant."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    optim: str = "adamw"
    """adamw | adamw8bit | paged_adamw | paged_adamw8bit (bitsandbytes). On CPU the paged ones run unpaged."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    epochs: float = 3.0
    """Passes over the training rows when max_steps is not given (3, as transformers' Trainer)."""
    eval_every: int = 50
    """Evaluate held-out loss every N steps (and at the start and end); 0 = only start and end."""
    eval_batches: int = 0
    """Cap on eval micro-batches per evaluation (0 = the whole held-out set)."""
    save_every: int = 100
    """Save a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep the last N complete checkpoints."""
    seed: int = 0
    """Seed of data order, adapter init and dropout."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    compute_dtype: str = "auto"
    """dtype of activations and dequantized weights: auto | bfloat16 | float32 | float16. auto: bfloat16
    on GPUs that have it (else float16) and on CPUs with bf16 matrix kernels (AVX-512, Arm BF16), float32
    on other CPUs, where bf16 GEMMs run tens of times slower (qtune.precision). A run's run.yaml holds
    the dtype it resolved to."""
    offload: str = "none"
    """Where the frozen quantized base lives: none (compute device) | cpu (host memory, copied per use;
    on a CPU-only machine the same as none) | disk (read from the quantized files per use)."""
    offload_activations: bool = False
    """CUDA: keep checkpointed layer inputs in pinned host memory (transformers' offloaded
    checkpointing). Not applicable on CPU (they are in host memory already): ignored with a note."""
    max_memory: float = 0.0
    """GiB the run may use (0 = the device's memory): the plan must fit under it before loading, and
    the run warns when the measured peak exceeds it."""
    compile: bool = True
    """torch.compile the fused elementwise kernels and, on the CPU, whole checkpointed decoder layers of
    LoRA-family and QDoRA runs (qtune.compile); off: the same math, eagerly."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed dataset lines instead of stopping."""
    output: str = "runs/qtune"
    """Run folder: run.yaml, metrics.jsonl, checkpoints/, loss.png."""
    trust_remote_code: bool = False
    """Allow a model's own Python code from its hub repo (off unless asked for)."""

    def __post_init__(self):
        self.method = METHOD_ALIASES.get(self.method, self.method)
        for name, owners in METHOD_OPTIONS.items():
            _check(getattr(self, name) is None or self.method in owners,
                   f"--{name.replace('_', '-')} is an option of --method {'/'.join(owners)}, and this run's method is "
                   f"{self.method}", f"drop --{name.replace('_', '-')} or use --method {owners[0]}")
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        _check(self.method in METHODS, f"unknown method {self.method!r}", f"use one of {', '.join(METHODS)}")
        _check(self.bits in (4, 8, 16), f"unsupported --bits {self.bits}", "use 4, 8 or 16")
        _check(self.quant_type in ("nf4", "fp4"), f"unknown --quant-type {self.quant_type!r}", "use nf4 or fp4")
        _check(self.init in ("default", "pissa", "milora", "loftq"), f"unknown --init {self.init!r}",
               "use default, pissa, milora or loftq")
        _check(self.loftq_start in ("pissa", "zero"), f"unknown --loftq-start {self.loftq_start!r}", "use pissa or zero")
        _check(not (self.init == "loftq" and self.bits == 16), "--init loftq fits the adapter to the quantization "
               "error, and --bits 16 has none", "use --bits 4 or 8 with loftq, or --init pissa at 16 bits")
        _check(self.loftq_iters >= 1, f"--loftq-iters must be at least 1, got {self.loftq_iters}", "pass e.g. 5")
        _check(self.pissa_niter >= 0, f"--pissa-niter must be >= 0, got {self.pissa_niter}", "pass e.g. 4 (0 = full SVD)")
        _check(self.offload in ("none", "cpu", "disk"), f"unknown --offload {self.offload!r}", "use none, cpu or disk")
        _check(self.offload == "none" or self.bits != 16, f"--offload {self.offload} streams a quantized base, and "
               "--bits 16 has none", "use --bits 4 or 8 with --offload")
        _check(self.offload == "none" or self.init == "default", f"--offload {self.offload} reads the shared quantized "
               f"cache, and --init {self.init} rewrites the base", "use --init default with --offload")
        _check(self.method != "spectral" or self.init == "default", f"--method spectral starts from its own split of "
               f"each weight (top singular vectors + quantized residual), and --init {self.init} is another",
               "drop --init with --method spectral")
        _check(self.method != "spectral" or self.offload == "none", f"--offload {self.offload} reads the shared "
               "quantized cache, and --method spectral rewrites the base (its residual)", "use --offload none")
        _check(self.max_memory >= 0, f"--max-memory must be >= 0 GiB, got {self.max_memory}", "pass e.g. 8 (GiB)")
        _check(self.optim in OPTIMIZERS, f"unknown --optim {self.optim!r}", f"use one of {', '.join(OPTIMIZERS)}")
        _check(self.lr_scheduler in ("cosine", "linear", "constant"), f"unknown --lr-scheduler {self.lr_scheduler!r}",
               "use cosine, linear or constant")
        _check(self.compute_dtype in ("auto", "bfloat16", "float32", "float16"),
               f"unknown --compute-dtype {self.compute_dtype!r}", "use auto, bfloat16, float32 or float16")
        _check(self.rank > 0, f"--rank must be positive, got {self.rank}", "pass e.g. --rank 16")
        _check(self.seq_len > 0, f"--seq-len must be positive, got {self.seq_len}", "pass e.g. --seq-len 512")
        _check(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}", "pass e.g. --batch-size 4")
        _check(self.recompute in RECOMPUTE, f"unknown --recompute {self.recompute!r}", f"use one of {', '.join(RECOMPUTE)}")
        _check(not (self.recompute == "weights" and self.offload != "none"),
               f"--recompute weights holds the dequantized base in memory, and --offload {self.offload} streams the base "
               "from elsewhere instead", "use --recompute max (or auto) with --offload, or --offload none")
        _check(self.hold_layers >= 0, f"--hold-layers must be >= 0, got {self.hold_layers}", "pass e.g. 20 (0 = all)")
        _check(self.hold_layers == 0 or self.recompute == "weights", f"--hold-layers {self.hold_layers} applies to "
               f"--recompute weights, and this run has --recompute {self.recompute}",
               "add --recompute weights (auto picks the number itself)")
        _check(self.packing in PACKING, f"unknown --packing {self.packing!r}",
               "use per-example (the default), none, or contaminated (benchmarks only)")
        _check(self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}", "pass e.g. --grad-accum 4")
        _check(self.lr > 0, f"--lr must be positive, got {self.lr}", "pass e.g. --lr 2e-4")
        _check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}", "pass e.g. --dropout 0.05")
        _check(0 < self.rosa_density < 1, f"--rosa-density must be in (0, 1), got {self.rosa_density}",
               "pass e.g. --rosa-density 0.01")
        _check(self.max_steps is None or self.max_steps > 0, f"--max-steps must be positive, got {self.max_steps}",
               "pass e.g. --max-steps 100")
        for name in ("eval_every", "save_every", "eval_batches", "keep_checkpoints", "warmup_steps", "rosa_mask_steps"):
            _check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}",
                   f"pass 0 or a positive --{name.replace('_', '-')}")
        _check(self.epochs > 0, f"--epochs must be positive, got {self.epochs}", "pass e.g. --epochs 1")
        _check(bool(self.target_modules), "--target-modules is empty", "name at least one linear, e.g. q_proj,v_proj")
        if self.method == "qpissa" and self.init == "default":
            self.init = "pissa"

    @property
    def scale(self) -> float:
        """The adapter scale s: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, **flags) -> "TrainConfig":
        """defaults < config file < flags (flags that are None are 'not given')."""
        values = load_yaml(config_file) if config_file else {}
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        _check(not unknown, f"unknown configuration key(s): {', '.join(unknown)}",
               "use the flag names with dashes as underscores (see `qtune train --help`)")
        return cls(**values)


def load_yaml(path: str | Path) -> dict:
    """A flat YAML mapping, read with yaml.safe_load (nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise QtuneError(f"Config file not found: {path}. Pass --config with an existing YAML file.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QtuneError(f"Config file {path} is not valid YAML ({e}). Fix the file or drop --config.") from None
    if not isinstance(values, dict):
        raise QtuneError(f"Config file {path} must hold a mapping of flag names to values. Fix the file.")
    return {k.replace("-", "_"): v for k, v in values.items()}


def load_run_yaml(run_dir: str | Path) -> dict:
    """RUN_DIR/run.yaml, the configuration of a run (yaml.safe_load), with errors that name the fix."""
    path = Path(run_dir) / "run.yaml"
    if not path.is_file():
        raise QtuneError(f"{run_dir} is not a qtune run folder (no run.yaml). Pass the --output of `qtune train`.")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise QtuneError(f"{path} is not valid YAML ({e}). Restore the run's run.yaml, or start a new run.") from None
    if not isinstance(values, dict):
        raise QtuneError(f"{path} must hold a mapping of settings. Restore the run's run.yaml, or start a new run.")
    return values


def _check(ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise QtuneError(f"{problem[0].upper()}{problem[1:]}. Fix: {fix}.")
