"""AdaLoRA (arXiv 2303.10512, "Adaptive budget allocation for parameter-efficient fine-tuning") on a frozen
(quantized) base, computed as PEFT 0.21 computes it (peft.tuners.adalora: SVDLinear, RankAllocator,
AdaLoraModel.forward's penalty and update_and_allocate; the parity target).

W₀ = D(Q(W)) (out, in) the dequantized base weight, b its bias; r₀ = --rank-init (every layer is built with r₀
triplets; default 1.5·r rounded half up), r = --rank (the average rank the budget falls to), n = the number of
adapted layers. PEFT's names and shapes: Q = lora_A (r₀, in), P = lora_B (out, r₀), λ = lora_E[:, 0] (lora_E: (r₀, 1)).

    ΔW = s·P·diag(λ)·Q,      y = x·W₀ᵀ + b + s·((dropout(x)·Qᵀ) ⊙ λ)·Pᵀ,      s = α/r₀
Q, P ~ N(0, 0.02²), λ = 0 (PEFT's init): the layer is the base at step 0. s is PEFT's lora_alpha / ranknum with
ranknum = init_r, kept when PEFT loads a pruned adapter (PEFT divides by ranknum + 1e-5, a 1e-6 relative
difference; the PEFT export writes lora_alpha = s·(r₀ + 1e-5) so that PEFT computes s). α is the run's --alpha
(here scale·rank: the layer is given s_run = α/r). --rslora is refused (PEFT's AdaLoRA has no rsLoRA).

Orthogonality (added to the mean token loss by qtune.train.train_step; γ = ORTH_WEIGHT):
    γ · 1/(2n) · Σ_layers (‖PᵀP − I‖_F + ‖QQᵀ − I‖_F)
the mean over the 2n matrices of the Frobenius norm, as PEFT and the authors' loralib compute it (the paper writes
R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F summed over layers); each layer's extra_loss is its 1/(2n) share.

Importance, after every optimizer step t < t_e (w: the updated value, ∇w: step t's gradient, elementwise):
    I = |w ⊙ ∇w|,   Ī ← β₁·Ī + (1 − β₁)·I,   Ū ← β₂·Ū + (1 − β₂)·|I − Ī|,   s(w) = Ī·Ū        (β₁ = β₂ = 0.85)
    S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)                  (triplet i's score)
Budget (the paper's cubic schedule; b⁰ = n·r₀, bᵀ = n·r, t_i = --budget-start, t_e = --budget-end = T − t_f,
by default ⌊T/10⌋ and max(⌊7T/10⌋, t_i + 1) for a run of T steps):
    b(t) = b⁰                                                  t ≤ t_i
    b(t) = ⌊bᵀ + (b⁰ − bᵀ)·(1 − (t − t_i)/(t_e − t_i))³⌋        t_i < t < t_e
    b(t) = bᵀ                                                  t ≥ t_e
Allocation, after each step t_i < t ≤ t_e: τ = the (b⁰ − b(t))-th smallest S over all layers' triplets;
triplet i is kept iff S_i > τ (rank_mask; equal scores can prune a few more) and λ_i ← 0 where it is not (in
place, after the step: a pruned λ_i still gets a gradient and can come back at the next allocation, as in PEFT
and the paper's Λ ← T(Λ̃, S)). The mask made at t_e (from the EMAs of steps < t_e, as PEFT) is final: after each
later step it zeroes λ again. So after every step λ = λ ⊙ mask, and the merge ΔW = s·P·diag(λ)·Q is
s·P·diag(λ ⊙ mask)·Q; nothing is resized. A layer's rank is the number of triplets kept.
The EMAs Ī, Ū and the mask are checkpoint buffers (a resumed run continues exactly); the per-layer ranks go to
RUN_DIR/adalora_ranks.json at t_e and at every evaluation, and to metrics.jsonl (report).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter
from qtune.errors import QtuneError

BETA1 = 0.85  # PEFT's beta1: EMA of the sensitivity I
BETA2 = 0.85  # PEFT's beta2: EMA of the uncertainty |I − Ī|
ORTH_WEIGHT = 0.1  # γ: the paper's and loralib's orth_reg_weight (PEFT 0.21's default is 0.5)
INIT_STD = 0.02  # PEFT's N(0, 0.02²) for P and Q
PEFT_RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5
RANKS_FILE = "adalora_ranks.json"
FACTORS = ("A", "B", "E")  # lora_A = Q, lora_B = P, lora_E = λ


def default_rank_init(rank: int) -> int:
    """1.5 × --rank, rounded half up (the paper's b⁰ = 1.5·bᵀ; PEFT's defaults init_r 12, target_r 8)."""
    return (3 * rank + 1) // 2


def budget_at(step: int, initial: int, target: int, start: int, end: int) -> int:
    """b(t): the total number of triplets kept after step t (the paper's cubic schedule, as PEFT's
    RankAllocator.budget_schedule with tinit = start, total_step − tfinal = end)."""
    if step <= start:
        return initial
    if step >= end:
        return target
    return int((initial - target) * (1 - (step - start) / (end - start)) ** 3 + target)


def resolve_schedule(total_steps: int, budget_start: int | None, budget_end: int | None) -> tuple[int, int]:
    """(t_i, t_e) of a run of total_steps steps: the given values, else 10% and 70% of the run (t_e > t_i);
    a QtuneError names a schedule the run cannot follow."""
    start = total_steps // 10 if budget_start is None else budget_start
    end = max(7 * total_steps // 10, start + 1) if budget_end is None else budget_end
    start_flag = "--budget-start" if budget_start is not None else "--budget-start (default)"
    end_flag = "--budget-end" if budget_end is not None else "--budget-end (default)"
    if start < 0:
        raise QtuneError(f"--budget-start must be 0 or more, got {start}. "
                         f"Pass e.g. --budget-start {total_steps // 10}.")
    if end <= start:
        raise QtuneError(f"{end_flag} {end} is not after {start_flag} {start}: AdaLoRA's budget falls from "
                         f"--rank-init to --rank between the two. Pass a --budget-end larger than {start} (or a "
                         "smaller --budget-start).")
    if end > total_steps:
        raise QtuneError(f"{end_flag} {end} is past the run's last step {total_steps}: the rank budget would never "
                         f"reach --rank. Pass --budget-end {total_steps} or less (or more --max-steps).")
    return start, end


def _write_json_atomically(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class AdaLoRALinear(Adapter):
    """The frozen base linear plus s·P·diag(λ)·Q with r₀ triplets, of which a global budget keeps the most important."""

    peft_type = "ADALORA"
    checkpoint_buffers = ("sensitivity_A", "sensitivity_B", "sensitivity_E",
                          "uncertainty_A", "uncertainty_B", "uncertainty_E", "rank_mask", "budget_schedule")

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 rank_init: int | None = None, budget_start: int | None = None, budget_end: int | None = None,
                 rslora: bool = False):
        super().__init__()
        _check_options(rank, rank_init, budget_start, budget_end, rslora)
        self.base_layer = base_layer
        self.rank = rank
        self.rank_init = r0 = default_rank_init(rank) if rank_init is None else rank_init
        self.options = {"budget_start": budget_start, "budget_end": budget_end}  # resolved by start_training
        self.scale = scale * rank / r0  # α/r₀ (scale = α/r)
        self.lora_A = nn.Parameter(torch.empty(r0, base_layer.in_features).normal_(0.0, INIT_STD))   # Q
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, r0).normal_(0.0, INIT_STD))  # P
        self.lora_E = nn.Parameter(torch.zeros(r0, 1))                                               # λ
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for f in FACTORS:
            p = getattr(self, f"lora_{f}")
            self.register_buffer(f"sensitivity_{f}", torch.zeros_like(p), persistent=False)  # Ī
            self.register_buffer(f"uncertainty_{f}", torch.zeros_like(p), persistent=False)  # Ū
        self.register_buffer("rank_mask", torch.ones(r0, dtype=torch.bool), persistent=False)
        # (t_i, t_e, T) of the run, set by start_training; export reads it for PEFT's tinit/tfinal/total_step
        self.register_buffer("budget_schedule", torch.zeros(3, dtype=torch.int64), persistent=False)
        self.schedule: tuple[int, int, int] | None = None  # the same (t_i, t_e, T) as Python ints: no device sync
        self.layers_in_run = 1  # n, for the penalty's 1/(2n) share (start_training)
        self.run_dir: Path | None = None
        self.steps_done = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, lam, p = self.lora_A.to(x.dtype), self.lora_E.to(x.dtype)[:, 0], self.lora_B.to(x.dtype)
        h = F.linear(self.dropout(x), q) * lam  # (..., r₀): (x·Qᵀ) ⊙ λ
        return self.base_layer(x) + self.scale * F.linear(h, p)  # (..., out)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s·P·diag(λ)·Q, (out, in) fp32 (λ = λ ⊙ mask after every step; independent of W₀)."""
        return self.scale * (self.lora_B.float() @ (self.lora_E.float() * self.lora_A.float()))

    def extra_loss(self) -> torch.Tensor:
        """γ/(2n)·(‖PᵀP − I‖_F + ‖QQᵀ − I‖_F): this layer's share of the mean over the 2n matrices."""
        q, p = self.lora_A, self.lora_B
        eye = torch.eye(self.rank_init, device=q.device, dtype=q.dtype)
        penalty = torch.linalg.matrix_norm(p.T @ p - eye) + torch.linalg.matrix_norm(q @ q.T - eye)
        return ORTH_WEIGHT * penalty / (2 * self.layers_in_run)

    # --- the budget: importance, allocation, the mask ---
    @torch.no_grad()
    def update_importance(self) -> None:
        """Ī and Ū of every entry of Q, P, λ from this step's gradient (call after the optimizer step)."""
        for f in FACTORS:
            w = getattr(self, f"lora_{f}")
            grad = w.grad if w.grad is not None else torch.zeros_like(w)
            sensitivity = (w * grad).abs()  # I = |w ⊙ ∇w|
            avg, unc = getattr(self, f"sensitivity_{f}"), getattr(self, f"uncertainty_{f}")
            avg.copy_(BETA1 * avg + (1 - BETA1) * sensitivity)
            unc.copy_(BETA2 * unc + (1 - BETA2) * (sensitivity - avg).abs())

    def triplet_scores(self) -> torch.Tensor:
        """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), s = Ī·Ū; (r₀,)."""
        s_q = self.sensitivity_A * self.uncertainty_A  # (r₀, in)
        s_p = self.sensitivity_B * self.uncertainty_B  # (out, r₀)
        s_lam = self.sensitivity_E * self.uncertainty_E  # (r₀, 1)
        return s_lam.view(-1) + (s_q.mean(1) + s_p.mean(0))  # PEFT's order of the sums

    @torch.no_grad()
    def apply_mask(self) -> None:
        """λ_i ← 0 for every triplet the budget does not keep."""
        self.lora_E.masked_fill_(~self.rank_mask[:, None], 0.0)

    @property
    def current_rank(self) -> int:
        return int(self.rank_mask.sum())

    # --- the whole method's hooks ---
    @classmethod
    def start_training(cls, layers: dict[str, Adapter], total_steps: int, run_dir) -> None:
        """Resolves the budget schedule (t_i, t_e) for this run and stores it, the run folder and n on every layer."""
        if not layers:
            return
        first = next(iter(layers.values()))
        start, end = resolve_schedule(total_steps, first.options["budget_start"], first.options["budget_end"])
        for layer in layers.values():
            layer.schedule = (start, end, total_steps)
            layer.budget_schedule.copy_(torch.tensor(layer.schedule))
            layer.layers_in_run = len(layers)
            layer.run_dir = Path(run_dir) if run_dir is not None else None

    @classmethod
    def after_step(cls, layers: dict[str, Adapter], step: int) -> None:
        """After optimizer step `step` (p.grad still holds its gradient): the importance EMAs (t < t_e), the global
        budget b(t) and the mask from the triplet scores (t_i < t ≤ t_e), then λ ⊙ mask (t > t_i)."""
        group = list(layers.values())
        if group[0].schedule is None:
            raise QtuneError("AdaLoRA's rank budget needs the run's length: call AdaLoRALinear.start_training(layers, "
                             "total_steps, run_dir) before the first step (qtune.train.train does).")
        start, end, _ = group[0].schedule
        if step < end:
            for layer in group:
                layer.update_importance()
        if start < step <= end:
            initial = sum(layer.rank_init for layer in group)
            pruned = initial - budget_at(step, initial, sum(layer.rank for layer in group), start, end)
            scores = [layer.triplet_scores() for layer in group]
            threshold = torch.kthvalue(torch.cat(scores), pruned).values if pruned > 0 else None
            for layer, s in zip(group, scores):
                if threshold is None:
                    layer.rank_mask.fill_(True)
                else:
                    layer.rank_mask.copy_(s > threshold)  # PEFT masks S ≤ τ
        if step > start:
            for layer in group:
                layer.apply_mask()
        for layer in group:
            layer.steps_done = step
        if step == end:
            cls.write_ranks(layers)

    @classmethod
    def report(cls, layers: dict[str, Adapter]) -> dict | None:
        """{"budget": b(t), "target_budget": bᵀ, "ranks": {layer: rank}}; also written to RUN_DIR/adalora_ranks.json."""
        if not layers:
            return None
        return cls.write_ranks(layers)

    @classmethod
    def write_ranks(cls, layers: dict[str, Adapter]) -> dict:
        """The report's dict, also written (atomically) to RUN_DIR/adalora_ranks.json with the step and schedule."""
        group = list(layers.values())
        first = group[0]
        start, end, _ = (int(v) for v in first.budget_schedule)
        initial, target = sum(m.rank_init for m in group), sum(m.rank for m in group)
        step = first.steps_done
        reported = {"budget": budget_at(step, initial, target, start, end), "target_budget": target,
                    "rank_total": sum(m.current_rank for m in group),
                    "ranks": {name: m.current_rank for name, m in layers.items()}}
        if first.run_dir is not None and first.run_dir.is_dir():
            _write_json_atomically(first.run_dir / RANKS_FILE,
                                   {"step": step, "final": step >= end, "budget_start": start, "budget_end": end,
                                    "rank_init": first.rank_init, **reported})
        return reported

    # --- what the plan counts and what a run refuses ---
    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        r0 = options.get("rank_init") or default_rank_init(rank)
        return [r0 * module.in_features, module.out_features * r0, r0]  # Q, P, λ: r₀ rows (the mask resizes nothing)

    @classmethod
    def state_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        """fp32 elements of its training-state buffers: Ī and Ū of every trainable entry (for qtune.plan; the
        rank mask, r₀ bools, is left out)."""
        return 2 * cls.trainable_sizes(module, rank, options)

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """--rank-init ≥ --rank and ≤ every target's min(out, in); --budget-end after --budget-start; no --rslora.
        (Whether --budget-end fits the run's length is checked by start_training, which knows it.)"""
        _check_options(rank, options.get("rank_init"), options.get("budget_start"), options.get("budget_end"),
                       options.get("rslora", False))
        r0 = options.get("rank_init") or default_rank_init(rank)
        for name in targets:
            m = model.get_submodule(name)
            limit = min(m.in_features, m.out_features)
            if r0 > limit:
                which = "--rank-init" if options.get("rank_init") else f"--rank-init (default 1.5 × --rank {rank})"
                raise QtuneError(f"AdaLoRA's starting rank {r0} ({which}) is larger than layer {name} "
                                 f"(out {m.out_features}, in {m.in_features}) allows (at most {limit}). Pass "
                                 f"--rank-init {limit} or less (and --rank at most that).")

    # --- PEFT's format ---
    @classmethod
    def peft_config(cls, cfg, target_leaves: list[str], layers: dict[str, Adapter]) -> dict:
        """AdaLoraConfig's keys: r₀, r, α (= s·(r₀ + 1e-5), PEFT's scaling over ranknum), the schedule, and
        rank_pattern (each layer's kept triplets: PEFT then loads the pruned tensors peft_tensors writes)."""
        first = next(iter(layers.values()))
        start, end, total = (int(v) for v in first.budget_schedule)
        if total == 0:  # never trained (no schedule): any valid one, PEFT only checks it
            start, end, total = 0, 1, 1
        return {"init_r": first.rank_init, "target_r": first.rank,
                "lora_alpha": first.scale * (first.rank_init + PEFT_RANKNUM_EPS), "lora_dropout": cfg.dropout,
                "target_modules": target_leaves, "tinit": start, "tfinal": total - end, "total_step": total,
                "deltaT": 1, "beta1": BETA1, "beta2": BETA2, "orth_reg_weight": ORTH_WEIGHT,
                "rank_pattern": {f"{name}.lora_E": m.rank_mask.tolist() for name, m in layers.items()},
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None}

    def peft_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The kept triplets only, as PEFT's own save writes an adapter with a rank_pattern."""
        keep = self.rank_mask
        return {f"{prefix}.lora_A": self.lora_A.detach().float()[keep],
                f"{prefix}.lora_B": self.lora_B.detach().float()[:, keep],
                f"{prefix}.lora_E": self.lora_E.detach().float()[keep]}


def _check_options(rank: int, rank_init: int | None, budget_start: int | None, budget_end: int | None,
                   rslora: bool) -> None:
    """What can be refused before the run's length is known."""
    if rslora:
        raise QtuneError("AdaLoRA scales its update by --alpha / --rank-init (PEFT's lora_alpha / ranknum); --rslora "
                         "does not apply to it. Drop --rslora.")
    if rank_init is not None and rank_init < rank:
        raise QtuneError(f"--rank-init {rank_init} is below --rank {rank}: AdaLoRA starts every layer at --rank-init "
                         f"and prunes the budget down to an average of --rank. Pass --rank-init {rank} or more "
                         f"(default 1.5 × --rank = {default_rank_init(rank)}), or a smaller --rank.")
    if budget_start is not None and budget_start < 0:
        raise QtuneError(f"--budget-start must be 0 or more, got {budget_start}. Pass e.g. --budget-start 0.")
    if budget_end is not None and budget_end < 1:
        raise QtuneError(f"--budget-end must be 1 or more, got {budget_end}. Pass a step of the run.")
    if budget_start is not None and budget_end is not None and budget_end <= budget_start:
        raise QtuneError(f"--budget-end {budget_end} is not after --budget-start {budget_start}: AdaLoRA's budget "
                         f"falls from --rank-init to --rank between the two. Pass a --budget-end larger than "
                         f"{budget_start}.")
