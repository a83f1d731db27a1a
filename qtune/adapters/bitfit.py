"""BitFit on a frozen (quantized) base: only the biases are trained.

    y = x·D(Q(W))ᵀ + b′      b′ trainable, starting at the base's bias b₀ (zeros where it had none)
                                                                             (BitFit, arXiv 2106.10199)

The base keeps its frozen b₀ and computes x·Wᵀ + b₀; the adapter adds b′ − b₀ (exactly 0 at step 0), so
the trainable tensor is the bias itself (weight decay pulls b′, not a delta, towards 0) and the merged
export writes b′ under the base linear's name.

A bias-free linear gets a new (zero) bias only where the architecture's config can carry one, so that the
merged model loads in plain transformers: BIAS_FLAGS names the flag (Llama: attention_bias for q, k, v, o;
mlp_bias for gate, up, down), and the export sets it. Qwen2's q/k/v have biases and its other linears
cannot get one: with all-linear only q/k/v train (the others are wrapped with nothing to train: `select`
sees names, not the model). Mistral and Phi-3 have neither: refused at start. PEFT has no BitFit format
(export it merged).
"""

from __future__ import annotations

import torch
from torch import nn

from qtune.adapters.base import Adapter
from qtune.errors import QtuneError

_ATTENTION = {leaf: "attention_bias" for leaf in ("q_proj", "k_proj", "v_proj", "o_proj")}
_MLP = {leaf: "mlp_bias" for leaf in ("gate_proj", "up_proj", "down_proj")}
# model_type -> {linear's last name part -> the config flag that gives it a bias} (read from transformers' modeling
# files); a linear that has a bias already trains it on any architecture
BIAS_FLAGS: dict[str, dict[str, str]] = {
    "llama": {**_ATTENTION, **_MLP},
    "granite": {**_ATTENTION, **_MLP},
    "qwen3": _ATTENTION, "gemma": _ATTENTION, "gemma2": _ATTENTION, "gemma3_text": _ATTENTION,
    "olmo": _ATTENTION, "olmo2": _ATTENTION, "cohere": _ATTENTION,
    "stablelm": {leaf: "use_qkv_bias" for leaf in ("q_proj", "k_proj", "v_proj")},
}

TRAINED, ADDED, NO_BIAS = "trained", "added", "none"
"""A target's bias: the base's own, trained; a new one (via its config flag); none possible (left as it is)."""


class BitFitLinear(Adapter):
    """The frozen base linear (QuantLinear or nn.Linear) with a trainable bias."""

    def __init__(self, base_layer: nn.Module, rank: int = 0, scale: float = 1.0, dropout: float = 0.0,
                 bias: str | None = None, config_flag: str | None = None):
        """bias: TRAINED, ADDED or NO_BIAS (layer_options decides; by default TRAINED if the base has a bias, else
        ADDED); config_flag: the config flag an ADDED bias sets in the merged export. `rank`, `scale`, `dropout`
        are not used."""
        super().__init__()
        self.base_layer = base_layer
        self.kind = bias or (TRAINED if base_layer.bias is not None else ADDED)
        self.config_flag = config_flag
        if self.kind == TRAINED:
            self.bias = nn.Parameter(base_layer.bias.detach().float().clone())
        elif self.kind == ADDED:
            self.bias = nn.Parameter(torch.zeros(base_layer.out_features, dtype=torch.float32))
        else:
            self.bias = None

    def bias_change(self) -> torch.Tensor | None:
        """b′ − b₀ (out,) fp32, what the adapter adds to the base's output; None for a NO_BIAS layer."""
        if self.bias is None:
            return None
        b0 = self.base_layer.bias
        return self.bias if b0 is None else self.bias - b0.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        change = self.bias_change()
        y = self.base_layer(x)             # x·Wᵀ + b₀
        return y if change is None else y + change.to(y.dtype)  # x·Wᵀ + b′

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW = 0: BitFit changes no weight."""
        return torch.zeros_like(base_weight, dtype=torch.float32)

    def merge(self, base_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.float() for k, v in base_tensors.items()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().float()
        return out

    # --- which layers can have a bias --------------------------------------------------------------------

    @classmethod
    def layer_options(cls, model: nn.Module, name: str, options: dict) -> dict:
        kind, flag = bias_kind(model, name)
        return {**options, "bias": kind, "config_flag": flag}

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        kind = options.get("bias") or (TRAINED if module.bias is not None else ADDED)
        return [] if kind == NO_BIAS else [module.out_features]

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """Refuse a model none of whose targets can have a bias (Mistral, Phi-3), targets named explicitly that
        cannot, and a config flag's group of linears targeted in part (the flag gives all of them a bias)."""
        from qtune.adapters import target_candidates

        kind_of = {n: bias_kind(model, n) for n in targets}
        arch = model.config.model_type
        if all(k == NO_BIAS for k, _ in kind_of.values()):
            raise QtuneError(f"BitFit trains the linears' biases, and {arch!r}'s targeted linears have none; its config "
                             "has no flag (attention_bias, mlp_bias) under which the merged model could carry new ones. "
                             "Use --method qlora (or ia3, lntuning) for this model.")
        candidates = target_candidates(model, cls)
        frozen = sorted({n.rpartition(".")[2] for n, (k, _) in kind_of.items() if k == NO_BIAS})
        if frozen and set(targets) != set(candidates):  # all-linear: the linears that cannot have a bias stay as they are
            raise QtuneError(f"BitFit cannot give {', '.join(frozen)} a bias: {arch!r}'s config has no flag for one, so "
                             "the merged model could not load it. Drop them from --target-modules.")
        for flag in sorted({f for _, f in kind_of.values() if f is not None}):
            group = [n for n in candidates if bias_kind(model, n)[1] == flag]  # every linear the flag gives a bias
            if not set(group) <= set(targets):
                leaves = sorted({n.rpartition(".")[2] for n in group})
                raise QtuneError(f"BitFit adds biases by setting {flag} in {arch!r}'s config, which gives "
                                 f"{', '.join(leaves)} a bias in every layer: target all of them "
                                 f"(--target-modules {','.join(leaves)}, or all-linear).")

    # --- export ----------------------------------------------------------------------------------------------

    @classmethod
    def merged_config(cls, config: dict, layers: dict[str, Adapter]) -> None:
        """The flags of the added biases (attention_bias, mlp_bias), so that transformers builds the biases."""
        for layer in layers.values():
            if layer.kind == ADDED and layer.config_flag is not None:
                config[layer.config_flag] = True


def bias_kind(model: nn.Module, name: str) -> tuple[str, str | None]:
    """(TRAINED | ADDED | NO_BIAS, the config flag of an ADDED bias) for linear `name` of `model`."""
    if model.get_submodule(name).bias is not None:
        return TRAINED, None
    flag = BIAS_FLAGS.get(model.config.model_type, {}).get(name.rpartition(".")[2])
    return (ADDED, flag) if flag is not None else (NO_BIAS, None)
