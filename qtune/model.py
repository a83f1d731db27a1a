"""Build the trainable model of a run: quantized base + adapters + the engine that runs it."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from qtune import architectures
from qtune.adapters import attach_adapters, layer_options, set_initial_factors
from qtune.adapters.dora import DoRALinear
from qtune.adapters.rosa_mask import restore_supports
from qtune.base_init import load_initialised_base
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.engine import Engine, RecomputePolicy, causal_lm_loss
from qtune.engine import compiled as qcompile
from qtune.engine.attention import choose_attention
from qtune.engine.fused import frozen_row_sq
from qtune.engine.linear import route_adapters
from qtune.loader import DTYPES, QuantSpec, build_skeleton, load_config, load_model, load_tokenizer, resolve_model_dir
from qtune.precision import resolve_compute_dtype


def build_model(cfg: TrainConfig, run_dir: Path | None = None, progress: bool = True, meter=None):
    """(model with adapters, tokenizer, model_dir, init report) for a run configuration; the model's
    engine (qtune.engine.Engine) is `model.qtune_engine`.

    meter (qtune.memory.MemoryMeter): the tokenizer is loaded outside what it counts.
    With --init pissa|milora|loftq the base is the initialiser's residual, computed while loading
    and kept in run_dir (see qtune.base_init); otherwise the shared quantized cache is used."""
    model_dir = resolve_model_dir(cfg.model)
    # an unsupported architecture is named before anything else (its config, then its layers on the meta device)
    build_skeleton(load_config(model_dir, cfg.trust_remote_code), torch.float32, trust_remote_code=cfg.trust_remote_code)
    with meter.excluding() if meter is not None else contextlib.nullcontext():
        tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    quant = QuantSpec(cfg.bits, cfg.quant_type, cfg.double_quant)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where qtune.train will run it
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device, warn=False)  # train() warned already
    dtype = DTYPES[compute_dtype]
    factors, report = None, None
    qcompile.set_enabled(cfg.compile and qcompile.env_enabled())
    if device == "cpu":  # a C++ compiler that miscompiles bf16 kernels: 256-bit kernels, or none (warned)
        qcompile.check_half_kernels(dtype)
    if cfg.init == "default" and cfg.method != "spectral":  # spectral: its base is spectral_init's residual
        model = load_model(model_dir, quant, dtype, cfg.trust_remote_code, progress=progress, offload=cfg.offload)
    else:
        model, factors, report = load_initialised_base(model_dir, cfg, quant, dtype, run_dir, progress)
    attach_adapters(model, cfg.method, cfg.target_modules, cfg.rank, cfg.scale, cfg.dropout, cfg.seed,
                    layer_options(cfg.method, cfg))
    if factors is not None:
        set_initial_factors(model, factors)
    restore_supports(model, run_dir)  # RoSA: the masks chosen when the run started
    if cfg.offload_activations and not torch.cuda.is_available():
        warnings.warn("--offload-activations: activations are in host memory already on this CPU-only machine; "
                      "nothing to offload (ignored).", stacklevel=2)
    policy = RecomputePolicy.from_config(cfg, device)  # --recompute auto resolved by the plan
    engine = Engine(model, attention=choose_attention(model.config, cfg.batch_size, cfg.seq_len,
                                                      policy.checkpointing, compute_dtype, device),
                    policy=policy, checkpointing=policy.checkpointing, compile_reason=compile_reason(cfg, device))
    model.qtune_engine = engine
    route_adapters(model)  # transformers' own forward (generation, the generic path) runs the fused nodes too
    if policy.checkpointing:  # for transformers' own forward: the generic path, RoSA's mask selection
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise QtuneError(f"{model.config.model_type!r} does not support gradient checkpointing in transformers, "
                             "which qtune's generic path uses for it. Pass --no-gradient-checkpointing.")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if engine.unsupported is not None:  # the generic path: its loss must be the model's own
        architectures.check_head(model, engine)
        if cfg.packing == "per-example":
            architectures.check_packing(model, engine)
    for m in model.modules():  # DoRA's ‖W‖²_row: an input of the compiled blocks, computed once
        if isinstance(m, DoRALinear):
            frozen_row_sq(m, dtype)
    return model, tokenizer, model_dir, report


FUSED_METHODS = ("qlora", "qpissa", "qdora", "qrosa")  # the methods qtune.engine has fused and compiled forms of


def compile_reason(cfg: TrainConfig, device: str = "cpu") -> str | None:
    """Why no decoder layer of this configuration may run as a compiled graph (None: they may, layer by
    layer as qtune.engine.block.block_compile_reason allows)."""
    if not (cfg.compile and qcompile.env_enabled() and qcompile.layers_env_enabled()):
        return "compile off"
    if cfg.method not in FUSED_METHODS:  # its reference forward runs eagerly (qtune.engine.linear)
        return f"method {cfg.method}"
    if device != "cpu":
        return "not on cpu"
    if cfg.dropout:
        return "dropout"
    if cfg.method == "qdora" and not cfg.dora_detach_norm:
        return "dora norm gradient"
    if cfg.offload == "disk":
        return "offloaded weights"
    return None


def compiles_layers(cfg: TrainConfig, device: str = "cpu") -> bool:
    """Whether this configuration's decoder layers run as compiled graphs (for qtune.plan)."""
    return compile_reason(cfg, device) is None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(architectures.decoder_layers(model))


@torch.no_grad()
def evaluate(model: nn.Module, blocks, batch_size: int, max_batches: int = 0, d=None) -> float:
    """Mean per-token loss over the held-out blocks.

    Several processes (d, qtune.distributed.Dist): rank r scores batches r, r + N, …, and the sums are
    reduced. Every rank runs the same number of forwards (fsdp's all-gathers are collective): a rank whose
    share is one short scores its last batch again and counts nothing of it."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = len(blocks)
    starts = list(range(0, n, batch_size))
    if max_batches:
        starts = starts[:max_batches]
    world, rank = (d.world, d.rank) if d is not None and d.enabled else (1, 0)
    mine = starts[rank::world]
    rounds = math.ceil(len(starts) / world)
    for j in range(rounds):
        i = mine[min(j, len(mine) - 1)] if mine else 0
        s = slice(i, min(i + batch_size, n))
        loss, k = causal_lm_loss(model, blocks.input_ids[s], blocks.segment_ids[s], blocks.labels[s])
        if j < len(mine):
            total, count = total + loss.item(), count + k
    if world > 1:
        total, count = d.sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


__all__ = ["build_model", "causal_lm_loss", "compile_reason", "compiles_layers", "decoder_layers", "evaluate"]
