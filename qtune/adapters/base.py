"""The adapter interface: what every method provides, so that no caller probes modules with hasattr.

An adapter wraps one frozen base module (`base_layer`) of the model. Its `forward` is the method's
reference forward: the paper's equation in plain torch, which every fast path (qtune.engine) is
tested against. Export asks it for the merged tensors of its base; training may ask it for an extra
loss term and calls its hook after each optimizer step.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quant import QuantLinear


class Adapter(nn.Module):
    """Base class of the adapter methods (torchtune's AdapterModule, made explicit).

    Subclasses set `base_layer` (the frozen module they adapt) and define `forward` (the reference
    forward) and `delta_weight`. The defaults below fit an adapter of a linear's weight."""

    base_layer: nn.Module
    targets: ClassVar[tuple[type, ...]] = (nn.Linear, QuantLinear)
    """The module types the method adapts (attach_adapters matches --target-modules among them):
    linears here; a method that tunes norms or biases names those types."""
    target_kind: ClassVar[str] = "linear layer"
    scope: ClassVar[str] = "layers"
    """Where its targets are looked for: "layers" (inside the decoder layers) or "model" (also the final norm)."""
    checkpoint_buffers: ClassVar[tuple[str, ...]] = ()
    """Buffers that are training state (e.g. a rank mask, sensitivity averages): saved with the adapter's
    parameters in every checkpoint, so that a resumed run continues exactly."""

    @classmethod
    def select(cls, candidates: list[str], target_modules: list[str]) -> list[str]:
        """The candidates `--target-modules` selects (qtune.architectures.select_targets): every one for
        all-linear, else those whose last name part is listed. A method whose equation names its modules
        (IA3: k, v and the MLP's down projection) overrides what all-linear means."""
        from qtune.architectures import select_targets

        return select_targets(candidates, target_modules)

    @classmethod
    def layer_options(cls, model: nn.Module, name: str, options: dict) -> dict:
        """The constructor options of the adapter of module `name`: the run's method options, plus what this
        layer needs to know of the model (IA3: whether it scales outputs or inputs, and which rows of a fused
        qkv projection are k and v). Works on the meta skeleton too. The run's options by default."""
        return options

    @classmethod
    def trainable_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        """The element counts of the trainable tensors it would add to `module` (qtune.plan; works on the
        meta device). The default is LoRA's A (r, in) and B (out, r)."""
        return [rank * module.in_features, module.out_features * rank]

    @classmethod
    def saved_per_token(cls, module: nn.Module, rank: int, options: dict) -> int:
        """Elements per token its forward keeps for backward (in the compute dtype), for qtune.plan: LoRA's
        x·Aᵀ (rank) by default."""
        return rank

    @classmethod
    def state_sizes(cls, module: nn.Module, rank: int, options: dict) -> list[int]:
        """Element counts of the fp32 training-state buffers it keeps beside its parameters (AdaLoRA's moving
        averages), for qtune.plan. None by default."""
        return []

    @classmethod
    def check(cls, model: nn.Module, targets: list[str], rank: int, options: dict) -> None:
        """Refuse, with a QtuneError naming the problem, a model or targets this method cannot adapt (called at
        start, before any weight is read: `model` may be the meta skeleton). The default, for low-rank
        updates of linears: the rank fits every target."""
        from qtune.errors import QtuneError

        for name in targets:
            m = model.get_submodule(name)
            limit = min(m.in_features, m.out_features)
            if rank > limit:
                raise QtuneError(f"--rank {rank} is larger than layer {name} allows (at most {limit}). Pass a smaller --rank.")

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable tensors, by their names inside this module (what a checkpoint stores)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.") and p.requires_grad}

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W' − W₀ for the dequantized base weight W₀ (out, in) fp32: some methods' updates depend on W₀."""
        raise NotImplementedError

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W' = W₀ + ΔW, fp32 (out, in)."""
        return base_weight.float() + self.delta_weight(base_weight)

    def merge(self, base_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base module's tensors after merging ({"weight": W₀, "bias": b} -> the same keys, fp32).
        Methods that adapt a bias or a norm's weight override this."""
        out = dict(base_tensors)
        out["weight"] = self.merged_weight(base_tensors["weight"])
        return out

    # --- PEFT's format and the merged export's config (qtune.export) ---
    peft_type: ClassVar[str | None] = None
    """PEFT's name for the method ("LOHA", "LOKR", "IA3", ...), None where PEFT has no format for it."""

    @classmethod
    def peft_config(cls, cfg, target_leaves: list[str], layers: dict[str, "Adapter"]) -> dict:
        """adapter_config.json's method-specific keys (target_modules, r, alpha, ...)."""
        raise NotImplementedError

    def peft_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """This layer's tensors under PEFT's names; prefix is "base_model.model.<its name in the model>"."""
        raise NotImplementedError

    @classmethod
    def merged_config(cls, config: dict, layers: dict[str, "Adapter"]) -> None:
        """Edit the merged export's config.json in place where merging changes the architecture (BitFit's
        new biases set attention_bias / mlp_bias). Nothing by default."""

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the training loss (e.g. an orthogonality penalty), or None."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step (e.g. a rank budget or a phase switch); nothing by default."""

    # --- the whole method's hooks (all its layers at once: a global rank budget, a phase switch) ---
    @classmethod
    def start_training(cls, layers: dict[str, "Adapter"], total_steps: int, run_dir) -> None:
        """Called once before the first step of a run (fresh or resumed), after its checkpoint is loaded:
        the run's length (e.g. AdaLoRA's budget schedule) and folder (where a method writes its own files)."""

    @classmethod
    def after_step(cls, layers: dict[str, "Adapter"], step: int) -> None:
        """Called after every optimizer step with all the method's layers (step = steps done). By default,
        each layer's after_optimizer_step."""
        for layer in layers.values():
            layer.after_optimizer_step(step)

    @classmethod
    def report(cls, layers: dict[str, "Adapter"]) -> dict | None:
        """What the method reports in metrics.jsonl at each evaluation and at the end (e.g. AdaLoRA's per-layer
        ranks), or None."""
        return None

    def load_initial_factors(self, factors: dict[str, torch.Tensor]) -> None:
        """Copy an initialiser's factors, by their names in this layer (PiSSA/MiLoRA/LoftQ: lora_A, lora_B), in;
        then after_factors_loaded. A method with factors of its own (the spectral adapter's U₁, S₁, V₁)
        overrides it."""
        with torch.no_grad():
            self.lora_A.copy_(factors["lora_A"])
            self.lora_B.copy_(factors["lora_B"])
        self.after_factors_loaded()

    def after_factors_loaded(self) -> None:
        """Called after initial factors (PiSSA, MiLoRA, LoftQ) were copied into the adapter."""

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen base's weight (out, in) in fp32, dequantized if it is stored quantized."""
    return base.dequantized_weight(torch.float32) if isinstance(base, QuantLinear) else base.weight.detach().float()


def init_lora_factors(rank: int, in_features: int, out_features: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(A (r, in) Kaiming-uniform, B (out, r) zeros) in fp32, as PEFT and the LoRA reference code."""
    import math

    lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32))
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    return lora_A, nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32))
