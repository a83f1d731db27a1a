"""The memory a run will need, from the model's config alone (no weights), before it starts.

    total = base weights + adapter params + their grads + optimizer states + activations
            + logits + dequantization buffers                 (the peak of live tensors)
    overhead = allocator / runtime (CUDA context), counted for `fits` but not in total

Each term is computed for qtune's own implementation (what its meter measures):
- base weights: the skeleton is built on the meta device and every decoder linear is costed in its
  storage format (NF4 + double quantization ≈ 4.13 bit/param, 8-bit ≈ 8.5, 16-bit = 16); the
  embeddings, norms and lm_head stay in the compute dtype.
- adapters: LoRA A (r, in) and B (out, r) in fp32; DoRA adds m (out,); RoSA adds nnz values (fp32)
  and indices (int64). Gradients fp32; AdamW keeps two fp32 moments, the 8-bit optimizers two
  uint8 moments (+ block scales) for tensors of ≥ 4096 elements.
- activations: with gradient checkpointing, each decoder layer's input is kept (b·t·h; QDoRA also
  keeps each layer's down_proj output, b·t·h, unless --recompute full; a compiled layer keeps each
  adapter's down-projection h = x·Aᵀ, b·t·r, qtune.engine.ops.lora_down, and with --recompute default the attention's q, k and v, b·t·(heads + 2·kv heads)·head_dim, and its output, b·t·h,
  or as many bytes of DoRA's q/k/v/o products u) plus, during one layer's
  recomputation and backward, that layer's internals (enumerated in `layer_internals_bytes`; DoRA
  adds each adapter's (tokens × out) product); without checkpointing (--recompute none,
  --no-gradient-checkpointing), every layer's saved internals (a compiled layer's: its norms' inputs
  rather than their fp32 copies, and its dequantized weights unless none holds them); the gradient
  buffers of a layer's backward exist for one layer at a time either way.
- attention masks: qtune's block builds one additive (b, 1, t, t) mask per distinct sliding window,
  block-diagonal over the packed examples (from a boolean one); transformers' forward (the generic path),
  one boolean mask per layer type; they live from the forward to the end of backward.
- logits: qtune's chunked cross-entropy holds, with torch.compile on, one vocabulary block's logits
  for a chunk of positions (bf16 head output + its bf16 exp) and the chunk's fp32 sums of exp·W;
  eagerly, one chunk's full-vocabulary logits (bf16 head output + fp32 logits, turned into the
  softmax in place); plus the final hidden states and their gradient, never batch × seq × vocab
  at once.
- dequantization buffers: the largest decoder linear dequantized to the compute dtype (one at a time);
  with compiled decoder layers (qtune.engine, CPU), all of one layer's linears: its compiled
  backward recomputes them together.
The terms are not all alive at once: total_bytes is the peak over the two moments of a step that
bound it (see Plan.total_bytes), which is what the meter's peak_memory_bytes measures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch

from qtune.architectures import head_of
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.precision import resolve_compute_dtype
from qtune.engine import compiled as qcompile
from qtune.engine.recompute import RecomputePolicy
from qtune.engine.attention import choose_attention, mask_bytes
from qtune.engine.block import layer_windows, unsupported_reason
from qtune.engine.loss import (CE_BLOCK_BYTES_PER_LOGIT, CE_BLOCK_BYTES_PER_ROW_HIDDEN, CE_BYTES_PER_LOGIT,
                               CE_SOFTCAP_BYTES_PER_LOGIT, CE_VOCAB_BLOCK, ce_block_rows, ce_chunk_tokens)
from qtune.model import compiles_layers

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace, typical on recent drivers
BNB_STATE_BYTES = 16 * 4 + 256 * 4 + 200  # code map, nested code map, JSON blob of one quantized weight


@dataclass
class Plan:
    base_weights: int
    adapter_params: int
    adapter_grads: int
    optimizer_states: int
    activations: int
    logits: int
    dequant_buffers: int
    overhead_bytes: int
    trainable_params: int

    layer_inputs: int = 0
    masks: int = 0  # the attention masks (part of activations)
    recompute: str = "default"  # the recomputation policy planned (--recompute auto resolved)
    kept: int = 0  # bytes the checkpoints keep beyond each layer's input (part of layer_inputs)
    dense: int = 0  # --recompute weights: the held dequantized base (part of base_weights)
    held_layers: int = 0  # how many decoder layers hold it (--hold-layers; 0: none hold it)
    layers: int = 0  # decoder layers of the model
    compiled: bool = False  # whether the decoder layers run as compiled graphs (qtune.model.compiles_layers)
    loss_phase: int = 0
    backward_phase: int = 0

    @property
    def persistent(self) -> int:
        """Alive all the time: the base, the adapters and (after the first step) the optimizer state."""
        return self.base_weights + self.adapter_params + self.optimizer_states

    @property
    def total_bytes(self) -> int:
        """The peak of live tensors: the larger of two moments of a step.

        loss:     persistent + saved layer inputs + the chunked cross-entropy (`logits`);
        backward: persistent + the saved activations and the adapter gradients at the worst point
                  of the walk back through the layers (`backward_peak`) + one layer's internals +
                  the dequantized weight of the linear being differentiated.
        (The optimizer step needs persistent + gradients + small temporaries: below both.)"""
        return self.persistent + max(self.loss_phase, self.backward_phase)

    @property
    def peak_phase(self) -> str:
        return "loss" if self.loss_phase >= self.backward_phase else "backward"

    def to_json(self, device_memory: float | None = None) -> dict:
        d = asdict(self)
        breakdown = {k: d[k] for k in ("base_weights", "adapter_params", "adapter_grads", "optimizer_states",
                                       "activations", "logits", "dequant_buffers")}
        out = {"total_bytes": self.total_bytes, "overhead_bytes": self.overhead_bytes, "breakdown": breakdown,
               "peak_phase": self.peak_phase, "trainable_params": self.trainable_params,
               "attention_mask_bytes": self.masks, "recompute": self.recompute, "recompute_kept_bytes": self.kept,
               "dequantized_weights_bytes": self.dense, "held_layers": self.held_layers}
        if device_memory is not None:
            out["device_memory_bytes"] = int(device_memory * 2**30)
            out["fits"] = self.total_bytes + self.overhead_bytes <= device_memory * 2**30
        return out


def quantized_linear_bytes(numel: int, bits: int, double_quant: bool = True, compute_bytes: int = 2) -> int:
    """Bytes of one frozen linear's weight in qtune's (= bitsandbytes') storage."""
    blocks = math.ceil(numel / 64)
    if bits == 16:
        return numel * compute_bytes
    if bits == 8:
        return numel + 4 * blocks + 256 * 4
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales + BNB_STATE_BYTES


def layer_internals_bytes(config, batch: int, seq: int, rank: int, c: int, n_adapters: int, dropout: float,
                          attention: str = "sdpa", split: bool = False,
                          extra_per_token: int = 0, uncheckpointed_graph: bool = False) -> int | tuple[int, int]:
    """Tensors autograd keeps for ONE Llama-family decoder layer (qtune's adapters, sdpa attention).

    With eager attention (qtune.engine.attention.choose_attention) the softmax output (fp32) and its
    compute-dtype copy are kept, and backward adds their two gradients: 2·(4 + c) bytes per score.

    per token: 2 RMSNorms (fp32 input copy + normalised output), q/k/v after rotary, k/v expanded
    to all heads (GQA repeat), the attention output, softmax log-sum-exp (fp32, per head), MLP
    gate/up/silu(gate)/product, each adapter's (x Aᵀ), dropout copies, and the gradient buffers of
    the widest tensors alive at the peak of the layer's backward.
    split=True returns (saved, transient): what autograd keeps until the layer's backward is done,
    and the gradient buffers that exist only during it (one layer at a time, checkpointing or not).
    extra_per_token: bytes a method's adapters keep besides (x Aᵀ) (DoRA: its (tokens × out) products).
    uncheckpointed_graph: an uncheckpointed compiled layer, whose graph saves each RMSNorm's input and its fp32 reciprocal
    RMS (inductor recomputes the fp32 copy and the output in backward); measured at SmolLM2's bench setting.
    """
    h, i = config.hidden_size, config.intermediate_size
    nh, nkv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // nh
    norms = 4 if config.model_type.startswith("gemma") else 2  # Gemma's sandwich: two more per layer
    per_token = (norms * ((c * h + 4) if uncheckpointed_graph else (4 + c) * h)  # input and post-attention RMSNorm (Gemma's 4)
                 + c * qkv_width(config)            # q, k, v (after rotary)
                 + c * 2 * nh * d                   # k, v repeated to every head for sdpa
                 + c * nh * d + 4 * nh              # attention output, log-sum-exp
                 + 4 * c * i                        # gate, up, silu(gate), silu(gate)·up
                 + n_adapters * c * rank            # x Aᵀ of each adapter
                 + extra_per_token)
    transient = 2 * c * i                           # gradients of the MLP's widest tensors at the peak
    if dropout > 0:
        per_token += 4 * c * h + c * i + 4 * h      # dropped-out copies of the adapters' inputs, masks
    if attention != "sdpa":  # qtune.engine's eager attention: the scores, no log-sum-exp
        per_token += (4 + c) * nh * seq - 4 * nh    # softmax output (fp32) and its compute-dtype copy
        transient += (4 + c) * nh * seq             # and their gradients
    if split:
        return batch * seq * per_token, batch * seq * transient
    return batch * seq * (per_token + transient)


def qkv_width(config) -> int:
    """Columns of a Llama-family layer's q, k and v together: (heads + 2 · kv heads) · head_dim."""
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    d = getattr(config, "head_dim", None) or config.hidden_size // nh
    return (nh + 2 * nkv) * d


def backward_peak(stored: int, grads: int, layers: int) -> int:
    """Saved activations plus adapter gradients at the worst moment of the backward pass.

    Backward walks the layers from the last to the first: each layer's saved tensors are freed
    once it is done, and its adapters' gradients appear. At layer l (counting down from L−1),
    layers 0..l still hold their share of `stored` and layers l..L−1 their share of `grads`, so the
    sum is linear in l and its maximum is at an end: all stored + the last layer's gradients, or all
    gradients + the first layer's stored share (counting both as alive at the crossing layer)."""
    return max(stored + grads // layers, grads + stored // layers)


def plan_memory(cfg: TrainConfig, device: str = "cpu", world: int = 1, strategy: str | None = None) -> Plan:
    """Plan for `cfg` (its model's config.json is read; no weight is loaded): one process's, or with `world`
    processes one rank's. ddp: each rank holds the whole base and its micro-batch of cfg.batch_size rows,
    so a rank's plan is one process's. fsdp (qtune.fsdp): each rank holds 1/world of the quantized linears,
    the adapters and their optimizer state, plus the layer in use and the next one gathered whole."""
    from qtune.adapters import ADAPTER_LAYERS, adapter_layer_for, layer_options, target_candidates
    from qtune.loader import build_skeleton, load_config, quantized_linear_names

    if cfg.method not in ADAPTER_LAYERS:
        raise QtuneError(f"Method {cfg.method!r} is not available. Use one of {', '.join(sorted(ADAPTER_LAYERS))}.")
    config = _config_for(cfg.model, cfg.trust_remote_code, load_config)
    if cfg.compute_dtype == "auto":  # what the run on `device` will pick (qtune.precision)
        cfg = dataclasses.replace(cfg, compute_dtype=resolve_compute_dtype("auto", device))
    c = DTYPE_BYTES[cfg.compute_dtype]
    skeleton = build_skeleton(config, torch.bfloat16 if c == 2 else torch.float32, trust_remote_code=cfg.trust_remote_code)
    linears = {n: m for n, m in skeleton.named_modules() if n in set(quantized_linear_names(skeleton))}
    # qtune's own blocks may compile; the generic path (transformers' forward) never does
    compiled = compiles_layers(cfg, device) and unsupported_reason(skeleton) is None

    base, largest_linear, linear_total = 0, 0, 0
    streamed = cfg.offload == "disk" or (cfg.offload == "cpu" and device == "cuda")
    tied = getattr(config, "tie_word_embeddings", False)
    for name, p in skeleton.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in linears and name.endswith(".weight"):
            nbytes = quantized_linear_bytes(p.numel(), cfg.bits, cfg.double_quant, c)
            largest_linear = max(largest_linear, nbytes)
            linear_total += nbytes
            base += 0 if streamed else nbytes
        elif not (tied and name == "lm_head.weight"):  # tied: stored once, as the embedding
            base += p.numel() * c
    if streamed:  # quant.offload: the linear in use and the one being prefetched
        base += 2 * largest_linear

    layer_cls, options = adapter_layer_for(cfg.method), layer_options(cfg.method, cfg)
    targets = {n: skeleton.get_submodule(n) for n in layer_cls.select(target_candidates(skeleton, layer_cls), cfg.target_modules)}
    leaves = {n.rpartition(".")[2] for n in targets}
    if not targets:
        raise QtuneError(f"No {layer_cls.target_kind} matches --target-modules {','.join(cfg.target_modules)}.")
    layer_cls.check(skeleton, list(targets), cfg.rank, options)  # what the run would refuse, the plan refuses
    trainable, extra_bytes, tensor_sizes = 0, 0, []
    for n, m in targets.items():
        layer_opts = layer_cls.layer_options(skeleton, n, options)
        sizes = layer_cls.trainable_sizes(m, cfg.rank, layer_opts)
        extra_bytes += 4 * sum(layer_cls.state_sizes(m, cfg.rank, layer_opts))  # e.g. AdaLoRA's moving averages
        if cfg.method == "qrosa":
            nnz = math.ceil(cfg.rosa_density * m.in_features * m.out_features)
            sizes.append(nnz)
            extra_bytes += 20 * nnz  # int64 indices (saved) + int32 CSR caches of S and Sᵀ (not trained)
        tensor_sizes += sizes
        trainable += sum(sizes)
    adapter_params = 4 * trainable + extra_bytes
    grads = 4 * trainable
    if cfg.optim in ("adamw8bit", "paged_adamw8bit"):
        optimizer = sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in tensor_sizes)
    else:
        optimizer = 8 * trainable
    if strategy == "fsdp" and world > 1:  # shards, plus the gathered layer in use and the one prefetched
        n_layers = config.num_hidden_layers
        base += -linear_total + math.ceil(linear_total / world) + 2 * math.ceil(linear_total / n_layers)
        adapter_params = math.ceil(adapter_params / world) + 2 * math.ceil(4 * trainable / n_layers)
        grads = math.ceil(grads / world) + math.ceil(grads / n_layers)
        optimizer = math.ceil(optimizer / world)

    b, t, L = cfg.batch_size, cfg.seq_len, config.num_hidden_layers
    per_layer = len(targets) // L
    policy = RecomputePolicy.from_config(cfg, device)
    ckpt = policy.checkpointing  # off with --recompute none or --no-gradient-checkpointing
    attention = choose_attention(config, b, t, ckpt, cfg.compute_dtype, device)
    fused_dora = cfg.method == "qdora" and cfg.dropout == 0 and cfg.dora_detach_norm  # DoRA's one-node path
    # DoRA's down_proj output kept from the forward: by the eager node's stash or a compiled layer's kept product
    stash = fused_dora and ckpt and policy.keep_down and "down_proj" in leaves
    # DoRA keeps each adapter's (tokens × out) product for the magnitude's gradient (a stashed
    # down_proj's is counted with the layer inputs instead: it lives as long as they do)
    dora_out = (sum(m.out_features for n, m in targets.items() if not (stash and n.endswith("down_proj"))) // L
                if cfg.method == "qdora" else 0)
    # what a method's adapters keep per token beyond LoRA's x·Aᵀ (counted in the internals), one layer's worth
    kept = sum(layer_cls.saved_per_token(m, cfg.rank, layer_cls.layer_options(skeleton, n, options)) - cfg.rank
               for n, m in targets.items()) // L
    saved, transient = layer_internals_bytes(config, b, t, cfg.rank, c, per_layer, cfg.dropout, attention, split=True,
                                             extra_per_token=c * (dora_out + kept),
                                             uncheckpointed_graph=compiled and not ckpt)
    sizes = [m.in_features * m.out_features for m in linears.values()]
    # --recompute weights / none: every quantized linear's dequantized copy, held for the run (compiled blocks of
    # one process, or of ddp's; fsdp drops them: qtune.fsdp.shard_model)
    held = policy.keep_weights and compiled and cfg.bits != 16 and not streamed and strategy != "fsdp"
    n_held = min(policy.held_layers or L, L) if held else 0  # --hold-layers: the first N layers' copies only
    if compiled and not ckpt and cfg.bits != 16 and not held:
        saved += sum(sizes) // L * c  # its dequantized weights, saved by the graph for dL/dx (none holds them instead)
    # each layer's input, kept by the checkpoint (and QDoRA's kept down_proj outputs: qtune.engine.recompute)
    layer_inputs = L * b * t * config.hidden_size * c * (2 if stash else 1)
    if ckpt and compiled:  # and each adapter's h = x·Aᵀ (lora_down)
        layer_inputs += L * b * t * cfg.rank * per_layer * c
        if policy.keep_attention:  # and q, k, v (qtune.engine.block.attention): counted there, not again in the layer's internals
            layer_inputs += L * b * t * qkv_width(config) * c
            saved -= b * t * qkv_width(config) * c
            own = cfg.method == "qdora" and {"q_proj", "k_proj", "v_proj"} <= leaves
            # and the attention's output (o_proj's), no internal: a DoRA
            # o_proj keeps its product u instead, the same bytes
            if not own or "o_proj" in leaves:
                layer_inputs += L * b * t * config.hidden_size * c
                if own:  # counted in dora_out's products above: kept now, not recomputed
                    saved -= b * t * config.hidden_size * c
        if policy.keep_mlp:  # --recompute max: and gate/up's outputs (DoRA: their products u, counted above)
            mlp_width = 2 * config.intermediate_size
            layer_inputs += L * b * t * mlp_width * c
            if cfg.method == "qdora" and {"gate_proj", "up_proj"} <= leaves:
                saved -= b * t * mlp_width * c
    # the attention masks, alive from the forward to the end of backward: qtune's block makes one additive
    # (b, 1, t, t) mask per distinct window, block-diagonal over the packed examples; transformers' forward
    # (the generic path) one boolean mask per layer type
    windows = len(set(layer_windows(config)))
    masks = mask_bytes(b, t, windows, c) if unsupported_reason(skeleton) is None else b * t * t * windows
    internals = saved + transient  # one layer's, during its recomputation and backward
    # without checkpointing every layer keeps its saved tensors; the gradient buffers are one layer's either way
    activations = layer_inputs + internals if ckpt else L * saved + transient + layer_inputs
    vocab, hidden = config.vocab_size, config.hidden_size
    softcap = head_of(config).softcap is not None  # Gemma's soft-capped logits: full-vocabulary chunks, and the slope
    if cfg.compile and qcompile.env_enabled() and not softcap:  # one vocabulary block's logits and the chunk's sums
        chunk = min(ce_block_rows(vocab, hidden), b * t)
        logits = chunk * (min(vocab, CE_VOCAB_BLOCK) * CE_BLOCK_BYTES_PER_LOGIT + hidden * CE_BLOCK_BYTES_PER_ROW_HIDDEN)
    else:  # one chunk's full-vocabulary logits
        logits = min(ce_chunk_tokens(vocab, softcap), b * t) * vocab * (CE_SOFTCAP_BYTES_PER_LOGIT if softcap else CE_BYTES_PER_LOGIT)
    logits += 2 * b * t * hidden * c  # and the final hidden states and their gradient (n, h)
    dense = sum(sizes) // L * c * n_held
    base += dense
    if cfg.bits == 16 or (held and n_held == L):
        dequant = 0
    elif compiled and not ckpt:  # an uncheckpointed compiled layer saves its dequantized weights for its backward
        dequant = 0  # (counted in its saved internals above), which dequantizes nothing again
    elif compiled:  # a compiled layer's backward holds all its dequantized weights
        dequant = sum(sizes) // L * c
    else:
        dequant = max(sizes, default=0) * c
    activations += masks
    plan = Plan(base, adapter_params, grads, optimizer, activations, logits, dequant, 0, trainable, layer_inputs,
                loss_phase=layer_inputs + masks + logits,
                backward_phase=backward_peak(activations - internals - masks, grads, L) + masks + internals + dequant,
                masks=masks, recompute=policy.level if ckpt or policy.level == "none" else "off (no checkpointing)",
                dense=dense, kept=max(0, layer_inputs - L * b * t * config.hidden_size * c) if ckpt else 0,
                compiled=compiled, held_layers=n_held, layers=L)
    plan.overhead_bytes = int(0.05 * plan.total_bytes) + (CUDA_CONTEXT_BYTES if device == "cuda" else 0)
    return plan


def _config_for(model: str | None, trust_remote_code: bool, load_config):
    """A model config from a folder, a hub id, a config.json file, or the embedded default."""
    from pathlib import Path

    from transformers import AutoConfig

    from qtune.architectures import check_config
    from qtune.loader import resolve_model_dir

    if model and Path(model).is_file() and Path(model).suffix.lower() != ".gguf":
        try:
            config = AutoConfig.from_pretrained(model)
        except (ValueError, OSError) as e:
            raise QtuneError(f"Cannot read {model} as a model config ({e}). Pass a config.json or a model folder.") from None
        check_config(config, model)
        return config
    return load_config(resolve_model_dir(model), trust_remote_code)


# what --recompute auto leaves free of --max-memory on the CPU, beyond the plan's tensors (and their 5% overhead) and the
# RSS the process has when it chooses: what building the model adds besides its tensors (tokenizer, modeling code, the
# loader) and what the steps add besides theirs (compiled graphs' state, glibc's retained free memory), plus a share of
# the limit. Measured at the bench setting on SmolLM2 in float32 (tools/bench_peft.py --recompute auto --max-memory peer
# runs, read by tools/auto_margin.py: tools/results/auto_margin_2026-12-06.md): peak RSS less the plan and the RSS at
# the choice, 0.14-0.26 GiB across four budgets, where the 0.5 GiB this constant was (set at 09:05 from 0.27 + 0.27 GiB
# measured then) left 0.44-0.53 GiB of each budget unused and auto held 8-25 of 30 layers' copies (docs/benchmarks.md,
# 2026-12-06 14:41)
AUTO_CPU_RSS_FIXED, AUTO_CPU_RSS_FRACTION = 2**28, 0.05


def auto_cpu_headroom(limit: int) -> int:
    """Bytes of a --max-memory `limit` that --recompute auto leaves free on the CPU (see the constants above)."""
    return AUTO_CPU_RSS_FIXED + int(AUTO_CPU_RSS_FRACTION * limit)


def resolve_recompute(cfg: TrainConfig, device: str = "cpu") -> tuple[str, int]:
    """--recompute auto: (level, hold_layers): the most-keeping of none > weights > weights of the first N layers > max
    > default > full whose plan fits the budget: --max-memory (on the CPU less what the process already holds and
    auto_cpu_headroom), else 90% of the device's memory. `weights` only where it holds something (a quantized base
    in memory, compiled blocks); where the whole base's copy does not fit, the most layers' copies that do (N > 0;
    0: all layers). `none` (no checkpointing) only where the layers run eagerly (on a GPU, --no-compile, the
    generic path): there the recomputation is a whole layer's forward, and none measured 0.762x default's step
    (bf16, eager CPU layers). Compiled layers under weights recompute only norms and skinny products, and none
    measured 1.13x weights' step in bf16 there (tools/bench_methods.py, 40 pairs): the uncheckpointed graph saves
    and rereads more than the checkpointed one recomputes (in float32 it measured 0.957x weights' step: auto
    decides by the path, not the dtype). --recompute none still runs them so when asked."""
    from qtune.engine.recompute import LEVELS
    from qtune.memory import current_rss_bytes
    from qtune.train import device_memory_bytes

    if cfg.max_memory > 0:
        limit = int(cfg.max_memory * 2**30)
        # on the CPU the limit bounds RSS, which holds more than the plan's tensors: what the process holds already,
        # and what loading and the steps add besides tensors (auto_cpu_headroom)
        budget = limit - (current_rss_bytes() + auto_cpu_headroom(limit) if device == "cpu" else 0)
    else:
        budget = int(0.9 * device_memory_bytes(torch.device(device)))

    def fits(level: str, hold: int = 0) -> Plan | None:
        p = plan_memory(dataclasses.replace(cfg, recompute=level, hold_layers=hold), device)
        return p if p.total_bytes + p.overhead_bytes <= budget else None

    for level in LEVELS:
        if level == "weights" and cfg.offload != "none":
            continue
        p = plan_memory(dataclasses.replace(cfg, recompute=level, hold_layers=0), device)
        if level == "weights" and not p.dense:
            continue
        if level == "none" and p.compiled:  # measured slower than weights there in bf16 (see above)
            continue
        if p.total_bytes + p.overhead_bytes <= budget:
            return level, 0
        if level == "weights" and p.layers > 1 and fits("weights", 1):  # the most layers' copies that fit
            low, high = 1, p.layers - 1  # fits(low); the plan grows with the number held
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if fits("weights", mid) else (low, mid - 1)
            return "weights", low
    return LEVELS[-1], 0


def suggestions(cfg: TrainConfig, device_bytes: int, device: str = "cpu", world: int = 1,
                strategy: str | None = None) -> list[str]:
    """Changes that would make the plan (one rank's, with `world` processes) fit, each with its new total."""
    import dataclasses

    options = []
    tries = [("--batch-size", "batch_size", max(1, cfg.batch_size // 2)),
             ("--seq-len", "seq_len", max(64, cfg.seq_len // 2)),
             ("--gradient-checkpointing", "gradient_checkpointing", True),
             ("--optim adamw8bit", "optim", "adamw8bit"),
             ("--bits", "bits", 4),
             ("--offload disk", "offload", "disk")]
    if cfg.recompute == "none":  # every layer's activations: checkpoint them again
        tries.append(("--recompute default", "recompute", "default"))
    elif cfg.method == "qdora" and cfg.gradient_checkpointing and not compiles_layers(cfg, device):  # the stash only exists there
        tries.append(("--recompute full", "recompute", "full"))
    elif cfg.gradient_checkpointing and compiles_layers(cfg, device):  # q/k/v are kept only there
        tries.append(("--recompute full", "recompute", "full"))
    for flag, field, value in tries:
        if getattr(cfg, field) == value or (strategy == "fsdp" and field == "offload"):  # fsdp shards instead
            continue
        try:
            new = dataclasses.replace(cfg, **{field: value})
        except QtuneError:  # not combinable with this run's other choices
            continue
        p = plan_memory(new, device, world, strategy)
        need = p.total_bytes + p.overhead_bytes
        shown = flag if isinstance(value, bool) or " " in flag else f"{flag} {value}"
        options.append((need, f"{shown}: {need / 2**30:.2f} GiB{' (fits)' if need <= device_bytes else ''}"))
    return [text for _, text in sorted(options)]


def format_plan(p: Plan, cfg: TrainConfig, device_memory: float | None = None) -> str:
    gib = lambda x: f"{x / 2**30:8.3f} GiB"  # noqa: E731
    rows = [("base weights", p.base_weights), ("adapter params", p.adapter_params), ("adapter grads", p.adapter_grads),
            ("optimizer states", p.optimizer_states), ("activations", p.activations), ("logits", p.logits),
            ("dequant buffers", p.dequant_buffers)]
    lines = [f"qtune plan: {cfg.method}, {cfg.bits}-bit base, r={cfg.rank}, batch {cfg.batch_size} x seq {cfg.seq_len}, "
             f"{cfg.optim}, checkpointing {'off' if p.recompute in ('none', 'off (no checkpointing)') else 'on'}"]
    lines += [f"  {name:<18}{gib(v)}" for name, v in rows]
    lines.insert(6, f"    {'of which masks':<16}{gib(p.masks)}   (attention, {cfg.packing} packing)")
    lines.insert(7, f"    {'of which kept':<16}{gib(p.kept)}   (--recompute {cfg.recompute}"
                    + (f": {p.recompute}" if cfg.recompute == "auto" else "") + ")")
    if p.dense:
        which = "" if p.held_layers == p.layers else f" of the first {p.held_layers} of {p.layers} layers"
        lines.insert(2, f"    {'of which held':<16}{gib(p.dense)}   (the dequantized base{which}, --recompute {p.recompute})")
    lines += [f"  {'peak (tensors)':<18}{gib(p.total_bytes)}   at the {p.peak_phase} (persistent + that moment's terms)",
              f"  {'+ overhead':<18}{gib(p.overhead_bytes)}",
              f"  trainable params  {p.trainable_params:,}"]
    if device_memory is not None:
        fits = p.total_bytes + p.overhead_bytes <= device_memory * 2**30
        lines.append(f"  device memory {device_memory:g} GiB: {'fits' if fits else 'does NOT fit'}")
    return "\n".join(lines)
