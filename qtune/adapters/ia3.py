"""(IA)³ on a frozen (quantized) base: learned vectors that rescale activations.

    k′ = l_k ⊙ k,   v′ = l_v ⊙ v,   h′ = l_ff ⊙ (act(W_gate·x) ⊙ W_up·x)
                                                             (IA³, arXiv 2205.05638, T-Few §3.3)

k = x·W_kᵀ + b_k and v = x·W_vᵀ + b_v are the outputs of k_proj and v_proj, so their vectors scale the
outputs, bias included (y = l ⊙ (x·Wᵀ + b)); h is the input of down_proj, so l_ff scales that input
(y = (l_ff ⊙ h)·W_downᵀ + b: the bias unscaled). Every vector starts at ones: the layer equals the base.
Phi-3's fused qkv_proj ([q; k; v] rows) has its k and v rows scaled and trained, its q rows not.

Merged: l_k, l_v scale the rows of W_k, W_v and their biases; l_ff scales the columns of W_down. PEFT's
IA3 is the same (its non-feedforward layers scale the bias too, in forward and merge); its vectors are
`ia3_l` of shape (out, 1), or (1, in) for its `feedforward_modules`.
"""

from __future__ import annotations

import torch
from torch import nn

from qtune.adapters.base import Adapter
from qtune.errors import QtuneError

KEY_VALUE = ("k_proj", "v_proj", "qkv_proj")    # l_k, l_v: the attention's keys and values (Phi-3: fused q, k, v)
FEEDFORWARD = ("down_proj", "fc2", "dense_4h_to_h", "w2")  # l_ff: the MLP's output projection, whose input is h
FUSED_QKV = "qkv_proj"


class IA3Linear(Adapter):
    """The frozen base linear (QuantLinear or nn.Linear) with its output (or its input) rescaled by `ia3_l`."""

    peft_type = "IA3"

    def __init__(self, base_layer: nn.Module, rank: int = 0, scale: float = 1.0, dropout: float = 0.0,
                 feedforward: bool = False, rows: tuple[int, int] | None = None):
        """feedforward: scale the input (l_ff) instead of the output. rows: (start, end), the output rows that
        are scaled (a fused projection's k and v); None: all. `rank`, `scale` and `dropout` are not used."""
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.rows = None if feedforward or rows is None else (int(rows[0]), int(rows[1]))
        self.ia3_l = nn.Parameter(torch.ones(self.vector_size(base_layer, feedforward, self.rows)))

    @staticmethod
    def vector_size(module: nn.Module, feedforward: bool, rows: tuple[int, int] | None) -> int:
        if feedforward:
            return module.in_features
        return module.out_features if rows is None else rows[1] - rows[0]

    def vector(self) -> torch.Tensor:
        """The scaling vector over all the output features (or input features), fp32: ones on unscaled rows."""
        if self.rows is None:
            return self.ia3_l
        start, end = self.rows
        out = self.base_layer.out_features
        ones = self.ia3_l.new_ones
        return torch.cat([ones(start), self.ia3_l, ones(out - end)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l = self.vector().to(x.dtype)
        if self.feedforward:
            return self.base_layer(x * l)   # h′ = l_ff ⊙ h, then h′·W_downᵀ + b
        return self.base_layer(x) * l       # k′ = l_k ⊙ (x·W_kᵀ + b_k)

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W' = diag(l)·W (rows) or W·diag(l_ff) (columns), fp32 (out, in)."""
        l = self.vector().detach().float()
        return base_weight.float() * (l[None, :] if self.feedforward else l[:, None])

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W' − W (depends on W: the vector rescales it)."""
        return self.merged_weight(base_weight) - base_weight.float()

    def merge(self, base_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(base_tensors)
        out["weight"] = self.merged_weight(base_tensors["weight"])
        if "bias" in out and not self.feedforward:  # k′ = l_k ⊙ (x·W_kᵀ + b_k): the bias is scaled too
            out["bias"] = self.vector().detach().float() * out["bias"].float()
        return out

    # --- which layers, and their roles -------------------------------------------------------------

    @classmethod
    def select(cls, candidates: list[str], target_modules: list[str]) -> list[str]:
        """all-linear means the projections the equation names: k, v (Phi-3's fused qkv_proj) and the MLP's
        down projection. An explicit --target-modules list is honoured as it is."""
        from qtune.architectures import ALL_LINEAR, select_targets

        if ALL_LINEAR not in target_modules:
            return select_targets(candidates, target_modules)
        leaves = {n.rpartition(".")[2] for n in candidates}
        missing = [what for what, names in (("keys and values", KEY_VALUE), ("the MLP's output", FEEDFORWARD))
                   if not leaves & set(names)]
        if missing:
            raise QtuneError(f"IA3 scales the attention's keys and values ({', '.join(KEY_VALUE)}) and the input of "
                             f"the MLP's output projection ({', '.join(FEEDFORWARD)}); this model has no linear for "
                             f"{' or '.join(missing)} (its linears: {', '.join(sorted(leaves))}). Name the linears to "
                             "scale with --target-modules, or use --method qlora.")
        return [n for n in candidates if n.rpartition(".")[2] in KEY_VALUE + FEEDFORWARD]

    @classmethod
    def layer_options(cls, model: nn.Module, name: str, options: dict) -> dict:
        """feedforward for the MLP's output projection (its input is scaled); for Phi-3's qkv_proj the rows of
        k and v (after the q rows), read from the config."""
        leaf = name.rpartition(".")[2]
        if leaf in FEEDFORWARD:
            return {**options, "feedforward": True}
        if leaf == FUSED_QKV:
            q, kv = fused_qkv_widths(model.config)
            return {**options, "feedforward": False, "rows": (q, q + 2 * kv)}
        return {**options, "feedforward": False}

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        return [cls.vector_size(module, options.get("feedforward", False), options.get("rows"))]

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """A fused qkv_proj must be exactly [q; k; v] as the config sizes them (else its k and v rows are unknown)."""
        for name in targets:
            if name.rpartition(".")[2] != FUSED_QKV:
                continue
            q, kv = fused_qkv_widths(model.config)
            out = model.get_submodule(name).out_features
            if out != q + 2 * kv:
                raise QtuneError(f"IA3 scales the k and v rows of {name}, but its {out} output features are not "
                                 f"[q; k; v] = {q} + 2·{kv} as {model.config.model_type!r}'s config sizes them. "
                                 "Target other linears with --target-modules, or use --method qlora.")

    # --- PEFT's IA3 format -----------------------------------------------------------------------------

    @classmethod
    def peft_config(cls, cfg, target_leaves: list[str], layers: dict[str, Adapter]) -> dict:
        feedforward = sorted({n.rpartition(".")[2] for n, m in layers.items() if m.feedforward})
        return {"target_modules": target_leaves, "feedforward_modules": feedforward, "fan_in_fan_out": False,
                "init_ia3_weights": True, "modules_to_save": None}

    def peft_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """ia3_l (out, 1), or (1, in) for a feedforward layer; a fused qkv's full width, ones on the q rows."""
        l = self.vector().detach().float()
        return {f"{prefix}.ia3_l": (l[None, :] if self.feedforward else l[:, None]).contiguous()}


def fused_qkv_widths(config) -> tuple[int, int]:
    """(q rows, k rows = v rows) of a fused [q; k; v] projection, from the config."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim, kv_heads * head_dim
