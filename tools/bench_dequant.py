"""NF4 dequantization: bitsandbytes' CPU kernel on decode_rows' 2-D shape against one flat row.

    python tools/bench_dequant.py                     # SmolLM2-135M's linear shapes, 2 threads
    python tools/bench_dequant.py --repeats 400

bitsandbytes' CPU kernel decodes one row per thread. qtune used to hand it one flat row ([1, numel],
right for every shape but run on one thread); quant.formats.decode_rows hands it rows made of whole
quantization blocks. For each (out, in) linear shape of SmolLM2-135M, both forms run on the same
double-quantized NF4 weight into bf16, alternating (the order swapped every repeat); the figures are
the median times, their ratio, and the per-step total over the 420 dequantizations a compiled qlora
step does (7 linears × 30 layers × forward and backward). The two outputs are checked equal bit for
bit first. Writes tools/results/dequant_rows.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from quant.formats import decode_rows, quantize

# SmolLM2-135M's linears, (out, in), and how many of each a layer has
SHAPES = {"q/o_proj (576, 576)": ((576, 576), 2), "k/v_proj (192, 576)": ((192, 576), 2),
          "gate/up_proj (1536, 576)": ((1536, 576), 2), "down_proj (576, 1536)": ((576, 1536), 1)}
LAYERS, PASSES = 30, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dequant_rows.md")
    args = ap.parse_args()
    ops = torch.ops.bitsandbytes
    rows_out, step = [], {"flat": 0.0, "rows": 0.0}
    for name, (shape, per_layer) in SHAPES.items():
        qw = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(0)), "nf4", double_quant=True)
        absmax = qw.block_scales()
        forms = {"flat": [1, qw.shape.numel()], "rows": decode_rows(qw.shape, qw.blocksize)}

        def run(form):
            return ops.dequantize_4bit(qw.packed, absmax, qw.blocksize, "nf4", forms[form], torch.bfloat16)

        if not torch.equal(run("flat").view(-1), run("rows").view(-1)):
            raise SystemExit(f"{name}: the two forms decode differently")
        times = {"flat": [], "rows": []}
        for r in range(args.repeats):
            for form in (("flat", "rows") if r % 2 else ("rows", "flat")):
                t = time.perf_counter()
                run(form)
                times[form].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in step:
            step[k] += med[k] * per_layer * LAYERS * PASSES
        rows_out.append(f"| {name} | {forms['rows']} | {med['flat'] * 1e3:.3f} | {med['rows'] * 1e3:.3f} "
                        f"| {med['rows'] / med['flat']:.2f}× |")
    lines = [
        f"# NF4 dequantize: decode_rows against one flat row ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "",
        f"bitsandbytes' CPU `dequantize_4bit` into bf16, double-quantized NF4 (block 64), the absmax decoded "
        f"beforehand; {args.repeats} alternating repeats, medians. Outputs equal bit for bit.",
        "",
        "| weight (out, in) | decode_rows shape | flat [1, numel] ms | decode_rows ms | ratio |",
        "|---|---|---|---|---|",
        *rows_out,
        "",
        f"Per compiled qlora step ({LAYERS} layers × 7 linears × {PASSES} passes = 420 calls): "
        f"flat {step['flat'] * 1e3:.1f} ms, decode_rows {step['rows'] * 1e3:.1f} ms "
        f"({step['rows'] / step['flat']:.2f}×, {(step['flat'] - step['rows']) * 1e3:.1f} ms saved).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
