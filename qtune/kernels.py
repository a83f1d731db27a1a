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
    """transformers' attention-function signature: (b, heads, t, d) inputs -> ((b, t, heads, d), None).

    softmax(QKᵀ·s + mask)V with two savings over transformers' eager attention (same math):
    - GQA without repeat_kv: each KV head's g query heads are stacked along the rows, so one
      (g·t, d) @ (d, s) product per KV head replaces copying K and V g times (and summing their
      gradients back in backward);
    - causal blocks: with a causal mask and no cache (t == s), the queries are cut in two halves and
      the first half skips the keys of the second, all masked for it: 3/4 of the score matrix, its
      softmax and its products (per layer, forward + recomputation + backward at SmolLM2's b4 × 256,
      alternating medians: 13.1 -> 9.4 ms). A row whose keys are all masked (a padded position under
      left padding) is uniform over the keys it was given either way, but over fewer of them here:
      such positions carry no label, so the loss and its gradients are those of the full product."""
    b, heads, t, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    g = heads // kv_heads
    causal = attention_mask is not None and getattr(module, "is_causal", False) and t == s and t >= 2
    cuts = [0, t // 2, t] if causal else [0, t]
    q = query.reshape(b, kv_heads, g, t, d)
    outs = []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        keys = stop if causal else s                                          # keys this block can see
        rows = q[:, :, :, start:stop].reshape(b, kv_heads, g * (stop - start), d)
        scores = torch.matmul(rows, key[:, :, :keys].transpose(2, 3))        # (b, kv, g·rows, keys)
        scores = scores.view(b, kv_heads, g, stop - start, keys)
        mask = None if attention_mask is None else _block_mask(attention_mask, kv_heads, start, stop, keys)
        probs = _masked_softmax(scores, mask, float(scaling)).view(b, kv_heads, g * (stop - start), keys)
        probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
        out = torch.matmul(probs, value[:, :, :keys]).view(b, kv_heads, g, stop - start, d)
        outs.append(out.permute(0, 3, 1, 2, 4))                              # (b, rows, kv, g, d)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return out.reshape(b, t, heads, d), None


def _block_mask(mask: torch.Tensor, kv_heads: int, start: int, stop: int, keys: int) -> torch.Tensor:
    """The additive mask's rows [start, stop) and first `keys` columns, shaped to broadcast over the
    (b, kv, g, rows, keys) scores: (b, 1, 1, rows, keys), or per head (b, kv, g, rows, keys).
    Contiguous, so the compiled softmax sees one layout for every block."""
    block = mask[:, :, start:stop, :keys]
    block = block[:, :, None] if block.shape[1] == 1 else block.reshape(block.shape[0], kv_heads, -1, *block.shape[2:])
    return block.contiguous()


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
