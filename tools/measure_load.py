"""Peak memory while loading and quantizing a model, against what it should be:
the largest shard + the quantized model (the streaming loader's promise); for a GGUF file (the
embedded default), the largest tensor decoded to fp32 + the quantized model.

Runs the load in a fresh process (fresh cache, so it really quantizes) and reports the process's
peak RSS, the RSS after imports, the quantized model's bytes and the largest shard's bytes.

    python tools/measure_load.py                 # the embedded SmolLM2-135M (its GGUF file)
    python tools/measure_load.py --model DIR     # a safetensors folder, or a .gguf file
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, torch
from pathlib import Path
from qtune.loader import QuantSpec, load_model, resolve_model_dir, shard_files
from qtune.memory import peak_rss_bytes as rss
from qtune.loader import build_skeleton, load_config
from quant import quantize
model_dir = resolve_model_dir(sys.argv[1] or None)
# the baseline: every library the load uses, imported and warmed up (transformers' model classes,
# bitsandbytes' kernels), and the skeleton on the meta device
build_skeleton(load_config(model_dir), torch.bfloat16)
quantize(torch.randn(64, 64))
import_peak = rss()
t = time.time()
model = load_model(model_dir, QuantSpec(4), torch.bfloat16, progress=False, use_cache=False)
seconds = time.time() - t
held = sum(p.numel() * p.element_size() for p in model.parameters())
held += sum(m.qweight.nbytes() for m in model.modules() if hasattr(m, "qweight"))
from qtune.gguf_io import is_gguf, reader
if is_gguf(model_dir):  # the unit in flight is one tensor, decoded to fp32; the file is mapped, never read whole
    largest, total = max(int(t.n_elements) * 4 for t in reader(model_dir).tensors), model_dir.stat().st_size
else:
    largest = max(p.stat().st_size for p in shard_files(model_dir))
    total = sum(p.stat().st_size for p in shard_files(model_dir))
print(json.dumps({"model": model_dir.name, "import_peak_rss": import_peak, "load_peak_rss": rss(),
                  "seconds": seconds, "quantized_model_bytes": held,
                  "largest_shard_bytes": largest, "checkpoint_bytes": total}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="")
    args = ap.parse_args()
    # resolve (and convert, for the embedded model) first, so the measured process only loads
    subprocess.run([sys.executable, "-c", "import sys; from qtune.loader import resolve_model_dir; "
                    "resolve_model_dir(sys.argv[1] or None)", args.model], check=True)
    out = subprocess.run([sys.executable, "-c", CHILD, args.model], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    growth = r["load_peak_rss"] - r["import_peak_rss"]
    print(f"{r['model']}: checkpoint {mib(r['checkpoint_bytes'])} (largest shard {mib(r['largest_shard_bytes'])}), "
          f"quantized model {mib(r['quantized_model_bytes'])}, load {r['seconds']:.1f} s\n"
          f"peak RSS {mib(r['load_peak_rss'])} = libraries {mib(r['import_peak_rss'])} + {mib(growth)} for loading; "
          f"budget (largest shard or decoded tensor + quantized model) {mib(r['largest_shard_bytes'] + r['quantized_model_bytes'])}")


if __name__ == "__main__":
    main()
