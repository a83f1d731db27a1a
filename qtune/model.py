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
from qtune.precision import resolve_compute_dtype
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
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where qtune.train will run it
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device, warn=False)  # train() warned already
    dtype = DTYPES[compute_dtype]
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
    model.set_attn_implementation(attention_implementation(model.config, cfg.batch_size, cfg.seq_len,
                                                           cfg.gradient_checkpointing, compute_dtype, device))
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
    fp32 log-softmax over chunks of positions (default: what fits CE_CHUNK_BYTES; with torch.compile
    on, over blocks of the vocabulary too) and computes
    each chunk's gradient in the same pass, so only the (tokens × hidden) gradient is kept.
    """
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, t, h)
    targets = labels[:, 1:].reshape(-1)                       # position i predicts token i + 1
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])     # (b·(t-1), h)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]             # (n, h), (n,)
    return ChunkedCrossEntropy.apply(hidden, model.lm_head.weight, targets, chunk_tokens), int(targets.numel())


CE_CHUNK_BYTES = 64 * 2**20
CE_BYTES_PER_LOGIT = 6  # eager chunk: the head's bf16 output (2) and its fp32 copy (4), alive together for a moment
CE_VOCAB_BLOCK = 4096   # compiled path: logits formed for this many vocabulary entries at a time
CE_BLOCK_BYTES_PER_LOGIT = 4  # compiled path: a block's bf16 head output and its bf16 exp, alive together
CE_BLOCK_BYTES_PER_ROW_HIDDEN = 10  # and per row and hidden unit: the block's e·W (bf16) and the fp32 sum, twice


def ce_chunk_tokens(vocab: int) -> int:
    """Positions per eager cross-entropy chunk so that one chunk's logits take ~64 MiB."""
    return max(32, min(4096, CE_CHUNK_BYTES // (vocab * CE_BYTES_PER_LOGIT)))


def ce_block_rows(vocab: int, hidden: int) -> int:
    """Positions per chunk of the compiled (vocabulary-blocked) cross-entropy so that its working set,
    one block's logits and the chunk's (rows, hidden) fp32 sums, takes ~64 MiB."""
    per_row = min(vocab, CE_VOCAB_BLOCK) * CE_BLOCK_BYTES_PER_LOGIT + hidden * CE_BLOCK_BYTES_PER_ROW_HIDDEN
    return max(32, min(4096, CE_CHUNK_BYTES // per_row))


@maybe_compile
def _block_softmax(z: torch.Tensor, targets: torch.Tensor, start: int, m: torch.Tensor, s: torch.Tensor,
                   z_y: torch.Tensor):
    """One vocabulary block's step of an online softmax over a chunk's rows (as flash attention does
    over keys): z (c, v) the head's output for vocabulary [start, start + v), in the compute dtype;
    m, s (c,) fp32 the running max and Σ exp(z − m) over the blocks before; z_y (c,) the target's
    logit where it was seen. Returns e = exp(z − m') in z's dtype, m', s' = s·α + Σ e, α = exp(m − m')
    (what the blocks before must be rescaled by) and z_y' (the target's logit if it is in this block)."""
    zf = z.float()
    m_new = torch.maximum(m, zf.amax(dim=1))
    alpha = torch.exp(m - m_new)
    e = torch.exp(zf - m_new[:, None])
    s_new = s * alpha + e.sum(dim=1)
    local = targets - start
    inside = (local >= 0) & (local < z.shape[1])
    seen = zf.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    return e.to(z.dtype), m_new, s_new, alpha, torch.where(inside, seen, z_y)


@maybe_compile
def _rescale_add(acc: torch.Tensor, alpha: torch.Tensor, ew: torch.Tensor) -> torch.Tensor:
    """acc·α + e·W_block: the chunk's running Σ_v exp(z_v − m)·W_v (fp32), rescaled to the new max."""
    return acc * alpha[:, None] + ew.float()


def _blocked_loss_and_grad(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, need_grad: bool):
    """One chunk's (Σ CE, dCE/dh) with the vocabulary in blocks of CE_VOCAB_BLOCK (torch.compile on).

    With m the row max of z = h·Wᵀ and s = Σ_v exp(z_v − m): loss = log s + m − z_y and
    dCE/dh = (softmax(z) − onehot(y))·W = (Σ_v exp(z_v − m)·W_v)/s − W_y. Both sums run over the
    vocabulary blocks online (_block_softmax, _rescale_add), so each block of W is read by its two
    GEMMs (z's and e·W's) while it is in cache, where a full-vocabulary chunk streams all of W (V × h)
    from memory for each of them, and no chunk's (rows × V) logits exist at once. SmolLM2's head at
    b4 × 256 (tools/bench_ce_chunk.py): 398.8 -> 340.5 ms, the same error against fp64. The logits are the bf16 GEMM's, as in the
    eager path; e·W accumulates in fp32 and − W_y is taken there (the eager path subtracts 1 from
    the target's bf16 probability before the GEMM)."""
    c = h.shape[0]
    m = torch.full((c,), float("-inf"), dtype=torch.float32, device=h.device)
    s = torch.zeros(c, dtype=torch.float32, device=h.device)
    z_y = torch.zeros(c, dtype=torch.float32, device=h.device)
    acc = torch.zeros(c, h.shape[1], dtype=torch.float32, device=h.device) if need_grad else None
    for start in range(0, weight.shape[0], CE_VOCAB_BLOCK):
        w = weight[start:start + CE_VOCAB_BLOCK]
        z = F.linear(h, w)                                           # (c, v) in the compute dtype
        e, m, s, alpha, z_y = _block_softmax(z, y, start, m, s, z_y)
        probe()  # the block's peak: z and e
        del z
        if need_grad:
            acc = _rescale_add(acc, alpha, e @ w)                    # (c, v) @ (v, h)
    loss = (torch.log(s) + m - z_y).sum()
    if not need_grad:
        return loss, None
    return loss, (acc / s[:, None] - weight[y].float()).to(h.dtype)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Σ_i CE(h_i Wᵀ, y_i) over chunks, with dL/dh computed in the forward.

    For one chunk: z = h Wᵀ (fp32), p = softmax(z), loss = logsumexp(z) − z_y and
    dloss/dh = (p − onehot(y)) W. Doing this per chunk while z is at hand means no chunk's logits
    are kept for backward (and no second head GEMM to recompute them); backward only scales the
    stored (n, h) gradient. The head W (lm_head / tied embedding) is frozen.
    With torch.compile on (qtune.compile), each chunk also runs over the
    vocabulary in blocks (_blocked_loss_and_grad: an online softmax, compiled kernels; chunks of
    ce_block_rows positions); otherwise (chunks of ce_chunk_tokens positions) the softmax is
    computed in place, keeping the chunk at ~6 bytes per logit. `chunk`: positions per chunk
    (None: the path's default).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int | None = None) -> torch.Tensor:
        need_grad = hidden.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_grad else None  # (n, h)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        blocked = qtune_compile_enabled()
        chunk = chunk or (ce_block_rows(weight.shape[0], weight.shape[1]) if blocked else ce_chunk_tokens(weight.shape[0]))
        for i in range(0, targets.numel(), chunk):
            h, y = hidden[i:i + chunk], targets[i:i + chunk]
            if blocked:
                loss, grad_h = _blocked_loss_and_grad(h, weight, y, need_grad)
                total += loss
                if need_grad:
                    grad_hidden[i:i + chunk] = grad_h
                continue
            head = F.linear(h, weight)                            # (c, V) in the compute dtype
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
