"""What QDoRA costs beyond QLoRA, measured two ways in one process (no drift between runs).

    python tools/dora_costs.py                 # 8 alternating rounds + the per-node microbenchmark
    python tools/dora_costs.py --rounds 20 --skip-nodes
    python tools/dora_costs.py --skip-nodes --ablate   # + what the norms and Σ g ⊙ y cost in a real step

1. Steps: the benchmark's qtune setting (SmolLM2-135M, r16 on all linears, checkpointing, bf16,
   AdamW, random token rows of seq 256 × batch 4), one model per variant — qlora, qdora,
   qdora with --no-dora-stash — built once, then one step of each in turn per round. Prints each
   variant's median step, the median of its per-round ratio to the QLoRA step, and the medians of
   its forward / backward / optimizer phases. With --ablate, two more qdora models whose steps leave
   out one piece of work (timing only: their math is wrong): "norms free" reuses its first norms
   (no plain dequantization, A·Wᵀ or row-norm ops in the forward), "no Σ g⊙y" returns zeros for the
   magnitude's gradient reduction. Their difference to qdora is what that piece costs in the step,
   with the caches as a real step leaves them (a node microbenchmark runs on hot caches).
   With --grad-accum K each step is K micro-batches inside parameters_fixed(), as qtune.train runs
   them, plus a qdora variant without it (its norms computed in every micro-batch).
2. Nodes: one LoRA and one DoRA autograd node on an NF4 base for each of SmolLM2's linear shapes,
   1,024 tokens, timed apart (median of 30): forward, forward with the norms reused (a recomputation)
   and backward, summed over a step's 7 × 30 linears (forward + recomputation + backward).
bench_methods.py is the measure for the issue's goal (two processes in lockstep); this says where it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_peft as bp  # noqa: E402  (the benchmark's setting)


class Ablation:
    """Pieces of QDoRA's work to leave out while one variant steps (timing only, see --ablate)."""
    norms_free = False
    no_grad_m_dots = False

    @classmethod
    def install(cls) -> None:
        import torch

        import qtune.adapters.dora as dora
        from quant.formats import QuantizedWeight

        dots, fused, dequantize = dora._column_dots, dora._fused_norms, QuantizedWeight.dequantize
        first: dict = {}

        def column_dots(g, u, den):
            return torch.zeros_like(den) if cls.no_grad_m_dots else dots(g, u, den)

        def fused_norms(w, a, w_sq, *rest):  # a layer's first norms, reused: keyed on its ‖W‖² tensor
            if not cls.norms_free:
                return fused(w, a, w_sq, *rest)
            if id(w_sq) not in first:
                first[id(w_sq)] = fused(w, a, w_sq, *rest)
            return first[id(w_sq)]

        def dequantize_(self, dtype=None, row_scale=None, scales=None):  # the forward's plain one, for A·Wᵀ
            if cls.norms_free and row_scale is None and scales is not None:
                key = (id(self), "plain")
                if key not in first:
                    first[key] = dequantize(self, dtype, None, scales)
                return first[key]
            return dequantize(self, dtype, row_scale, scales)

        dora._column_dots, dora._fused_norms, QuantizedWeight.dequantize = column_dots, fused_norms, dequantize_


GRAD_ACCUM = 1  # micro-batches per step (--grad-accum), inside parameters_fixed() as qtune.train runs them


def build(method: str, stash: bool = True, fixed: bool = True):
    import torch

    from qtune.adapters.dora import parameters_fixed
    from qtune.config import TrainConfig
    from qtune.embedded import default_model_dir
    from qtune.model import build_model, causal_lm_loss
    from qtune.train import _trainable, make_optimizer

    run_dir = tempfile.mkdtemp(prefix="qtune-dora-costs-")
    cfg = TrainConfig(model=str(default_model_dir()), method=method, bits=4, rank=bp.RANK, alpha=bp.ALPHA,
                      dropout=0.0, target_modules=bp.TARGETS, seq_len=bp.SEQ_LEN, batch_size=bp.BATCH, lr=bp.LR,
                      lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, optim="adamw", max_steps=100,
                      gradient_checkpointing=True, compute_dtype="bfloat16", dora_stash=stash, output=run_dir)
    torch.manual_seed(0)
    model, *_ = build_model(cfg, run_dir, progress=False)
    optimizer, trainable = make_optimizer(model, cfg), _trainable(model)
    ids = torch.randint(10, model.config.vocab_size, (bp.BATCH, bp.SEQ_LEN), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    model.train()

    def step() -> tuple[float, float, float]:
        fwd = bwd = 0.0
        with parameters_fixed() if fixed else contextlib.nullcontext():
            for _ in range(GRAD_ACCUM):
                t0 = time.perf_counter()
                loss, n = causal_lm_loss(model, ids, mask, ids)
                t1 = time.perf_counter()
                (loss / n).backward()
                t2 = time.perf_counter()
                fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
        torch.nn.utils.clip_grad_norm_(trainable, bp.MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return fwd, bwd, time.perf_counter() - t2

    return step


def steps(rounds: int, ablate: bool = False) -> None:
    variants = {"qlora": build("qlora"), "qdora": build("qdora"), "qdora --no-dora-stash": build("qdora", False)}
    if GRAD_ACCUM > 1:  # what computing the norms once per step (parameters_fixed) saves
        variants["qdora, norms every micro-batch"] = build("qdora", fixed=False)
    leave_out = {}
    if ablate:
        Ablation.install()
        variants["qdora, norms free"], leave_out["qdora, norms free"] = build("qdora"), "norms_free"
        variants["qdora, no Σ g⊙y"], leave_out["qdora, no Σ g⊙y"] = build("qdora"), "no_grad_m_dots"

    def run(v: str):
        flag = leave_out.get(v)
        if flag:
            setattr(Ablation, flag, True)
        try:
            return variants[v]()
        finally:
            if flag:
                setattr(Ablation, flag, False)
    for v in variants:  # warm-up (compiles)
        run(v), run(v)
    phases = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            phases[v].append(run(v))
    base = [sum(p) for p in phases["qlora"]]
    print(f"steps of {GRAD_ACCUM} × seq {bp.SEQ_LEN} × batch {bp.BATCH}, {rounds} alternating rounds (medians):")
    for v, ps in phases.items():
        total = [sum(p) for p in ps]
        ratio = statistics.median(t / b for t, b in zip(total, base))
        fwd, bwd, opt = (statistics.median(x) for x in zip(*ps))
        print(f"  {v:22s} {statistics.median(total):.3f} s/step, {ratio:.3f}x QLoRA; "
              f"forward {fwd:.3f}, backward {bwd:.3f}, optimizer {opt:.3f} s")


def nodes() -> None:
    import torch

    from qtune.adapters.dora import DoRALinear, _DoRALinearFn
    from qtune.adapters.lora import LoRALinear, _LoRALinearFn
    from quant import QuantLinear

    def median_ms(f, n: int = 30) -> float:
        for _ in range(3):
            f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    torch.manual_seed(0)
    tokens, layers = bp.BATCH * bp.SEQ_LEN, 30
    # SmolLM2's (out, in) shapes and how many of each a layer has: q,o / k,v / gate,up / down
    shapes = [((576, 576), 2), ((192, 576), 2), ((1536, 576), 2), ((576, 1536), 1)]
    total = {"lora": 0.0, "dora": 0.0}
    print(f"nodes, {tokens} tokens, r {bp.RANK}, median ms (forward, recomputation, backward):")
    for (out_f, in_f), count in shapes:
        base = QuantLinear.from_linear(torch.nn.Linear(in_f, out_f, bias=False), compute_dtype=torch.bfloat16)
        lo, do = LoRALinear(base, bp.RANK, 1.0), DoRALinear(base, bp.RANK, 1.0)
        with torch.no_grad():
            lo.lora_B.normal_(0, 0.01), do.lora_B.normal_(0, 0.01)
        x = torch.randn(tokens, in_f).bfloat16().requires_grad_()
        g = torch.randn(tokens, out_f).bfloat16()
        w_sq = do._frozen_row_sq(x)
        sink: list = []
        _DoRALinearFn.apply(x, do.lora_A, do.lora_B, do.magnitude, base, 1.0, w_sq, None, sink, 0)
        lora = lambda: _LoRALinearFn.apply(x, x, lo.lora_A, lo.lora_B, base, 1.0, False, None, None)  # noqa: E731
        dora = lambda: _DoRALinearFn.apply(x, do.lora_A, do.lora_B, do.magnitude, base, 1.0, w_sq, None, [], 0)  # noqa: E731
        dora_re = lambda: _DoRALinearFn.apply(x, do.lora_A, do.lora_B, do.magnitude, base, 1.0, w_sq,  # noqa: E731
                                              sink[0], None, 0)
        lf = median_ms(lora)
        lb = median_ms(lambda: torch.autograd.grad(lora(), [x, lo.lora_A, lo.lora_B], g)) - lf
        df, dr = median_ms(dora), median_ms(dora_re)
        db = median_ms(lambda: torch.autograd.grad(dora_re(), [x, do.lora_A, do.lora_B, do.magnitude], g)) - dr
        print(f"  ({out_f}, {in_f}): LoRA {lf:.3f}, {lf:.3f}, {lb:.3f} | DoRA {df:.3f}, {dr:.3f}, {db:.3f}")
        total["lora"] += count * layers * (2 * lf + lb)
        total["dora"] += count * layers * (df + dr + db)
    print(f"  a step's {7 * layers} linears: LoRA nodes {total['lora']:.0f} ms, DoRA nodes {total['dora']:.0f} ms "
          "(neither skips down_proj's recomputation here)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--skip-nodes", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--ablate", action="store_true", help="two more qdora variants, each leaving out one piece")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per step; > 1 adds qdora computing its norms in every micro-batch")
    args = ap.parse_args()
    global GRAD_ACCUM
    GRAD_ACCUM = max(1, args.grad_accum)
    bp.quiet_bitsandbytes()
    if not args.skip_nodes:
        nodes()
    if not args.skip_steps:
        steps(args.rounds, args.ablate)


if __name__ == "__main__":
    main()
