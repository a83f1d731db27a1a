"""The cross-entropy chunk's compiled kernel: qtune's against the logsumexp/one-hot form it replaced.

    python tools/bench_ce_chunk.py                    # SmolLM2's vocab, its chunk of 227 positions
    python tools/bench_ce_chunk.py --rows 512 --vocab 128256 --repeats 40

Both are torch.compile'd (dynamic shapes, as in training) and run on the same bf16 head output z
(c, V) and targets, alternating (the order swapped every repeat); the figure is the median time of
each and their ratio. Also printed: how far the two agree (loss, max |Δ gradient|). Writes
tools/results/ce_chunk_kernel.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qtune.model import _chunk_loss_and_grad, ce_chunk_tokens


def logsumexp_onehot(head: torch.Tensor, targets: torch.Tensor):
    """The previous form (up to 2026-12-03): logsumexp, then exp(z − lse) − one_hot(y)."""
    logits = head.float()
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return loss, (torch.exp(logits - lse[:, None]) - onehot).to(head.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, default=0, help="positions in the chunk (default: qtune's chunk for --vocab)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ce_chunk_kernel.md")
    args = ap.parse_args()
    rows = args.rows or ce_chunk_tokens(args.vocab)
    gen = torch.Generator().manual_seed(0)
    head = (torch.randn(rows, args.vocab, generator=gen) * 3).to(torch.bfloat16)
    targets = torch.randint(args.vocab, (rows,), generator=gen)
    old = torch.compile(logsumexp_onehot, dynamic=True)
    new = _chunk_loss_and_grad  # compiled by qtune.compile.maybe_compile
    ref_loss, ref_grad = old(head, targets)
    loss, grad = new(head, targets)
    d_loss = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
    d_grad = float((grad.float() - ref_grad.float()).abs().max())
    times = {"old": [], "new": []}
    for r in range(args.repeats):
        for name, fn in ((("old", old), ("new", new)) if r % 2 else (("new", new), ("old", old))):
            t = time.perf_counter()
            fn(head, targets)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"# Cross-entropy chunk kernel ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "",
        f"`python tools/bench_ce_chunk.py --vocab {args.vocab} --rows {rows} --repeats {args.repeats}`: both compiled,"
        f" same bf16 z ({rows} × {args.vocab}), alternating; medians.",
        "",
        "| kernel | ms per chunk |",
        "|---|---|",
        f"| logsumexp + one_hot (before) | {1e3 * med['old']:.2f} |",
        f"| softmax form + scatter of the targets (qtune.model._chunk_loss_and_grad) | {1e3 * med['new']:.2f} |",
        "",
        f"Ratio new/old: **{med['new'] / med['old']:.3f}×**. Agreement: loss relative Δ {d_loss:.1e},"
        f" gradient max |Δ| {d_grad:.1e} (bf16 outputs).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
