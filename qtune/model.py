"""Build the trainable model of a run: quantized base + adapters, and the loss it is trained on."""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pathlib import Path

from qtune import compile as qcompile
from qtune.compile import enabled as qtune_compile_enabled, maybe_compile
from qtune import kernels, recompute
from qtune.adapters import attach_adapters, layer_options, set_initial_factors
from qtune.base_init import load_initialised_base
from qtune.rosa_support import restore_supports
from qtune.config import TrainConfig
from qtune.memory import probe
from qtune.loader import DTYPES, QuantSpec, load_config, load_model, load_tokenizer, resolve_model_dir

IGNORE_INDEX = -100


def build_model(cfg: TrainConfig, run_dir: Path | None = None, progress: bool = True, meter=None):
    """(model with adapters, tokenizer, model_dir, init report) for a run configuration.

    meter (qtune.memory.MemoryMeter): the tokenizer is loaded outside what it counts.

    With --init pissa|milora|loftq the base is the initialiser's residual, computed while loading
    and kept in run_dir (see qtune.base_init); otherwise the shared quantized cache is used."""
    model_dir = resolve_model_dir(cfg.model)
    load_config(model_dir, cfg.trust_remote_code)  # an unsupported architecture is named before anything else
    with meter.excluding() if meter is not None else contextlib.nullcontext():
        tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    quant = QuantSpec(cfg.bits, cfg.quant_type, cfg.double_quant)
    dtype = DTYPES[cfg.compute_dtype]
    factors, report = None, None
    qcompile.set_enabled(cfg.compile and qcompile.env_enabled())
    if cfg.init == "default":
        model = load_model(model_dir, quant, dtype, cfg.trust_remote_code, progress=progress, offload=cfg.offload)
    else:
        model, factors, report = load_initialised_base(model_dir, cfg, quant, dtype, run_dir, progress)
    attach_adapters(model, cfg.method, cfg.target_modules, cfg.rank, cfg.scale, cfg.dropout, cfg.seed,
                    layer_options(cfg.method, cfg))
    if factors is not None:
        set_initial_factors(model, factors)
    restore_supports(model, run_dir)  # RoSA: the masks chosen when the run started
    kernels.fuse_elementwise(model)  # RMSNorm, SiLU·up, rotary: one compiled kernel each (qtune.kernels)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where qtune.train will run it
    model.set_attn_implementation(attention_implementation(model.config, cfg.batch_size, cfg.seq_len,
                                                           cfg.gradient_checkpointing, cfg.compute_dtype, device))
    if cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (no need to make embeddings require grad);
        # context_fn lets the recomputation skip down_proj's base GEMM (qtune.recompute)
        kwargs = {"use_reentrant": False, "context_fn": recompute.context_fn}
        recompute.mark_output_unused_in_recompute(model, stash=cfg.dora_stash)
        offload = cfg.offload_activations and torch.cuda.is_available()
        if cfg.offload_activations and not offload:
            warnings.warn("--offload-activations: activations are in host memory already on this CPU-only machine; "
                          "nothing to offload (ignored).", stacklevel=2)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if device == "cpu":  # whole layers as compiled graphs where their adapters allow (qtune.compile)
            kernels.set_keep_qkv(model, cfg.keep_qkv)  # in the compiled layers only (qtune.kernels)
            if qcompile.compile_decoder_layers(decoder_layers(model), compilable_layer):
                for m in model.modules():  # DoRA's ‖W‖²_row: an input of the compiled layers, computed once
                    if hasattr(m, "prepare_row_sq"):
                        m.prepare_row_sq(dtype)
    return model, tokenizer, model_dir, report


def compiles_layers(cfg: TrainConfig, device: str = "cpu") -> bool:
    """Whether build_model runs this configuration's decoder layers as compiled graphs (the
    configuration-level form of compilable_layer, for qtune.plan)."""
    return (device == "cpu" and cfg.gradient_checkpointing and cfg.compile and qcompile.env_enabled()
            and qcompile.layers_env_enabled()
            and (cfg.method in ("qlora", "qpissa", "qrosa") or cfg.method == "qdora" and cfg.dora_detach_norm)
            and cfg.dropout == 0 and cfg.offload != "disk")


def compilable_layer(layer: nn.Module) -> bool:
    """Whether a decoder layer can run as one compiled graph (qtune.compile.compile_decoder_layers):
    every adapted linear in it is a LoRALinear, a DoRALinear with the norm detached or a RoSALinear
    with its support fixed, without dropout, on a base the fused node computes (a resident quantized
    or frozen 16-bit linear), every unadapted QuantLinear holds its weight in memory, and no
    submodule has hooks (RoSA's support selection hooks the linears). DoRA with the norm's gradient,
    dropout (its random mask would have to be replayed in the compiled recomputation) and weights
    streamed from disk or host (quant.offload) keep the eager path. Checked at every call
    (qtune.compile.CompiledLayerCheckpoint): cheap, a walk over the layer's ~20 modules."""
    from quant import QuantLinear
    from quant.formats import QuantizedWeight
    from qtune.adapters.dora import DoRALinear
    from qtune.adapters.lora import LoRALinear, fusable
    from qtune.adapters.rosa import RoSALinear

    for m in layer.modules():
        if m is not layer and (m._forward_hooks or m._forward_pre_hooks):
            return False
        if hasattr(m, "base_layer"):
            kind_ok = (type(m) is LoRALinear or (type(m) is DoRALinear and m.detach_norm)
                       or (type(m) is RoSALinear and m.nnz > 0))
            if not kind_ok or not isinstance(m.dropout, nn.Identity) or not fusable(m.base_layer):
                return False
        if isinstance(m, QuantLinear) and type(m.qweight) is not QuantizedWeight:
            return False
    return True


EAGER_ATTENTION_BYTES = 64 * 2**20


def attention_implementation(config, batch: int, seq: int, checkpointing: bool, compute_dtype: str = "bfloat16",
                             device: str = "cpu") -> str:
    """'qtune_eager' (softmax(QKᵀ)V as explicit GEMMs, qtune.kernels) or 'sdpa' (fused, memory-efficient).

    On the CPU, at short sequences, eager is faster (tools/profile_step.py: SmolLM2 seq 256 × 4, a step
    −10%): torch's CPU flash kernel runs its small blocks well below the GEMM rate. Eager keeps one
    layer's score matrices (fp32 softmax + its compute-dtype copy), so it is chosen only with
    checkpointing (one layer's at a time) and when they stay under EAGER_ATTENTION_BYTES; on CUDA
    sdpa's flash kernels win everywhere."""
    if device != "cpu" or not checkpointing:
        return "sdpa"
    fits = eager_scores_bytes(config, batch, seq, compute_dtype) <= EAGER_ATTENTION_BYTES
    return kernels.NAME if fits else "sdpa"


def eager_scores_bytes(config, batch: int, seq: int, compute_dtype: str = "bfloat16") -> int:
    """One layer's attention scores under eager attention: fp32 softmax output and its cast."""
    c = 4 if compute_dtype == "float32" else 2
    return batch * config.num_attention_heads * seq * seq * (4 + c)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled tokens, number of labelled tokens).

    The (tokens × vocab) logits never exist at once: ChunkedCrossEntropy runs the head and an
    fp32 log-softmax over chunks of positions (default: what fits CE_CHUNK_BYTES) and computes
    each chunk's gradient in the same pass, so only the (tokens × hidden) gradient is kept.
    """
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, t, h)
    targets = labels[:, 1:].reshape(-1)                       # position i predicts token i + 1
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])     # (b·(t-1), h)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]             # (n, h), (n,)
    weight = model.lm_head.weight
    chunk = chunk_tokens or ce_chunk_tokens(weight.shape[0])
    return ChunkedCrossEntropy.apply(hidden, weight, targets, chunk), int(targets.numel())


CE_CHUNK_BYTES = 64 * 2**20
CE_BYTES_PER_LOGIT = 6  # per chunk: the head's bf16 output (2) and its fp32 copy (4), alive together for a moment


def ce_chunk_tokens(vocab: int) -> int:
    """Positions per cross-entropy chunk so that one chunk's logits take ~64 MiB."""
    return max(32, min(4096, CE_CHUNK_BYTES // (vocab * CE_BYTES_PER_LOGIT)))


@maybe_compile
def _chunk_loss_and_grad(head: torch.Tensor, targets: torch.Tensor):
    """One chunk's (Σ CE, dCE/dz) from its head output z (c, V) in the compute dtype.

    With m = max z and s = Σ exp(z − m) per row: loss = log s + m − z_y in fp32, dCE/dz = exp(z − m)/s
    − onehot(y), computed in fp32 and returned in z's dtype. Written as a softmax (not logsumexp)
    with the target's −1 put in by one scatter of c values, inductor runs max, sum and the gradient
    in one loop per row while the row is in cache, with no per-logit compare against y: about half
    the time of the logsumexp/one-hot form (tools/bench_ce_chunk.py: 0.52×)."""
    logits = head.float()
    m = logits.amax(dim=1, keepdim=True)                                   # (c, 1)
    e = torch.exp(logits - m)
    s = e.sum(dim=1, keepdim=True)                                         # (c, 1)
    grad = (e / s).to(head.dtype)          # this order: the gather below stays out of the row loop
    z_y = logits.gather(1, targets[:, None])                               # (c, 1)
    loss = (torch.log(s) + m - z_y).sum()
    p_y = torch.exp(z_y - m) / s
    return loss, grad.scatter(1, targets[:, None], (p_y - 1.0).to(head.dtype))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Σ_i CE(h_i Wᵀ, y_i) over chunks, with dL/dh computed in the forward.

    For one chunk: z = h Wᵀ (fp32), p = softmax(z), loss = logsumexp(z) − z_y and
    dloss/dh = (p − onehot(y)) W. Doing this per chunk while z is at hand means no chunk's logits
    are kept for backward (and no second head GEMM to recompute them); backward only scales the
    stored (n, h) gradient. The head W (lm_head / tied embedding) is frozen.
    With torch.compile on (qtune.compile) the softmax/gradient of a chunk is one fused kernel;
    eagerly it is computed in place, keeping the chunk at ~6 bytes per logit.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_grad = hidden.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_grad else None  # (n, h)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        fused = need_grad and qtune_compile_enabled()
        for i in range(0, targets.numel(), chunk):
            h, y = hidden[i:i + chunk], targets[i:i + chunk]
            head = F.linear(h, weight)                            # (c, V) in the compute dtype
            if fused:
                loss, grad_z = _chunk_loss_and_grad(head, y)      # fp32 scalar, (c, V) compute dtype
                probe()  # the chunk's peak: head and its gradient
                del head
                total += loss
                grad_hidden[i:i + chunk] = grad_z @ weight         # (c, V) @ (V, h)
                continue
            logits = head.float()                                 # (c, V) fp32
            probe()  # the chunk's peak: both copies alive
            del head
            lse = torch.logsumexp(logits, dim=-1)                 # (c,)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()          # softmax, in place of the logits
                probs[torch.arange(y.numel(), device=y.device), y] -= 1.0
                probe()
                grad_hidden[i:i + chunk] = probs.to(h.dtype) @ weight  # (c, V) @ (V, h)
            else:
                probe()
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


@torch.no_grad()
def evaluate(model: nn.Module, blocks, batch_size: int, max_batches: int = 0) -> float:
    """Mean per-token loss over the held-out blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = len(blocks)
    for b, i in enumerate(range(0, n, batch_size)):
        if max_batches and b >= max_batches:
            break
        s = slice(i, min(i + batch_size, n))
        loss, k = causal_lm_loss(model, blocks.input_ids[s], blocks.attention_mask[s], blocks.labels[s])
        total, count = total + loss.item(), count + k
    model.train(was_training)
    return total / max(count, 1)
