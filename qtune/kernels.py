"""Fused elementwise pieces of a Llama-family decoder layer (compiled by qtune.compile).

Attention — qtune's eager attention for CPU training at short sequences: softmax(QKᵀ·s + mask)V.
Registered with transformers' AttentionInterface (and the eager additive mask) as "qtune_eager".
It is transformers' eager attention with the masked softmax — scale, mask add, fp32 softmax, cast
back — as one compiled kernel forward and one backward (qtune.compile). Eagerly, torch's CPU
softmax from a bf16 input to an fp32 output runs ~7× slower than an fp32 softmax
(tools/profile_step.py: 0.49 s of a 1.8 s step), and sdpa's CPU flash kernel runs its small blocks
below the GEMM rate; here the two GEMMs are plain batched bf16 matmuls.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import repeat_kv

from qtune.compile import maybe_compile

NAME = "qtune_eager"


@maybe_compile
def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """softmax(scores·scaling + mask) in fp32, returned in the scores' dtype."""
    z = scores.float() * scaling
    if mask is not None:
        z = z + mask.float()
    return torch.softmax(z, dim=-1).to(scores.dtype)


def qtune_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' attention-function signature: (b, heads, t, d) inputs -> ((b, t, heads, d), None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # GQA: transformers' own helper
    scores = torch.matmul(query, key.transpose(2, 3))                      # (b, h, t, s)
    mask = None if attention_mask is None else attention_mask[:, :, :, :key.shape[-2]]
    probs = _masked_softmax(scores, mask, float(scaling))
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


@maybe_compile
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: w · (x / √(mean(x²) + eps)) computed in fp32, cast back before w."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@maybe_compile
def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def _rms_forward(module, hidden_states):
    return _rms_norm(hidden_states, module.weight, float(module.variance_epsilon))


def _mlp_forward(module, x):
    return module.down_proj(_silu_mul(module.gate_proj(x), module.up_proj(x)))


def fuse_elementwise(model) -> int:
    """Route the model's RMSNorms and SiLU-gated MLPs through the fused functions above (same math,
    one kernel forward and one backward each when compiled); returns how many modules were routed.
    Only modules whose forward is byte-for-byte transformers' Llama one (Mistral, Qwen2/3 copy it)
    are touched; any other implementation keeps its own forward."""
    import types

    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    SILU = (torch.nn.SiLU, SiLUActivation)

    def same_forward(module, reference) -> bool:
        code = getattr(type(module).forward, "__code__", None)
        ref = reference.forward.__code__
        return code is not None and code.co_code == ref.co_code and code.co_names == ref.co_names

    n = 0
    for module in model.modules():
        if same_forward(module, LlamaRMSNorm):
            module.forward = types.MethodType(_rms_forward, module)
            n += 1
        elif same_forward(module, LlamaMLP) and isinstance(getattr(module, "act_fn", None), SILU):
            module.forward = types.MethodType(_mlp_forward, module)
            n += 1
    return n


AttentionInterface.register(NAME, qtune_eager_attention)
AttentionMaskInterface.register(NAME, eager_mask)
