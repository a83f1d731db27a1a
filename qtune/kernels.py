"""Fused elementwise pieces of a Llama-family decoder layer (compiled by qtune.compile).

Attention — qtune's eager attention for CPU training at short sequences: softmax(QKᵀ·s + mask)V.
Registered with transformers' AttentionInterface (and the eager additive mask) as "qtune_eager".
It is transformers' eager attention with the masked softmax — scale, mask add, fp32 softmax, cast
back — as one compiled kernel forward and one backward (qtune.compile). Eagerly, torch's CPU
softmax from a bf16 input to an fp32 output runs ~7× slower than an fp32 softmax
(tools/profile_step.py: 0.49 s of a 1.8 s step), and sdpa's CPU flash kernel runs its small blocks
below the GEMM rate; here the two GEMMs are plain batched bf16 matmuls (GQA without copying K and V,
and causal halves: see qtune_eager_attention).
Rotary — the attention's rotary embedding of q and k as one compiled kernel (_rotary_qk), routed
with the rest by fuse_elementwise.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

from qtune.adapters.lora import group_forward
from qtune.compile import keep, maybe_compile

NAME = "qtune_eager"
KEEP_QKV = "qtune_keep_qkv"  # attribute of an attention module: keep q, k, v from the forward (set_keep_qkv)


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


@maybe_compile
def _rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' apply_rotary_pos_emb on (b, t, heads, d) projections, returned as contiguous
    (b, heads, t, d): x·cos + rotate_half(x)·sin, with rotate_half(x) = [−x₂, x₁] over the last dim's
    halves. One kernel forward and one backward for q and k together (eagerly: ~12 ops each way, and
    q, k left transposed in memory, which the attention's products then copy)."""
    cos, sin = cos[:, :, None], sin[:, :, None]                       # (b, t, 1, d)

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).transpose(1, 2).contiguous()

    return rotate(q), rotate(k)


def _attention_forward(module, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                       **kwargs):
    """transformers' LlamaAttention.forward with the rotary embedding as one fused kernel (_rotary_qk)
    and q/k/v's adapters sharing their down-projection in a compiled layer (group_forward)."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    q, k, v = group_forward([module.q_proj, module.k_proj, module.v_proj], hidden_states)
    kept = getattr(module, KEEP_QKV, False) and torch.compiler.is_compiling()
    if kept:
        v = keep(v)
    query_states = q.view(hidden_shape)                                # (b, t, heads, d)
    key_states = k.view(hidden_shape)
    value_states = v.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = _rotary_qk(query_states, key_states, cos, sin)  # (b, heads, t, d)
    if kept:  # a compiled layer's recomputation then skips q/k/v's GEMMs and the rotary kernel
        query_states, key_states = keep(query_states), keep(key_states)
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, module.layer_idx)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                                eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        module, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout, scaling=module.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    out = module.o_proj(attn_output)
    if kept:  # backward reads o_proj's inputs only: its base GEMM leaves the recomputation too
        out = keep(out)
    return out, attn_weights


def set_keep_qkv(model, flag: bool) -> int:
    """Whether each routed attention module keeps its q, k (after the rotary embedding), v and its
    output (o_proj's) from the forward in a compiled, checkpointed layer (qtune.compile.keep) instead
    of recomputing them in backward: b·t·(q + k + v + hidden widths) more bytes per layer held until
    its backward (SmolLM2 at b4 × 256: 3.2 MB per layer), for q/k/v/o's base GEMMs, their adapters'
    up-projections and the rotary kernel not run again. o_proj's output feeds only the residual
    sum, whose backward reads nothing; its adapter's gradients read o_proj's input, which the
    recomputation still forms (the attention's products). Returns how many modules were set.
    DoRA's projections keep their products u (before the magnitude's scale) instead, and the
    attention none: the magnitude's gradient reads u, which q, k and v after the rotary embedding do
    not give back (qtune.adapters.dora.dora_traced); the same bytes. A DoRA o_proj keeps its u too
    (the attention's output before the magnitude's scale: the same b·t·h bytes as QLoRA's kept
    output), so its recomputation skips o's base GEMM and up-projection as QLoRA's does."""
    n = 0
    for module in model.modules():
        if getattr(module.forward, "__func__", None) is _attention_forward:
            projections = [module.q_proj, module.k_proj, module.v_proj]
            own = all(hasattr(p, "keep_product") for p in projections)
            for p in projections + [module.o_proj]:
                if hasattr(p, "keep_product"):
                    p.keep_product = bool(flag) and own
            setattr(module, KEEP_QKV, bool(flag) and not own)
            n += 1
    return n


def _rms_forward(module, hidden_states):
    return _rms_norm(hidden_states, module.weight, float(module.variance_epsilon))


def _mlp_forward(module, x):
    gate, up = group_forward([module.gate_proj, module.up_proj], x)  # one down-projection for both adapters
    return module.down_proj(_silu_mul(gate, up))


def fuse_elementwise(model) -> int:
    """Route the model's RMSNorms, SiLU-gated MLPs and attention rotary embeddings through the fused
    functions above (same math, one kernel forward and one backward each when compiled); returns how
    many modules were routed.
    Only modules whose forward is byte-for-byte transformers' Llama one (Mistral, Qwen2/3 copy it)
    are touched; any other implementation keeps its own forward."""
    import sys
    import types

    from transformers.activations import SiLUActivation
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

    SILU = (torch.nn.SiLU, SiLUActivation)

    def same_code(fn, ref) -> bool:
        code = getattr(fn, "__code__", None)
        return code is not None and code.co_code == ref.__code__.co_code and code.co_names == ref.__code__.co_names

    def same_forward(module, reference) -> bool:
        return same_code(type(module).forward, reference.forward)

    def llama_rotary(module) -> bool:  # the attention's module calls Llama's rotary functions (or copies)
        home = sys.modules.get(type(module).__module__)
        return all(same_code(getattr(home, name, None), getattr(llama, name))
                   for name in ("apply_rotary_pos_emb", "rotate_half"))

    n = 0
    for module in model.modules():
        if same_forward(module, LlamaRMSNorm):
            module.forward = types.MethodType(_rms_forward, module)
            n += 1
        elif same_forward(module, LlamaMLP) and isinstance(getattr(module, "act_fn", None), SILU):
            module.forward = types.MethodType(_mlp_forward, module)
            n += 1
        elif same_forward(module, LlamaAttention) and llama_rotary(module):
            module.forward = types.MethodType(_attention_forward, module)
            n += 1
    return n


AttentionInterface.register(NAME, qtune_eager_attention)
AttentionMaskInterface.register(NAME, eager_mask)
