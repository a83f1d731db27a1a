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


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(b, t) position of each token within its segment: 0, 1, … restarting wherever the segment id
    changes (packed examples each start at 0, as they would alone; padding is a segment of its own)."""
    t = segment_ids.shape[-1]
    index = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(-1).values


def attention_bias(segment_ids: torch.Tensor, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive mask (b, 1, t, t): 0 where query i may see key j (j ≤ i, j in i's segment, and i − j < window
    when there is a sliding window), the dtype's minimum elsewhere (as transformers' eager mask).

    segment_ids (b, t): 0 for padding, k ≥ 1 for the k-th example of a row; a 0/1 attention mask is one
    segment per row. Padding attends to padding only, so no row of the mask is empty. Within a segment
    i − j is the same in per-example positions, so the window needs no positions."""
    t = segment_ids.shape[-1]
    pos = torch.arange(t, device=segment_ids.device)
    allowed = pos[None, :] <= pos[:, None]                                # (t, t) causal
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    allowed = allowed[None, None] & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])  # (b, 1, t, t)
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


def mask_bytes(batch: int, seq: int, windows: int, compute_bytes: int) -> int:
    """The additive masks of one forward (one per distinct window, kept until backward) and the boolean
    one each is made from."""
    return batch * seq * seq * (windows * compute_bytes + 1)


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

