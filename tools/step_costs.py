"""What pieces of a qtune QLoRA step cost in place: in-process A/B steps against stand-ins.

    python tools/step_costs.py                # 8 rounds
    python tools/step_costs.py --rounds 12

A profiler inflates small ops and cannot say what a piece costs once its neighbours share the
caches; this builds the benchmark's qtune model once (SmolLM2-135M, QLoRA r16 on all linears,
checkpointing, bf16, AdamW; random token rows of seq 256 × batch 4) and alternates, step by step:
    base           the real step
    cheap_attn     attention replaced by q + v (no scores, no softmax): what attention costs
    cached_deq     dequantized weights kept from the first use: what the 600 dequantizations cost
and, apart, the same step at batch 1 × 8 tokens: the per-step cost no token count removes (Python,
autograd, dispatch, dequantization, the optimizer). Stand-ins change the numbers computed, so these
steps measure time only. Prints medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_peft as bp  # noqa: E402  (the benchmark's setting)


def build(batch: int, seq: int):
    import torch

    from qtune.config import TrainConfig
    from qtune.embedded import default_model_dir
    from qtune.model import build_model, causal_lm_loss
    from qtune.train import _trainable, make_optimizer

    run_dir = tempfile.mkdtemp(prefix="qtune-costs-")
    cfg = TrainConfig(model=str(default_model_dir()), method="qlora", bits=4, rank=bp.RANK, alpha=bp.ALPHA,
                      dropout=0.0, target_modules=bp.TARGETS, seq_len=seq, batch_size=batch, lr=bp.LR,
                      lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, optim="adamw", max_steps=100,
                      gradient_checkpointing=True, compute_dtype="bfloat16", output=run_dir)
    torch.manual_seed(0)
    model, *_ = build_model(cfg, run_dir, progress=False)
    optimizer, trainable = make_optimizer(model, cfg), _trainable(model)
    ids = torch.randint(10, model.config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    model.train()

    def step() -> float:
        t0 = time.perf_counter()
        loss, n = causal_lm_loss(model, ids, mask, ids)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(trainable, bp.MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    bp.quiet_bitsandbytes()
    from transformers import AttentionInterface

    import qtune.kernels as kernels
    from quant.formats import QuantizedWeight

    real_attn, real_deq = kernels.qtune_eager_attention, QuantizedWeight.dequantize
    cache: dict = {}

    def cached_deq(self, dtype=None):
        key = (id(self), dtype)
        if key not in cache:
            cache[key] = real_deq(self, dtype)
        return cache[key]

    def cheap_attn(module, q, k, v, mask, scaling, dropout=0.0, **kw):
        return (q + v.repeat_interleave(q.shape[1] // k.shape[1], 1)).transpose(1, 2).contiguous(), None

    def use(variant: str) -> None:
        AttentionInterface.register(kernels.NAME, cheap_attn if variant == "cheap_attn" else real_attn)
        QuantizedWeight.dequantize = cached_deq if variant == "cached_deq" else real_deq

    variants = ["base", "cheap_attn", "cached_deq"]
    step = build(bp.BATCH, bp.SEQ_LEN)
    for v in variants:  # warm-up (compiles) for each variant
        use(v)
        step(), step()
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            use(v)
            times[v].append(step())
    use("base")
    tiny = build(1, 8)
    for _ in range(2):
        tiny()
    tiny_times = [tiny() for _ in range(args.rounds)]
    base = statistics.median(times["base"])
    print(f"seq {bp.SEQ_LEN} × batch {bp.BATCH}, {args.rounds} alternating rounds, medians:")
    for v in variants:
        m = statistics.median(times[v])
        print(f"  {v:11s} {m:.3f} s/step" + ("" if v == "base" else f"  (the piece costs {base - m:+.3f} s)"))
    print(f"  batch 1 × 8 tokens: {statistics.median(tiny_times):.3f} s/step (the fixed per-step cost)")


if __name__ == "__main__":
    main()
