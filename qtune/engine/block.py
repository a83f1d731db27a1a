"""qtune's own decoder block for the main families (llama, mistral, qwen2, qwen3, phi3, gemma2,
gemma3_text), over the model's own weights: written here as plainly as nanoGPT's, so that no change in
how transformers wraps its layers (the kernels hub, decorators, checkpointing wrappers) can change what
qtune runs or compiles.

    x = x + o_proj(attention(rotary(q_proj(n₁(x))), rotary(k_proj(n₁(x))), v_proj(n₁(x))))
    x = x + down_proj(act(gate_proj(n₂(x))) ⊙ up_proj(n₂(x)))

n = RMSNorm (w·x̂; Gemma's (1 + w)·x̂, in fp32); act = silu (gelu-tanh for Gemma).
- Qwen3 and Gemma-3 normalise each head of q and k (QK-norm) before the rotary embedding; Qwen2's
  q/k/v biases live in those linears; sliding windows (Mistral, Gemma's local layers) are in the masks.
- Phi-3: q/k/v are one linear (qkv_proj) and gate/up one (gate_up_proj), each adapted as one; its
  partial rotary embedding rotates the first dimensions of each head only.
- Gemma-2/3 ("sandwich" norms): x = x + n₂(attention(n₁(x))); x = x + n₄(mlp(n₃(x))); Gemma-2 soft-caps
  the attention scores (c·tanh(s/c)); the embeddings are scaled by √hidden; Gemma-3's local layers have
  their own RoPE base. (Its final-logit soft-capping is the head's: qtune.architectures.Head.)
Tested against transformers' own layers and model in fp32 (tests/test_block.py, tests/test_architectures.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.base import Adapter
from qtune.engine import linear as L
from qtune.engine.attention import attention_bias, eager_attention, sdpa_attention
from qtune.engine.compiled import maybe_compile
from qtune.engine.ops import keep
from quant import QuantLinear

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
GENERIC_ENV = "QTUNE_GENERIC"  # =1: every model runs the generic path (benchmarks of the generic path on a Llama)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # config's name -> the block's


def activation(config) -> str:
    """The MLP's activation as the block names it (Gemma's config calls it hidden_activation)."""
    return ACTIVATIONS.get(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu"), "?")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why qtune's block cannot run this model (None: it can)."""
    import os

    config = model.config
    if os.environ.get(GENERIC_ENV) == "1":
        return f"forced by {GENERIC_ENV}=1"
    if config.model_type not in FAMILIES:
        return f"architecture {config.model_type}"
    if activation(config) == "?":
        return f"activation {getattr(config, 'hidden_activation', None) or config.hidden_act}"
    if any(getattr(config, k, 0.0) for k in ("attention_dropout", "resid_pdrop", "embd_pdrop")):
        return "dropout in the model"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    layer = model.model.layers[0]
    names = ["input_layernorm", "post_attention_layernorm"] + (
        ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if config.model_type.startswith("gemma") else [])
    norms = [getattr(layer, n, None) for n in names] + [model.model.norm]
    if not all(_eps(n) is not None and isinstance(n.weight, torch.Tensor) for n in norms):
        return "norm layout"
    return None


def _eps(norm: nn.Module | None) -> float | None:
    eps = getattr(norm, "variance_epsilon", None)
    return getattr(norm, "eps", None) if eps is None else eps


def layer_windows(config) -> list[int | None]:
    """The sliding window of each layer's attention (None: full causal), as transformers decides it."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


@maybe_compile
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w · (x / √(mean(x²) + eps)) computed in fp32, cast back before w (as LlamaRMSNorm)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@maybe_compile
def rms_norm_1p(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(1 + w) · (x / √(mean(x²) + eps)) all in fp32, cast back at the end (as Gemma's RMSNorm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)


@maybe_compile
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@maybe_compile
def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


ACT_MUL = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}


@maybe_compile
def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x·cos + rotate_half(x)·sin for (b, t, heads, d) q and k, returned as contiguous (b, heads, t, d);
    rotate_half(x) = [−x₂, x₁] over the halves of the rotated dimensions. A partial rotary embedding
    (cos narrower than d, Phi-3's partial_rotary_factor) rotates the first dimensions and passes the rest."""
    cos, sin = cos[:, :, None], sin[:, :, None]                       # (b, t, 1, r)
    r = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
        if x_pass.shape[-1]:
            out = torch.cat((out, x_pass), dim=-1)
        return out.transpose(1, 2).contiguous()

    return rotate(q), rotate(k)


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, Adapter):  # a tuned norm (LN tuning): its reference forward, eagerly
        return module(x)
    if hasattr(module, "variance_epsilon"):  # Llama's RMSNorm: w · x̂ (x̂ cast first)
        return rms_norm(x, module.weight, float(module.variance_epsilon))
    return rms_norm_1p(x, module.weight, float(module.eps))  # Gemma's: (1 + w) · x̂ in fp32


def _softcap(attn: nn.Module) -> float | None:
    """Gemma-2's attention-score soft-capping (Gemma-3's config has the field, but its layers ignore it)."""
    cap = getattr(attn, "attn_logit_softcapping", None) if attn.config.model_type == "gemma2" else None
    return None if cap is None else float(cap)


def attention(attn: nn.Module, x, cos, sin, bias, kernel: str, keep_attention: bool) -> torch.Tensor:
    """The attention sub-block: (b, t, hidden) -> (b, t, hidden)."""
    b, t, _ = x.shape
    d = attn.head_dim
    if hasattr(attn, "qkv_proj"):                                     # Phi-3: one linear, [q; k; v]
        own = L.keeps_own_product(attn.qkv_proj)
        qkv = L.linear(attn.qkv_proj, x, keep_output=keep_attention and own)
        kv = attn.num_key_value_heads * d
        q, k, v = qkv.split([qkv.shape[-1] - 2 * kv, kv, kv], dim=-1)
    else:
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        own = all(L.keeps_own_product(p) for p in projections)       # DoRA keeps its products u
        q, k, v = L.group(projections, x, keep_output=keep_attention and own)
    q, k, v = q.view(b, t, -1, d), k.view(b, t, -1, d), v.reshape(b, t, -1, d).transpose(1, 2)
    if hasattr(attn, "q_norm"):                                       # Qwen3's / Gemma-3's QK-norm, per head
        q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
    q, k = rotary(q, k, cos, sin)                                     # (b, heads, t, d)
    kept = keep_attention and not own and torch.compiler.is_compiling()
    if kept:  # the recomputation then skips q/k/v's GEMMs and the rotary kernel
        q, k, v = keep(q), keep(k), keep(v)
    softcap = _softcap(attn)
    kernel_fn = eager_attention if kernel == "eager" or softcap is not None else sdpa_attention
    o = kernel_fn(q, k, v, bias, attn.scaling, softcap).reshape(b, t, -1)
    # kept, the recomputation has o's output (for the MLP's input) without its GEMMs
    return L.linear(attn.o_proj, o, keep_output=keep_attention)


def mlp(module: nn.Module, x: torch.Tensor, keep_down: bool, act: str = "silu", sum_only: bool = True,
        keep_mlp: bool = False) -> torch.Tensor:
    """sum_only: the output only feeds the residual sum (not a norm), so a recomputation may skip its base GEMM.
    keep_mlp (--recompute max): a compiled block's checkpoint keeps gate/up's outputs (DoRA: its products u),
    so that its recomputation skips their GEMMs and dequantizations."""
    if hasattr(module, "gate_up_proj"):                               # Phi-3: one linear, [gate; up]
        gate, up = L.linear(module.gate_up_proj, x, keep_output=keep_mlp).chunk(2, dim=-1)
    else:
        gate, up = L.group([module.gate_proj, module.up_proj], x, keep_output=keep_mlp)
    keep_d = keep_down and L.keeps_own_product(module.down_proj)  # LoRA's: only the residual sum reads it
    return L.linear(module.down_proj, ACT_MUL[act](gate, up), keep_output=keep_d, sum_only=sum_only)


def decoder_block(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                  kernel: str, keep_attention: bool, keep_down: bool, act: str = "silu",
                  keep_mlp: bool = False) -> torch.Tensor:
    """One decoder layer: (b, t, hidden) -> (b, t, hidden)."""
    a = attention(layer.self_attn, _norm(layer.input_layernorm, h), cos, sin, bias, kernel, keep_attention)
    if hasattr(layer, "pre_feedforward_layernorm"):                   # Gemma's sandwich: norms after, too
        h = h + _norm(layer.post_attention_layernorm, a)
        m = mlp(layer.mlp, _norm(layer.pre_feedforward_layernorm, h), keep_down, act, sum_only=False, keep_mlp=keep_mlp)
        return h + _norm(layer.post_feedforward_layernorm, m)
    h = h + a
    return h + mlp(layer.mlp, _norm(layer.post_attention_layernorm, h), keep_down, act, keep_mlp=keep_mlp)


def linear_groups(layer: nn.Module) -> list[list[nn.Module]]:
    """The linears of a layer that read one input, as attention() and mlp() group them (L.group): q/k/v and gate/up
    (Phi-3's are one linear each already)."""
    attn, mlp_ = layer.self_attn, layer.mlp
    groups = [] if hasattr(attn, "qkv_proj") else [[attn.q_proj, attn.k_proj, attn.v_proj]]
    return groups + ([] if hasattr(mlp_, "gate_up_proj") else [[mlp_.gate_proj, mlp_.up_proj]])


def block_compile_reason(layer: nn.Module) -> str | None:
    """Why this layer cannot run as one compiled graph (None: it can)."""
    for m in layer.modules():
        if m is layer:
            continue
        if isinstance(m, (Adapter, QuantLinear, nn.Linear)):
            reason = L.compiled_form_reason(m)
            if reason is not None:
                return reason
        elif m._forward_hooks or m._forward_pre_hooks:
            return "hooks"
    return None


def position_embeddings(model: nn.Module, h: torch.Tensor, position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (cos, sin) (b, t, rotary dims) at position_ids (b, t) (per example: restarting at each
    packed example), from the model's own rotary module (its scaling; Gemma-3's per layer type, local and
    global, with their two bases)."""
    import inspect

    rotary_emb = model.model.rotary_emb
    types = getattr(model.config, "layer_types", None)
    if types is not None and "layer_type" in inspect.signature(rotary_emb.forward).parameters:
        made = {kind: rotary_emb(h, position_ids, kind) for kind in set(types)}
        return [made[kind] for kind in types]
    return [rotary_emb(h, position_ids)] * model.config.num_hidden_layers


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings (Gemma's scaled by √hidden, rounded to the weights' dtype as transformers does).
    The embedding's weight, not its module: transformers' checkpointing hooks the module so that its
    output requires grad, which would only add the first layer's dL/dx (the embeddings are frozen)."""
    module = model.model.embed_tokens
    h = F.embedding(input_ids, module.weight)
    scale = getattr(module, "embed_scale", None)
    return h if scale is None else h * scale.to(h.dtype)


def final_norm(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return _norm(model.model.norm, h)


def biases(model: nn.Module, segment_ids: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each layer's additive attention mask, block-diagonal over the packed examples (segment_ids, see
    qtune.engine.attention.attention_bias); layers with the same window share one."""
    made = {}
    out = []
    for window in layer_windows(model.config):
        if window not in made:
            made[window] = attention_bias(segment_ids, dtype, window)
        out.append(made[window])
    return out
