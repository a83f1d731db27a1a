"""`qtune`: the command line. Thin: it parses flags into a TrainConfig and calls library functions."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qtune.config import RECOMPUTE
from qtune.errors import QtuneError

EPILOG = """\b
Examples:
  qtune train                                   # the embedded default: SmolLM2-135M + shipped dataset
  qtune train --model ./Llama-2-7b-hf --data chat.jsonl --method qlora --bits 4 --output runs/llama
  qtune train --config run.yaml --lr 1e-4       # flags override the YAML file
  qtune train --output runs/llama --resume      # continue from the last checkpoint
  qtune export --run runs/llama --output merged/
  qtune export --run runs/llama --output adapter/ --format peft
  qtune generate --run runs/llama --prompt "Tell me about the sea"
  qtune eval --run runs/llama --data held_out.jsonl    # loss and perplexity of the run
  qtune eval --model merged/ --data held_out.jsonl     # the same of its merged export
"""


def _run(fn, debug: bool):
    try:
        return fn()
    except QtuneError as e:
        if debug:
            raise
        click.echo(f"qtune: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("qtune: interrupted; the last complete checkpoint is kept (resume with --resume).", err=True)
        sys.exit(130)
    except MemoryError:
        if debug:
            raise
        click.echo("qtune: error: out of memory. Lower --batch-size or --seq-len, or use --bits 4.", err=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback unless --debug
        if debug:
            raise
        click.echo(f"qtune: error: {type(e).__name__}: {e}. Re-run with --debug for the traceback, and please "
                   "report it.", err=True)
        sys.exit(1)


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qtune-llm")
def main():
    """qtune: fine-tune a causal LM with its frozen weights in 4-bit NF4 (QLoRA and friends),
    on one GPU or on the CPU."""


def _opt(*names, **kw):
    kw.setdefault("default", None)
    return click.option(*names, **kw)


TRAIN_OPTIONS = [
    _opt("--config", "config_file", type=click.Path(), help="YAML file of flag values (dashes as underscores)."),
    _opt("--model", help="Local model folder or hub id (default: embedded SmolLM2-135M-Instruct)."),
    _opt("--data", help=".jsonl/.txt file, folder, or local HF dataset (default: the shipped dataset)."),
    _opt("--eval-data", help="Held-out data (default: a fixed split of --data)."),
    _opt("--method", help="qlora | qdora | qpissa | qrosa (aliases lora, dora, pissa, rosa) | loha | lokr | ia3 | "
                          "lntuning | bitfit | bone | bat | adalora | loradash | spectral."),
    _opt("--bits", type=int, help="Frozen base storage: 4 (default), 8, or 16 (unquantized bf16)."),
    _opt("--quant-type", help="4-bit code: nf4 (default) or fp4."),
    _opt("--double-quant/--no-double-quant", default=None, help="Quantize the block scales too (default on)."),
    _opt("--init", help="Adapter init: default | pissa | milora | loftq."),
    _opt("--pissa-niter", type=int, help="Randomized-SVD power iterations for PiSSA-style init."),
    _opt("--loftq-iters", type=int, help="LoftQ alternations (default 5)."),
    _opt("--loftq-start", help="LoftQ's first factors: pissa (default; lower error) or zero (as published)."),
    _opt("--dora-detach-norm/--no-dora-detach-norm", default=None,
         help="QDoRA: norm as a constant in backward (DoRA §4.3; default on)."),
    _opt("--recompute", type=click.Choice(RECOMPUTE),
         help="What a checkpointed layer keeps from its forward so that its recomputation skips work: default "
              "keeps the attention's q, k, v and output and QDoRA's down_proj product (faster, a few activations "
              "per layer); full keeps nothing extra (least memory); max also keeps gate/up's outputs; weights also "
              "holds the base's dequantized weights for the run (+ the base's 16-bit size); none recomputes nothing "
              "(no checkpointing, the base held as with weights; every layer's activations kept); auto: the "
              "most of none > weights > max > default > full whose plan fits --max-memory (else 90% of the device; none "
              "only where layers run eagerly: on GPUs, --no-compile)."),
    _opt("--hold-layers", type=int,
         help="With --recompute weights: hold the dequantized base of the first N decoder layers only (0 = all, the "
              "default); the others dequantize as under max. --recompute auto picks N itself where all would not fit."),
    _opt("--dora-stash/--no-dora-stash", default=None,
         help="Older form of --recompute's QDoRA down_proj part (kept working)."),
    _opt("--keep-qkv/--no-keep-qkv", default=None,
         help="Older form of --recompute's attention part (kept working)."),
    _opt("--rosa-density", type=float, help="RoSA sparse density."),
    _opt("--rosa-mask-steps", type=int, help="Batches used to choose RoSA's mask."),
    _opt("--lokr-factor", type=int, help="LoKr: the Kronecker factorization's factor (default -1: most balanced)."),
    _opt("--rank-init", type=int, help="AdaLoRA: each layer's starting rank (default 1.5 x --rank)."),
    _opt("--budget-start", type=int, help="AdaLoRA: step the rank budget starts to fall (default 10% of the run)."),
    _opt("--budget-end", type=int, help="AdaLoRA: step it reaches --rank (default 70% of the run)."),
    _opt("--dash-steps", type=int, help="LoRA-Dash: steps of LoRA before the directions are chosen (default 100)."),
    _opt("--dash-directions", type=int, help="LoRA-Dash: directions learned per layer (default 8)."),
    _opt("--spectral-variant", type=click.Choice(["additive", "rotate"]),
         help="Spectral adapter: additive (default) or rotate (Cayley-orthogonal)."),
    _opt("--rank", type=int, help="Adapter rank r (default 16)."),
    _opt("--alpha", type=float, help="lora_alpha (default 16)."),
    _opt("--rslora/--no-rslora", default=None, help="Scale alpha/sqrt(r) instead of alpha/r."),
    _opt("--dropout", type=float, help="Adapter dropout (default 0)."),
    _opt("--target-modules", help="Comma-separated linear names, e.g. q_proj,v_proj (default: all-linear, every linear inside the decoder layers)."),
    _opt("--lora-plus-ratio", type=float, help="LoRA+: lr of B = ratio x lr (default 1)."),
    _opt("--seq-len", type=int, help="Tokens per sequence (default 256)."),
    _opt("--batch-size", type=int, help="Sequences per micro-batch (default 4)."),
    _opt("--packing", type=click.Choice(["per-example", "none", "contaminated"]),
         help="Instruction/chat examples: per-example (default: packed several to a row, each attending to itself "
              "only, positions restarting), none (one example per row, padded), contaminated (packed, attending to "
              "the examples before it: the old behaviour, for benchmarks only)."),
    _opt("--grad-accum", type=int, help="Micro-batches per optimizer step (default 1)."),
    _opt("--lr", type=float, help="Peak learning rate (default 2e-4)."),
    _opt("--lr-scheduler", help="cosine (default) | linear | constant, after warmup."),
    _opt("--warmup-steps", type=int, help="Linear warmup steps (default 10)."),
    _opt("--weight-decay", type=float, help="AdamW weight decay (default 0)."),
    _opt("--max-grad-norm", type=float, help="Gradient clipping norm (default 1; 0 = off)."),
    _opt("--optim", help="adamw | adamw8bit | paged_adamw | paged_adamw8bit (paged = CUDA; unpaged on CPU)."),
    _opt("--max-steps", type=int, help="Optimizer steps (overrides --epochs)."),
    _opt("--epochs", type=float, help="Passes over the training data (default 3)."),
    _opt("--eval-every", type=int, help="Held-out loss every N steps (default 50)."),
    _opt("--eval-batches", type=int, help="Cap on eval micro-batches (default: all)."),
    _opt("--save-every", type=int, help="Checkpoint every N steps (default 100) and at the end."),
    _opt("--keep-checkpoints", type=int, help="Keep the last N checkpoints (default 2)."),
    _opt("--seed", type=int, help="Seed of data order, init and dropout (default 0)."),
    _opt("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
         help="Recompute activations in backward (default on)."),
    _opt("--compute-dtype", help="auto (default: bfloat16 on GPUs and CPUs with bf16 kernels, float32 on "
         "AVX2-only CPUs) | bfloat16 | float32 | float16."),
    _opt("--offload", help="Frozen base: none (default) | cpu (host memory, per-use copy to the GPU) | "
                           "disk (read from the quantized files at each use; bounded memory)."),
    _opt("--offload-activations/--no-offload-activations", default=None,
         help="CUDA: checkpointed activations in pinned host memory (no-op on CPU)."),
    _opt("--max-memory", type=float, help="GiB the run may use; the plan must fit before loading (0 = device)."),
    _opt("--compile/--no-compile", default=None, help="torch.compile the fused elementwise kernels and, on the CPU, whole decoder layers of QLoRA, QPiSSA, QDoRA and QRoSA runs (default on)."),
    _opt("--skip-bad-rows/--no-skip-bad-rows", default=None, help="Skip malformed dataset lines (and count them)."),
    _opt("--output", help="Run folder (default runs/qtune)."),
    _opt("--trust-remote-code/--no-trust-remote-code", default=None, help="Allow a hub model's own code (off)."),
]


def _train_options(fn):
    for opt in reversed(TRAIN_OPTIONS):
        fn = opt(fn)
    return fn


LAUNCH_OPTIONS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id")  # the launcher's, not the workers'
DISTRIBUTED_EPILOG = """\b
Several processes (torch.distributed; gloo on the CPU, nccl on GPUs):
  qtune train --nproc-per-node 2 --data chat.jsonl          # ddp: 2 workers, batch 4 each = one process's batch 8
  qtune train --nproc-per-node 2 --distributed fsdp …       # each rank holds half the quantized base
  torchrun --nproc-per-node 2 -m qtune train …              # the same, started by hand
  qtune train --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint host0:29500 …   # two machines
"""


def _worker_args(command: click.Command, params: dict) -> list[str]:
    """The flags a worker gets: those given, as given, less the launcher's own."""
    out = []
    for opt in command.params:
        value = params.get(opt.name)
        if not isinstance(opt, click.Option) or opt.name in LAUNCH_OPTIONS or value is None or value is False \
                and opt.is_flag and not opt.secondary_opts:
            continue
        if opt.is_flag and opt.secondary_opts:
            out.append(opt.opts[0] if value else opt.secondary_opts[0])
        elif opt.is_flag:
            out.append(opt.opts[0])
        else:
            out += [opt.opts[0], str(value)]
    return out


@main.command(epilog=EPILOG + DISTRIBUTED_EPILOG)
@_train_options
@click.option("--resume", is_flag=True, help="Continue RUN_DIR (--output) from its last complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder.")
@click.option("--nproc-per-node", type=int, default=None,
              help="Train on N processes of this machine (one per GPU; on the CPU each gets cores/N threads), started "
                   "through torchrun's API. Their global batch is N x --batch-size.")
@click.option("--distributed", type=click.Choice(["ddp", "fsdp"]), default=None,
              help="With several processes: ddp (each holds the whole quantized base; default) or fsdp (each holds "
                   "1/N of it; chosen for you when the plan says the base does not fit one device).")
@click.option("--nnodes", default="1", show_default=True, help="Machines (torchrun's --nnodes; e.g. 2, or 1:4).")
@click.option("--node-rank", type=int, default=None, help="This machine's rank (torchrun's --node-rank).")
@click.option("--rdzv-endpoint", default=None, help="host:port of the rendezvous, for several machines (torchrun's).")
@click.option("--rdzv-id", default=None, help="The run's rendezvous id, the same on every machine (torchrun's).")
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
def train(config_file, resume, overwrite, nproc_per_node, distributed, nnodes, node_rank, rdzv_endpoint, rdzv_id,
          debug, **flags):
    """Fine-tune: quantized base + adapters; writes run.yaml, metrics.jsonl, checkpoints/, loss.png."""
    from qtune.distributed import under_torchrun

    if nproc_per_node is not None and not under_torchrun():
        def start():
            from qtune.distributed import launch

            strategy = distributed or _default_strategy(config_file, flags, nproc_per_node)
            params = dict(click.get_current_context().params)
            return launch(["train", *_worker_args(train, params)], nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id,
                          strategy)

        code = _run(start, debug)
        sys.exit(code)

    def go():
        from qtune.config import TrainConfig
        from qtune.train import resume_config, train as run_train

        if resume:
            out = flags.get("output")
            if out is None:
                raise QtuneError("--resume needs --output RUN_DIR (the run to continue).")
            from qtune.config import load_yaml

            given = load_yaml(config_file) if config_file else {}
            given.update({k: v for k, v in flags.items() if v is not None})
            cfg = resume_config(Path(out), given)
        else:
            cfg = TrainConfig.from_sources(config_file, **flags)
        summary = run_train(cfg, resume=resume, overwrite=overwrite, distributed=distributed)
        if summary is None:  # a worker other than rank 0: rank 0 reports
            return
        click.echo(f"qtune: done: {summary['steps']} steps; held-out loss {summary['eval_loss_before']:.4f} -> "
                   f"{summary['eval_loss_after']:.4f}; median {summary['median_tokens_per_s']:.0f} tokens/s; "
                   f"run folder {cfg.output}")

    _run(go, debug)


def _default_strategy(config_file, flags: dict, nproc: int) -> str:
    """ddp, unless the plan says one process's run does not fit one device and fsdp's rank would: then fsdp,
    and qtune says so."""
    import torch

    from qtune.config import TrainConfig
    from qtune.plan import plan_memory
    from qtune.train import device_memory_bytes

    try:
        cfg = TrainConfig.from_sources(config_file, **flags)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        have = device_memory_bytes(torch.device(dev)) // (1 if dev == "cuda" else nproc)
        ddp = plan_memory(cfg, dev, nproc, "ddp")
        if ddp.total_bytes + ddp.overhead_bytes <= have:
            return "ddp"
        fsdp = plan_memory(cfg, dev, nproc, "fsdp")
    except Exception:  # noqa: BLE001 - the plan is advice; the workers report a bad configuration by name
        return "ddp"
    if fsdp.total_bytes + fsdp.overhead_bytes <= have:
        click.echo(f"qtune: the plan needs {(ddp.total_bytes + ddp.overhead_bytes) / 2**30:.1f} GiB per process with "
                   f"ddp, more than the {have / 2**30:.1f} GiB of each device, and "
                   f"{(fsdp.total_bytes + fsdp.overhead_bytes) / 2**30:.1f} GiB with fsdp: using --distributed fsdp.",
                   err=True)
        return "fsdp"
    return "ddp"


@main.command(epilog="""\b
Examples:
  qtune plan                                              # the embedded default run
  qtune plan --model examples/configs/llama-1-65b.json --rank 64 --batch-size 1 --seq-len 512 --device-memory 48
  qtune plan --model ./Llama-2-7b-hf --optim paged_adamw8bit --seq-len 2048 --json""")
@_train_options
@click.option("--device-memory", type=float, default=None, help="GiB available on the device: say whether it fits.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Plan for this device (default: cuda if present, else cpu); cuda adds its context to the overhead.")
@click.option("--nproc-per-node", type=int, default=1, show_default=True,
              help="Processes the run will use: the plan is one rank's.")
@click.option("--distributed", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="With --nproc-per-node > 1: ddp (whole base per rank) or fsdp (1/N of it per rank).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
def plan(config_file, device_memory, device, nproc_per_node, distributed, as_json, debug, **flags):
    """The memory a run will need (from the model's config alone), before it starts."""

    def go():
        import json

        import torch

        from qtune.config import TrainConfig
        from qtune.plan import format_plan, plan_memory, suggestions

        cfg = TrainConfig.from_sources(config_file, **flags)
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if nproc_per_node < 1:
            raise QtuneError(f"--nproc-per-node must be at least 1, got {nproc_per_node}.")
        p_strategy = distributed if nproc_per_node > 1 else None
        p = plan_memory(cfg, dev, nproc_per_node, p_strategy)
        if as_json:
            click.echo(json.dumps({**p.to_json(device_memory), "nproc_per_node": nproc_per_node,
                                   "distributed": distributed if nproc_per_node > 1 else None}))
            return
        click.echo(format_plan(p, cfg, device_memory))
        if nproc_per_node > 1:
            click.echo(f"  per rank, {nproc_per_node} processes with {distributed} (global batch "
                       f"{nproc_per_node * cfg.batch_size * cfg.grad_accum} rows per optimizer step)")
        if device_memory is not None and p.total_bytes + p.overhead_bytes > device_memory * 2**30:
            click.echo("  to fit, try:\n" + "\n".join(f"    {s}" for s in suggestions(cfg, int(device_memory * 2**30), dev,
                                                                              nproc_per_node, p_strategy)))

    _run(go, debug)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run folder of `qtune train`.")
@click.option("--output", required=True, type=click.Path(), help="Folder to write.")
@click.option("--format", "fmt", type=click.Choice(["merged", "peft", "gguf"]), default="merged", show_default=True,
              help="merged: fp16 safetensors; peft: the adapter; gguf: one file for llama.cpp / Ollama.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16"]), default="float16", show_default=True)
@click.option("--gguf-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default="q8_0", show_default=True,
              help="With --format gguf: the matrices' type (norms stay f32).")
@click.option("--checkpoint", type=click.Path(), default=None, help="A checkpoint folder (default: the latest).")
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
def export(run_dir, output, fmt, dtype, gguf_type, checkpoint, debug):
    """Merged fp16 model (loads in plain transformers), the adapter in PEFT's format, or a GGUF file."""

    def go():
        from qtune.export import export_merged, export_peft

        if fmt == "gguf":
            from qtune.gguf_export import export_gguf

            out = export_gguf(run_dir, output, gguf_type, checkpoint)
        else:
            out = (export_merged(run_dir, output, dtype, checkpoint) if fmt == "merged"
                   else export_peft(run_dir, output, checkpoint))
        click.echo(f"qtune: wrote {out}")

    _run(go, debug)


@main.command("eval")
@click.option("--run", "run_dir", type=click.Path(), default=None, help="Run folder (adapter from its last checkpoint).")
@click.option("--model", default=None, help="A model folder (e.g. a merged export) or hub id.")
@click.option("--data", required=True, type=click.Path(), help="The data to score, whole (.jsonl/.txt file or folder).")
@click.option("--seq-len", type=int, default=None, help="Window length (default: the run's, or 256).")
@click.option("--compute-dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default=None,
              help="Default: the run's (auto for a model folder).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--packing", type=click.Choice(["per-example", "none", "contaminated"]), default="per-example",
              show_default=True, help="As `qtune train --packing`: per-example scores each example as if alone.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: loss, perplexity, tokens.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
def eval_command(run_dir, model, data, seq_len, compute_dtype, batch_size, packing, as_json, debug):
    """Held-out loss and perplexity of a run (quantized base + adapter) or of a model folder, on the same blocks."""

    def go():
        import json

        from qtune.evaluate import evaluate_file

        result = evaluate_file(data, run_dir, model, seq_len, compute_dtype, batch_size, progress=not as_json,
                               packing=packing)
        click.echo(json.dumps(result.to_json()) if as_json else f"qtune: {result}")

    _run(go, debug)


@main.command()
@click.option("--run", "run_dir", type=click.Path(), default=None, help="Run folder (adapter from its last checkpoint).")
@click.option("--model", default=None, help="A model folder (e.g. a merged export) or hub id.")
@click.option("--prompt", required=True, help="The user message.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
def generate(run_dir, model, prompt, max_new_tokens, debug):
    """Try a model: a run's adapter on its quantized base, or a plain (merged) model folder."""

    def go():
        from qtune.generate import generate_text

        if (run_dir is None) == (model is None):
            raise QtuneError("Pass exactly one of --run RUN_DIR or --model PATH.")
        click.echo(generate_text(prompt, run_dir=run_dir, model=model, max_new_tokens=max_new_tokens))

    _run(go, debug)


if __name__ == "__main__":
    main()
