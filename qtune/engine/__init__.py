"""qtune's fast path, in one package: the fused autograd nodes (fused), the custom operators (ops), the
compiled decoder block (block, compiled), the recomputation policy (recompute) and the loss (loss).

An Engine runs a model's decoder stack. For the families qtune accelerates it runs qtune's own block
(each layer one compiled graph where it can be, else eager fused nodes); for any other model,
transformers' own forward with the adapters' reference forwards. Either way it records which path each
layer ran, and why (execution_report), and warns once when a layer that should have compiled did not.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from qtune.adapters.dora import DoRALinear
from qtune.architectures import decoder, head_of
from qtune.engine.block import (activation, biases, block_compile_reason, decoder_block, embed, final_norm, linear_groups,
                                position_embeddings, unsupported_reason)
from qtune.engine.attention import segment_positions
from qtune.engine.compiled import COMPILED, BlockRunner
from qtune.engine.fused import STEP_NORMS
from qtune.engine.linear import hold_dense_weights, route_adapters
from qtune.engine.loss import IGNORE_INDEX, token_loss
from qtune.engine.recompute import RecomputePolicy, context_fn
from qtune.memory import probe

# reasons a layer runs eager by configuration (not worth a warning): anything else is a failure
CONFIGURED = ("compile off", "dropout", "dora norm gradient", "offloaded weights", "no checkpointing",
              "not on cpu", "rosa support not chosen", "hooks", "generic", "method ")


class Engine:
    """The fast path of one model (attached as `model.qtune_engine` by qtune.model.build_model)."""

    def __init__(self, model: nn.Module, attention: str = "eager", policy: RecomputePolicy = RecomputePolicy(),
                 checkpointing: bool = True, compile_reason: str | None = None):
        self.model, self.attention, self.policy, self.checkpointing = model, attention, policy, checkpointing
        self.unsupported = unsupported_reason(model)
        self.head = head_of(model.config)  # the model's own transforms of its logits
        self._head_weight = None
        self.compile_reason = compile_reason  # why no layer may compile in this run (None: they may)
        self.runner = BlockRunner(context_fn)
        self.stack = None  # --distributed fsdp: the layers' FSDP2 wrappers (qtune.fsdp.ShardedStack)
        self._warned = False

    def hidden_states(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states (b, t, hidden).

        segment_ids (b, t): 0 for padding, k ≥ 1 for the k-th packed example of a row (a 0/1 attention
        mask is one example per row). Each token attends to the earlier tokens of its own example only,
        at positions that restart from 0 for each example (qtune.data's packing)."""
        positions = segment_positions(segment_ids)
        if self.unsupported is not None:  # transformers' forward; checkpointing is transformers' own
            if torch.is_grad_enabled():
                n = self.model.config.get_text_config().num_hidden_layers
                self.runner.paths = {i: f"generic ({self.unsupported})" for i in range(n)}
            # transformers' packed format: no 2-D mask and position ids that restart per example, from which
            # its mask functions make each layer type's block-diagonal mask (sliding windows included)
            return decoder(self.model)(input_ids=input_ids, attention_mask=None,
                                       position_ids=positions).last_hidden_state
        h = embed(self.model, input_ids)
        rotations = position_embeddings(self.model, h, positions)
        masks = biases(self.model, segment_ids, h.dtype)
        if self.stack is not None:  # fsdp: the same layer calls, each through its FSDP2 unit
            h = self.stack(h, rotations, masks, self._run_layer)
        else:
            for i, layer in enumerate(self.model.model.layers):
                cos, sin = rotations[i]
                h = self._run_layer(i, layer, h, cos, sin, masks[i])
        probe()
        return final_norm(self.model, h)

    def _run_layer(self, i: int, layer: nn.Module, h, cos, sin, mask):
        probe()
        p, act = self.policy, activation(self.model.config)
        reason = self.compile_reason or block_compile_reason(layer)
        holds = p.keep_weights and (not p.held_layers or i < p.held_layers)  # --hold-layers: the first N only
        if holds and reason is None and self.runner.failure is None and torch.is_grad_enabled():
            hold_dense_weights(layer, h.dtype, linear_groups(layer))  # --recompute weights: made at the layer's first training forward
        h = self.runner.run(i, decoder_block, (layer, h, cos, sin, mask, self.attention, p.keep_attention,
                                               p.keep_down, act, p.keep_mlp), reason, self.checkpointing,
                            variant=holds)
        if h.requires_grad:  # a memory meter samples in backward too, at each layer's boundary
            h.register_hook(_probe_in_backward)
        return h

    def logits(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """(b, t, vocab) logits in the compute dtype (all at once: for scoring, not for training)."""
        return self.head.apply(self.model.get_output_embeddings()(self.hidden_states(input_ids, segment_ids)))

    def mean_loss(self, batch: dict) -> torch.Tensor:
        """The mean next-token cross-entropy of a batch from its full fp32 logits, as transformers' own
        loss computes it (RoSA's support selection ranks gradients of this)."""
        logits = self.logits(batch["input_ids"], batch["segment_ids"])
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def loss(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, labels: torch.Tensor,
             chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """(sum of next-token cross-entropy over labelled tokens, their count)."""
        hidden = self.hidden_states(input_ids, segment_ids)
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is None:
            return token_loss(hidden, head.weight, labels, chunk_tokens, self.head.scale, self.head.softcap)
        # a head with a bias (Phi-2): h·Wᵀ + b = [h, 1]·[W, b]ᵀ, the frozen [W, b] made once
        if self._head_weight is None:
            self._head_weight = torch.cat([head.weight.detach(), head.bias.detach()[:, None]], dim=1)
        hidden = torch.cat([hidden, hidden.new_ones(*hidden.shape[:-1], 1)], dim=-1)
        return token_loss(hidden, self._head_weight, labels, chunk_tokens, self.head.scale, self.head.softcap)

    @contextlib.contextmanager
    def parameters_fixed(self):
        """Declares that the adapters' parameters do not change inside (qtune.train.train_step wraps the
        micro-batches of one optimizer step in it): each eager QDoRA layer computes its norms
        n = ‖W + s·BA‖ once, and every forward and recomputation inside reuses them. Leaving it forgets them."""
        layers = [m for m in self.model.modules() if isinstance(m, DoRALinear)]
        for m in layers:
            setattr(m, STEP_NORMS, {})
        try:
            yield
        finally:
            for m in layers:
                setattr(m, STEP_NORMS, None)

    @contextlib.contextmanager
    def reference_forwards(self):
        """The adapters' own reference forwards inside (tests compare the fast paths against them)."""
        route_adapters(self.model, on=False)
        try:
            yield
        finally:
            route_adapters(self.model, on=True)

    def execution_report(self, step: int) -> dict:
        """metrics.jsonl's execution line: how many layers ran compiled (measured) and why others ran eager."""
        paths = self.runner.paths
        eager = Counter(r for r in paths.values() if r != COMPILED)
        p = self.policy
        report = {"event": "execution", "step": step,
                  "layers": {"compiled": sum(r == COMPILED for r in paths.values()), "eager": sum(eager.values())},
                  "reasons": dict(eager),
                  "recompute": {"level": p.level, "checkpointing": self.checkpointing, "keep_attention": p.keep_attention,
                                "keep_down": p.keep_down, "keep_mlp": p.keep_mlp, "keep_weights": p.keep_weights,
                                "held_layers": p.held_layers}}
        from qtune.engine import compiled

        if compiled.KERNEL_NOTE is not None:  # check_half_kernels changed how this machine compiles
            report["kernels"] = compiled.KERNEL_NOTE
        failed = [r for r in eager if not r.startswith(CONFIGURED)]
        if failed and not self._warned:
            self._warned = True
            warnings.warn(f"{sum(eager[r] for r in failed)} of {len(paths)} decoder layers did not run compiled: "
                          f"{'; '.join(failed)}. Training continues eagerly (same results, slower).", stacklevel=2)
        return report


def _probe_in_backward(grad: torch.Tensor) -> None:
    probe()


def engine_of(model: nn.Module) -> Engine:
    engine = getattr(model, "qtune_engine", None)
    if engine is None:  # a model qtune did not build: its own forward, eagerly
        engine = Engine(model, attention="sdpa", checkpointing=False, compile_reason="compile off")
        model.qtune_engine = engine
    return engine


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, segment_ids: torch.Tensor, labels: torch.Tensor,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled tokens, their count) through the model's engine;
    segment_ids as Engine.hidden_states takes them (a 0/1 attention mask is one example per row)."""
    return engine_of(model).loss(input_ids, segment_ids, labels, chunk_tokens)


__all__ = ["Engine", "RecomputePolicy", "causal_lm_loss", "engine_of", "IGNORE_INDEX"]
