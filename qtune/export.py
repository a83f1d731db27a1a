"""Export a trained run: a merged fp16/bf16 model that plain transformers loads, or the adapter in
PEFT's format.

Merged export streams: the quantized model (with its adapters) stays as it was trained, and each
linear's merged weight — D(Q(W)) + ΔW, computed by the adapter layer itself — is produced, cast,
and written to the current shard one tensor at a time. Only the quantized model and one shard's
worth of fp16 tensors are ever in memory; the full fp16 model never is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from qtune.adapters import adapter_layer_for, adapter_layers, load_adapter_state_dict
from qtune.adapters.base import base_weight
from qtune.adapters.dora import DoRALinear
from qtune.checkpoint import atomic_folder, complete_checkpoints, load_checkpoint, write_error_reason, write_manifest
from qtune.config import TrainConfig, load_run_yaml
from qtune.errors import QtuneError
from qtune.gguf_io import is_gguf
from qtune.loader import TOKENIZER_FILES
from quant import QuantLinear

SHARD_BYTES = 2 * 1024**3
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def load_run(run_dir: Path, checkpoint: Path | None = None, progress: bool = True,
             compute_dtype: str | None = None):
    """(cfg, model with the checkpoint's adapters, tokenizer, model_dir, checkpoint path).

    `compute_dtype` overrides the run's (e.g. float32 to compare logits without bf16 noise)."""
    from qtune.model import build_model

    run_dir = Path(run_dir)
    if not (run_dir / "run.yaml").is_file():
        raise QtuneError(f"{run_dir} is not a qtune run folder (no run.yaml). Pass --run the --output of `qtune train`.")
    cfg = TrainConfig.from_dict(load_run_yaml(run_dir))
    ckpts = complete_checkpoints(run_dir)
    if checkpoint is None and not ckpts:
        raise QtuneError(f"Run {run_dir} has no complete checkpoint to export. Train it (or resume it) until a "
                         "checkpoint is saved (--save-every, or the end of training).")
    ckpt = Path(checkpoint) if checkpoint else ckpts[-1]
    state = load_checkpoint(ckpt)  # verifies the manifest
    cfg.gradient_checkpointing = False
    if compute_dtype is not None:
        cfg.compute_dtype = compute_dtype
    model, tokenizer, model_dir, _ = build_model(cfg, run_dir, progress=progress)
    load_adapter_state_dict(model, state["adapter"])
    model.eval()
    return cfg, model, tokenizer, model_dir, ckpt


def merged_state(model: nn.Module, dtype: torch.dtype):
    """Yield (name, tensor) of the plain (unquantized, adapter-free) model, one tensor at a time."""
    adapters = adapter_layers(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, module in model.named_modules():
        if name in adapters:  # the adapter merges its base's tensors (qtune.adapters.base.Adapter.merge)
            base = module.base_layer
            tensors = {"weight": base_weight(base)}
            if getattr(base, "bias", None) is not None:
                tensors["bias"] = base.bias.float()
            with torch.no_grad():
                for leaf, t in module.merge(tensors).items():
                    yield f"{name}.{leaf}", t.to(dtype)
            continue
        if any(name.startswith(a + ".") for a in adapters):
            continue  # inside an adapter: handled above
        if isinstance(module, QuantLinear):
            yield f"{name}.weight", module.dequantized_weight(torch.float32).to(dtype)
            if module.bias is not None:
                yield f"{name}.bias", module.bias.to(dtype)
            continue
        for leaf, p in module.named_parameters(recurse=False):
            key = f"{name}.{leaf}" if name else leaf
            if tied and key == "lm_head.weight":
                continue
            yield key, p.detach().to(dtype) if p.is_floating_point() else p.detach()
        for leaf, b in module.named_buffers(recurse=False):
            if leaf not in module._non_persistent_buffers_set:
                yield (f"{name}.{leaf}" if name else leaf), b.detach()


def export_merged(run_dir: Path, out: Path, dtype: str = "float16", checkpoint: Path | None = None,
                  progress: bool = True, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write OUT/: sharded safetensors + index + config (no quantization_config) + tokenizer."""
    torch_dtype = EXPORT_DTYPES[dtype]
    out = _check_out(out)
    cfg, model, tokenizer, model_dir, ckpt = load_run(run_dir, checkpoint, progress)
    with _writing(out) as tmp:
        names = _write_shards(merged_state(model, torch_dtype), tmp, shard_bytes,
                              total=sum(1 for k in model.state_dict() if ".weight." not in k and "lora_" not in k), progress=progress)
        config = model.config
        config.use_cache = True
        config.dtype = dtype
        config.save_pretrained(tmp)
        cfg_json = json.loads((tmp / "config.json").read_text())
        cfg_json.pop("quantization_config", None)
        adapter_layer_for(cfg.method).merged_config(cfg_json, adapter_layers(model))  # e.g. BitFit's new biases
        (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2))
        _copy_tokenizer(model_dir, tmp, tokenizer)
        (tmp / "qtune_export.json").write_text(json.dumps(
            {"run": str(run_dir), "checkpoint": ckpt.name, "method": cfg.method, "bits": cfg.bits,
             "dtype": dtype, "shards": names}, indent=1))
        write_manifest(tmp)
    return out


def _write_shards(tensors, folder: Path, shard_bytes: int, total: int, progress: bool) -> list[str]:
    """Stream (name, tensor) pairs into model-0000i-of-0000n.safetensors + index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, files, weight_map, total_bytes = 0, [], {}, 0

    def flush():
        nonlocal size
        if shards[-1]:
            path = folder / f"shard-{len(files):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in shards[-1].items()}, path, metadata={"format": "pt"})
            files.append((path, list(shards[-1])))
            shards[-1] = {}
            size = 0

    bar = tqdm(total=total, desc="exporting", unit="tensor", disable=not progress)
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        shards[-1][name] = t
        size += nbytes
        total_bytes += nbytes
        bar.update()
    flush()
    bar.close()
    n = len(files)
    names = []
    for i, (path, keys) in enumerate(files):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        path.rename(folder / final)
        names.append(final)
        weight_map.update({k: final for k in keys})
    if n > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))
    return names


def _check_out(out) -> Path:
    """OUT may be new, empty, or an earlier qtune export (replaced); anything else is the user's: refuse."""
    out = Path(out)
    earlier_export = (out / "manifest.json").is_file() and (
        (out / "qtune_export.json").is_file() or (out / "adapter_config.json").is_file())
    if out.exists() and not (out.is_dir() and (earlier_export or not any(out.iterdir()))):
        raise QtuneError(f"{out} exists and is not an earlier qtune export; export would replace it. Choose another "
                         "--output, or delete that folder first.")
    return out


class _writing:
    """atomic_folder(out), with a failed write (a full disk) turned into a QtuneError."""

    def __init__(self, out: Path):
        self.out, self.inner = out, atomic_folder(out)

    def __enter__(self) -> Path:
        return self.inner.__enter__()

    def __exit__(self, exc_type, exc, tb):
        self.inner.__exit__(exc_type, exc, tb)
        if exc_type is not None and issubclass(exc_type, (OSError, SafetensorError)):
            raise QtuneError(f"Could not write {self.out} ({write_error_reason(exc)}). Free disk space or choose "
                             "another --output; nothing was left there.") from None
        return False


def _copy_tokenizer(model_dir: Path, out: Path, tokenizer=None) -> None:
    """The model's tokenizer files, as they are; a GGUF source has none, so its tokenizer (built from
    the file's metadata) is saved in transformers' format."""
    if is_gguf(model_dir):
        tokenizer.save_pretrained(out)
        return
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)


def export_peft(run_dir: Path, out: Path, checkpoint: Path | None = None, progress: bool = True) -> Path:
    """Write OUT/adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained.

    LoRA → PEFT LoRA; DoRA → PEFT LoRA with use_dora (magnitude as `lora_magnitude_vector`);
    PiSSA/MiLoRA/LoftQ-initialised LoRA → a plain LoRA for the ORIGINAL base:
    ΔW = s·(B'A' − B₀A₀) = s·[B' | B₀]·[A' ; −A₀], rank 2r (B₀, A₀ saved with the run).
    """
    from qtune.base_init import initial_factors

    run_dir = Path(run_dir)
    out = _check_out(out)
    if (run_dir / "run.yaml").is_file():
        cfg = TrainConfig.from_dict(load_run_yaml(run_dir))
        if cfg.method not in ("qlora", "qpissa", "qdora") and adapter_layer_for(cfg.method).peft_type is None:
            raise QtuneError(f"PEFT has no format for method {cfg.method!r}; export it with --format merged "
                             "(a merged fp16 model).")
        if cfg.method == "qdora" and cfg.init != "default":
            raise QtuneError("A DoRA adapter started from PiSSA/LoftQ factors has no PEFT form for the original "
                             "base (the magnitude is relative to the residual). Use --format merged.")
    cfg, model, tokenizer, model_dir, ckpt = load_run(run_dir, checkpoint, progress)
    if cfg.method not in ("qlora", "qpissa", "qdora"):  # the method's own PEFT form (qtune.adapters.base.Adapter)
        layers = adapter_layers(model)
        layer_cls = adapter_layer_for(cfg.method)
        tensors = {}
        for name, layer in layers.items():
            tensors.update(layer.peft_tensors(f"base_model.model.{name}"))
        adapter_config = {"peft_type": layer_cls.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
                          "base_model_name_or_path": cfg.model or str(model_dir),
                          **layer_cls.peft_config(cfg, sorted({n.rpartition(".")[2] for n in layers}), layers)}
        with _writing(out) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "adapter_model.safetensors",
                      metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
            _copy_tokenizer(model_dir, tmp, tokenizer)
            write_manifest(tmp)
        return Path(out)
    factors = initial_factors(run_dir) if cfg.init != "default" else None
    tensors, targets = {}, set()
    for name, layer in adapter_layers(model).items():
        A, B = layer.lora_A.detach().float(), layer.lora_B.detach().float()
        if factors is not None:  # relative to the original weight: subtract the initial factors
            A = torch.cat([A, -factors[f"{name}.lora_A"].float()], 0)  # (2r, in)
            B = torch.cat([B, factors[f"{name}.lora_B"].float()], 1)   # (out, 2r)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A.contiguous(), B.contiguous()
        if isinstance(layer, DoRALinear):
            tensors[f"{prefix}.lora_magnitude_vector"] = layer.magnitude.detach().float().contiguous()
        targets.add(name.rpartition(".")[2])
    rank = cfg.rank * (2 if factors is not None else 1)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        # keep the trained scale s exactly: PEFT uses alpha/r (or alpha/sqrt(r) with rsLoRA)
        "lora_alpha": cfg.scale * (rank ** 0.5 if cfg.rslora else rank), "use_rslora": cfg.rslora,
        "lora_dropout": cfg.dropout, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_dora": cfg.method == "qdora", "inference_mode": True,
        "modules_to_save": None, "base_model_name_or_path": cfg.model or str(model_dir)}
    with _writing(out) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        _copy_tokenizer(model_dir, tmp, tokenizer)
        write_manifest(tmp)
    return Path(out)
