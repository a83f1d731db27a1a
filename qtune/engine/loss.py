"""The training loss: next-token cross-entropy over chunks, the (tokens × vocab) logits never whole.

ChunkedCrossEntropy runs the head and an fp32 log-softmax over chunks of positions and computes each
chunk's gradient in the same pass, so only the (tokens × hidden) gradient is kept for backward. With
torch.compile on, each chunk also runs over the vocabulary in blocks (an online softmax, as flash
attention does over keys), so each block of the head is read by its two GEMMs while in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtune.engine.compiled import enabled as compile_enabled, maybe_compile
from qtune.memory import probe

IGNORE_INDEX = -100


def token_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
               chunk_tokens: int | None = None, scale: float = 1.0,
               softcap: float | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled tokens, their count) from the final hidden states
    (b, t, h) and the head's weight (vocab, h): position i predicts token i + 1.

    The logits are softcap·tanh(scale·h·Wᵀ / softcap) (qtune.architectures.Head: Granite's and Cohere's
    scales, Gemma's final soft-capping); the scale is applied to h (the same product)."""
    targets = labels[:, 1:].reshape(-1)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])     # (b·(t-1), h)
    kept = targets != IGNORE_INDEX
    hidden, targets = hidden[kept], targets[kept]             # (n, h), (n,)
    if scale != 1.0:
        hidden = hidden * scale
    return ChunkedCrossEntropy.apply(hidden, head_weight, targets, chunk_tokens, softcap), int(targets.numel())


CE_CHUNK_BYTES = 64 * 2**20
CE_BYTES_PER_LOGIT = 6  # eager chunk: the head's bf16 output (2) and its fp32 copy (4), alive together for a moment
CE_SOFTCAP_BYTES_PER_LOGIT = 8  # soft-capping: the fp32 logits and the fp32 slope 1 − tanh² (the head's output freed)
CE_VOCAB_BLOCK = 4096   # compiled path: logits formed for this many vocabulary entries at a time
CE_BLOCK_BYTES_PER_LOGIT = 4  # compiled path: a block's bf16 head output and its bf16 exp, alive together
CE_BLOCK_BYTES_PER_ROW_HIDDEN = 10  # and per row and hidden unit: the block's e·W (bf16) and the fp32 sum, twice


def ce_chunk_tokens(vocab: int, softcap: bool = False) -> int:
    """Positions per eager cross-entropy chunk so that one chunk's logits take ~64 MiB."""
    per_logit = CE_SOFTCAP_BYTES_PER_LOGIT if softcap else CE_BYTES_PER_LOGIT
    return max(32, min(4096, CE_CHUNK_BYTES // (vocab * per_logit)))


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
    from memory for each of them, and no chunk's (rows × V) logits exist at once. The logits are the bf16 GEMM's, as in the
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
    (None: the path's default). softcap (Gemma's final soft-capping): z' = c·tanh(z/c) in fp32, whose
    gradient scales (p − onehot(y)) by 1 − (z'/c)²; it runs the chunks over the whole vocabulary.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int | None = None, softcap: float | None = None) -> torch.Tensor:
        need_grad = hidden.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_grad else None  # (n, h)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        blocked = compile_enabled() and softcap is None
        chunk = chunk or (ce_block_rows(weight.shape[0], weight.shape[1]) if blocked else ce_chunk_tokens(weight.shape[0], softcap is not None))
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
            if softcap is not None:
                logits = logits.div_(softcap).tanh_()             # t = tanh(z/c); the logits are c·t
                slope = 1.0 - logits * logits if need_grad else None
                probe()  # the soft-capped chunk's peak: the fp32 logits and the slope
                logits.mul_(softcap)
            lse = torch.logsumexp(logits, dim=-1)                 # (c,)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()          # softmax, in place of the logits
                probs[torch.arange(y.numel(), device=y.device), y] -= 1.0
                if softcap is not None:
                    probs.mul_(slope)
                    del slope
                probe()
                grad_hidden[i:i + chunk] = probs.to(h.dtype) @ weight  # (c, V) @ (V, h)
            else:
                probe()
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None
