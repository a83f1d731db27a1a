"""Attention of qtune's decoder block: masks (causal, padding, sliding window) and two kernels.

- `eager`: softmax(QKᵀ·s + mask)·V as explicit batched GEMMs with the masked softmax as one compiled
  kernel; GQA without copying K and V, and causal halves (the first half of the queries skips the
  keys of the second). Faster than the fused kernel on the CPU at short sequences; it holds one
  layer's scores, so it is chosen only while they stay small (EAGER_ATTENTION_BYTES).
- `sdpa`: torch's scaled_dot_product_attention (memory-efficient kernels), elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtune.engine.compiled import maybe_compile

EAGER_ATTENTION_BYTES = 64 * 2**20


def choose_attention(config, batch: int, seq: int, checkpointing: bool, compute_dtype: str = "bfloat16",
                     device: str = "cpu") -> str:
    """'eager' on the CPU with checkpointing (one layer's scores alive at a time) while they stay under
    EAGER_ATTENTION_BYTES; 'sdpa' otherwise (and on CUDA, where its flash kernels win everywhere)."""
    if config.model_type == "gemma2" and getattr(config, "attn_logit_softcapping", None) is not None:
        return "eager"  # sdpa cannot soft-cap the scores
    if device != "cpu" or not checkpointing:
        return "sdpa"
    return "eager" if eager_scores_bytes(config, batch, seq, compute_dtype) <= EAGER_ATTENTION_BYTES else "sdpa"


def eager_scores_bytes(config, batch: int, seq: int, compute_dtype: str = "bfloat16") -> int:
    """One layer's attention scores under eager attention: the fp32 softmax output and its cast."""
    c = 4 if compute_dtype == "float32" else 2
    return batch * config.num_attention_heads * seq * seq * (4 + c)


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive mask (b, 1, t, t): 0 where query i may see key j (j ≤ i, j a real token, and i − j < window
    when there is a sliding window), the dtype's minimum elsewhere (as transformers' eager mask)."""
    t = attention_mask.shape[-1]
    pos = torch.arange(t, device=attention_mask.device)
    allowed = pos[None, :] <= pos[:, None]                                # (t, t) causal
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()  # (b, 1, t, t)
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


@maybe_compile
def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    softcap: float | None = None) -> torch.Tensor:
    """softmax(scores·scaling + mask) in fp32, returned in the scores' dtype; with Gemma-2's soft-capping,
    softmax(c·tanh(scores·scaling / c) + mask)."""
    z = scores.float() * scaling
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if mask is not None:
        z = z + mask.float()
    return torch.softmax(z, dim=-1).to(scores.dtype)


def eager_attention(query, key, value, bias, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """(b, heads, t, d) q and (b, kv_heads, t, d) k, v, bias (b, 1, t, t) -> (b, t, heads, d), causal."""
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    g = heads // kv_heads
    cuts = [0, t // 2, t] if t >= 2 else [0, t]
    q = query.reshape(b, kv_heads, g, t, d)     # each KV head's g query heads stacked along the rows
    outs = []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        rows = q[:, :, :, start:stop].reshape(b, kv_heads, g * (stop - start), d)
        scores = torch.matmul(rows, key[:, :, :stop].transpose(2, 3))      # (b, kv, g·rows, keys ≤ stop)
        scores = scores.view(b, kv_heads, g, stop - start, stop)
        mask = bias[:, :, None, start:stop, :stop].contiguous()          # (b, 1, 1, rows, keys)
        probs = _masked_softmax(scores, mask, float(scaling), softcap).view(b, kv_heads, g * (stop - start), stop)
        out = torch.matmul(probs, value[:, :, :stop]).view(b, kv_heads, g, stop - start, d)
        outs.append(out.permute(0, 3, 1, 2, 4))                          # (b, rows, kv, g, d)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return out.reshape(b, t, heads, d)


def sdpa_attention(query, key, value, bias, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """The same through torch's fused kernel: (b, heads, t, d) -> (b, t, heads, d) (no soft-capping:
    the block runs eager_attention where the model soft-caps its scores)."""
    assert softcap is None, "sdpa cannot soft-cap attention scores"
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype), scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)

