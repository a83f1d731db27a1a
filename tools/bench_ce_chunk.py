"""The loss head with torch.compile on: qtune's vocabulary-blocked cross-entropy against the
full-vocabulary chunks it replaced (2026-12-04).

    python tools/bench_ce_chunk.py                    # SmolLM2's head (49152 × 576), b4 × 256 positions
    python tools/bench_ce_chunk.py --rows 4096 --vocab 128256 --hidden 4096 --repeats 6

Both run the whole head on the same bf16 hidden states h (n, hidden), head W (V, hidden) and targets:
each chunk's z = h·Wᵀ, its loss and dL/dh = (softmax(z) − onehot(y))·W, the compiled kernels as in
training (dynamic shapes). Before: chunks of ce_chunk_tokens positions over the full vocabulary,
one compiled softmax/gradient kernel per chunk (the form of 2026-12-03, kept here as the
reference), so W (V × hidden) streams from memory twice per chunk. After: qtune.model's
_blocked_loss_and_grad, the vocabulary in blocks of CE_VOCAB_BLOCK with an online softmax.
Alternating (the order swapped every repeat); medians and their ratio, and how far each is from an
fp64 computation of the same loss and gradient. Writes tools/results/ce_chunk_kernel.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qtune.model import CE_VOCAB_BLOCK, _blocked_loss_and_grad, ce_block_rows, ce_chunk_tokens


def full_vocab_chunk(head: torch.Tensor, targets: torch.Tensor):
    """The previous compiled chunk kernel (qtune.model._chunk_loss_and_grad up to 2026-12-04)."""
    logits = head.float()
    m = logits.amax(dim=1, keepdim=True)
    e = torch.exp(logits - m)
    s = e.sum(dim=1, keepdim=True)
    grad = (e / s).to(head.dtype)
    z_y = logits.gather(1, targets[:, None])
    loss = (torch.log(s) + m - z_y).sum()
    p_y = torch.exp(z_y - m) / s
    return loss, grad.scatter(1, targets[:, None], (p_y - 1.0).to(head.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rows", type=int, default=1020, help="positions (default: SmolLM2's b4 × 256 minus the shift)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ce_chunk_kernel.md")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.05).to(torch.bfloat16)
    targets = torch.randint(args.vocab, (args.rows,), generator=gen)
    old_kernel = torch.compile(full_vocab_chunk, dynamic=True)
    old_chunk, new_chunk = ce_chunk_tokens(args.vocab), ce_block_rows(args.vocab, args.hidden)

    def old():
        total, grad = 0.0, torch.empty_like(hidden)
        for i in range(0, args.rows, old_chunk):
            loss, gz = old_kernel(F.linear(hidden[i:i + old_chunk], weight), targets[i:i + old_chunk])
            total += loss
            grad[i:i + old_chunk] = gz @ weight
        return total, grad

    def new():
        total, grad = 0.0, torch.empty_like(hidden)
        for i in range(0, args.rows, new_chunk):
            loss, gh = _blocked_loss_and_grad(hidden[i:i + new_chunk], weight, targets[i:i + new_chunk], True)
            total += loss
            grad[i:i + new_chunk] = gh
        return total, grad

    z = hidden.double() @ weight.double().t()
    ref_loss = float((torch.logsumexp(z, 1) - z[torch.arange(args.rows), targets]).sum())
    p = torch.softmax(z, 1)
    p[torch.arange(args.rows), targets] -= 1
    ref_grad = p @ weight.double()
    del z, p
    err = {}
    for name, fn in (("old", old), ("new", new)):
        loss, grad = fn()
        err[name] = (abs(float(loss) - ref_loss) / abs(ref_loss), float((grad.double() - ref_grad).abs().max()))
    times = {"old": [], "new": []}
    for r in range(args.repeats):
        for name, fn in ((("old", old), ("new", new)) if r % 2 else (("new", new), ("old", old))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"# Loss head, compiled ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "",
        f"`python tools/bench_ce_chunk.py --vocab {args.vocab} --hidden {args.hidden} --rows {args.rows}"
        f" --repeats {args.repeats}`: the whole head (z = h·Wᵀ, loss, dL/dh), both compiled, same bf16 inputs,"
        " alternating; medians.",
        "",
        "| form | chunks | ms | loss rel. error vs fp64 | dL/dh max abs. error vs fp64 |",
        "|---|---|---|---|---|",
        f"| full-vocabulary chunks (before) | {old_chunk} positions × {args.vocab} | {1e3 * med['old']:.1f} |"
        f" {err['old'][0]:.1e} | {err['old'][1]:.1e} |",
        f"| vocabulary blocks, online softmax (qtune.model._blocked_loss_and_grad) | {new_chunk} positions ×"
        f" {min(CE_VOCAB_BLOCK, args.vocab)} | {1e3 * med['new']:.1f} | {err['new'][0]:.1e} | {err['new'][1]:.1e} |",
        "",
        f"Ratio after/before: **{med['new'] / med['old']:.3f}×**.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
