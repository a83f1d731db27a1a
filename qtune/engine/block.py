"""qtune's own decoder block for the Llama family (llama, mistral, qwen2, qwen3), over the model's own
weights: written here as plainly as nanoGPT's, so that no change in how transformers wraps its layers
(the kernels hub, decorators, checkpointing wrappers) can change what qtune runs or compiles.

    x = x + o_proj(attention(rotary(q_proj(n₁(x))), rotary(k_proj(n₁(x))), v_proj(n₁(x))))
    x = x + down_proj(silu(gate_proj(n₂(x))) ⊙ up_proj(n₂(x)))

n = RMSNorm; Qwen3 also normalises each head of q and k (QK-norm) before the rotary embedding; Qwen2's
q/k/v biases live in those linears; Mistral's sliding window is in the mask. Tested against
transformers' own layers and model in fp32 (tests/test_block.py)."""

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

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why qtune's block cannot run this model (None: it can)."""
    config = model.config
    if config.model_type not in FAMILIES:
        return f"architecture {config.model_type}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    layer = model.model.layers[0]
    norms = [layer.input_layernorm, layer.post_attention_layernorm, model.model.norm]
    if not all(hasattr(n, "variance_epsilon") and isinstance(n.weight, torch.Tensor) for n in norms):
        return "norm layout"
    return None


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
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@maybe_compile
def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x·cos + rotate_half(x)·sin for (b, t, heads, d) q and k, returned as contiguous (b, heads, t, d);
    rotate_half(x) = [−x₂, x₁] over the halves of the last dimension."""
    cos, sin = cos[:, :, None], sin[:, :, None]                       # (b, t, 1, d)

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).transpose(1, 2).contiguous()

    return rotate(q), rotate(k)


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, module.weight, float(module.variance_epsilon))


def attention(attn: nn.Module, x, cos, sin, bias, kernel: str, keep_attention: bool) -> torch.Tensor:
    """The attention sub-block: (b, t, hidden) -> (b, t, hidden)."""
    b, t, _ = x.shape
    d = attn.head_dim
    projections = [attn.q_proj, attn.k_proj, attn.v_proj]
    own = all(L.keeps_own_product(p) for p in projections)           # DoRA keeps its products u
    q, k, v = L.group(projections, x, keep_output=keep_attention and own)
    q, k, v = q.view(b, t, -1, d), k.view(b, t, -1, d), v.view(b, t, -1, d).transpose(1, 2)
    if hasattr(attn, "q_norm"):                                       # Qwen3's QK-norm, per head
        q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
    q, k = rotary(q, k, cos, sin)                                     # (b, heads, t, d)
    kept = keep_attention and not own and torch.compiler.is_compiling()
    if kept:  # the recomputation then skips q/k/v's GEMMs and the rotary kernel
        q, k, v = keep(q), keep(k), keep(v)
    kernel_fn = eager_attention if kernel == "eager" else sdpa_attention
    o = kernel_fn(q, k, v, bias, attn.scaling).reshape(b, t, -1)
    keep_o = keep_attention and L.keeps_own_product(attn.o_proj)
    out = L.linear(attn.o_proj, o, keep_output=keep_o)
    if keep_attention and not keep_o and torch.compiler.is_compiling():
        out = keep(out)  # the recomputation needs o's output (for the MLP's input) and skips its GEMMs
    return out


def mlp(module: nn.Module, x: torch.Tensor, keep_down: bool) -> torch.Tensor:
    gate, up = L.group([module.gate_proj, module.up_proj], x)
    return L.linear(module.down_proj, silu_mul(gate, up), keep_output=keep_down, sum_only=True)


def decoder_block(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                  kernel: str, keep_attention: bool, keep_down: bool) -> torch.Tensor:
    """One decoder layer: (b, t, hidden) -> (b, t, hidden)."""
    h = h + attention(layer.self_attn, _norm(layer.input_layernorm, h), cos, sin, bias, kernel, keep_attention)
    return h + mlp(layer.mlp, _norm(layer.post_attention_layernorm, h), keep_down)


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


def position_embeddings(model: nn.Module, h: torch.Tensor):
    """(cos, sin) (b, t, head_dim) for positions 0..t-1, from the model's own rotary module (its scaling)."""
    position_ids = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
    return model.model.rotary_emb(h, position_ids)


def biases(model: nn.Module, attention_mask: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each layer's additive attention mask (layers with the same window share one)."""
    made = {}
    out = []
    for window in layer_windows(model.config):
        if window not in made:
            made[window] = attention_bias(attention_mask, dtype, window)
        out.append(made[window])
    return out
