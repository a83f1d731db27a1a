"""Adapter methods. The method is chosen here, in one mapping from name to implementation."""

from __future__ import annotations

import torch
from torch import nn

from qtune.adapters.base import Adapter
from qtune.adapters.dora import DoRALinear
from qtune.adapters.lora import LoRALinear
from qtune.adapters.rosa import RoSALinear
from qtune.architectures import linear_names
from qtune.errors import QtuneError

# method name -> the layer that wraps a frozen base module (qpissa is LoRA with --init pissa); the second
# wave's files are imported when their method is used ("module:Class")
ADAPTER_LAYERS: dict[str, type[Adapter] | str] = {
    "qlora": LoRALinear,
    "qpissa": LoRALinear,
    "qdora": DoRALinear,
    "qrosa": RoSALinear,  # its sparse support is chosen before training (qtune.adapters.rosa_mask)
    "loha": "qtune.adapters.loha:LoHaLinear",
    "lokr": "qtune.adapters.lokr:LoKrLinear",
    "ia3": "qtune.adapters.ia3:IA3Linear",
    "lntuning": "qtune.adapters.lntuning:LNTuning",
    "bitfit": "qtune.adapters.bitfit:BitFitLinear",
    "bone": "qtune.adapters.bone:BoneLinear",
    "bat": "qtune.adapters.bone:BatLinear",
    "adalora": "qtune.adapters.adalora:AdaLoRALinear",
    "loradash": "qtune.adapters.loradash:LoRADashLinear",
    "spectral": "qtune.adapters.spectral:SpectralLinear",
}


def layer_options(method: str, cfg) -> dict:
    """Method-specific constructor options of the adapter layer, from the run configuration. An option not given
    is left out, so that the method's own default (in its file) applies."""

    def given(**options) -> dict:
        return {k: v for k, v in options.items() if v is not None}

    return {"qdora": {"detach_norm": cfg.dora_detach_norm},
            "lokr": given(factor=cfg.lokr_factor),
            "adalora": {"rank_init": cfg.rank_init, "budget_start": cfg.budget_start, "budget_end": cfg.budget_end,
                        "rslora": cfg.rslora},
            "loradash": given(steps=cfg.dash_steps, directions=cfg.dash_directions),
            "spectral": given(variant=cfg.spectral_variant)}.get(method, {})


def adapter_layer_for(method: str) -> type[Adapter]:
    import importlib

    try:
        layer = ADAPTER_LAYERS[method]
    except KeyError:
        raise QtuneError(f"Method {method!r} is not available in this version of qtune. "
                         f"Use one of: {', '.join(sorted(ADAPTER_LAYERS))}.") from None
    if isinstance(layer, str):  # a second-wave method's file, imported on first use
        module, _, name = layer.partition(":")
        layer = ADAPTER_LAYERS[method] = getattr(importlib.import_module(module), name)
    return layer


def attach_adapters(model: nn.Module, method: str, target_modules: list[str], rank: int, scale: float,
                    dropout: float = 0.0, seed: int = 0, options: dict | None = None) -> list[str]:
    """Freeze the model and wrap every target linear in the method's adapter layer.

    Returns the wrapped module names. Adapters are initialised from `seed` (same seed, same A).
    """
    layer_cls = adapter_layer_for(method)
    model.requires_grad_(False)
    candidates = target_candidates(model, layer_cls)
    targets = [(n, model.get_submodule(n)) for n in layer_cls.select(candidates, target_modules)]
    if not targets:
        names = sorted({n.rpartition(".")[2] for n in candidates})
        raise QtuneError(f"No {layer_cls.target_kind} matches --target-modules {','.join(target_modules)}. "
                         f"This model's {layer_cls.target_kind}s are: {', '.join(names)}.")
    layer_cls.check(model, [n for n, _ in targets], rank, options or {})
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name, base in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            opts = layer_cls.layer_options(model, name, options or {})
            setattr(parent, child, layer_cls(base, rank=rank, scale=scale, dropout=dropout, **opts))
    finally:
        torch.random.set_rng_state(gen_state)
    return [n for n, _ in targets]


def target_candidates(model: nn.Module, layer_cls: type[Adapter]) -> list[str]:
    """The modules the method may adapt: its target types inside the decoder layers (lm_head and the embeddings
    stay out), and for methods of scope "model" (norm tuning) outside them too (the final norm)."""
    names = linear_names(model, layer_cls.targets)
    if layer_cls.scope == "model":
        inside = set(names)
        names += [n for n, m in model.named_modules() if isinstance(m, layer_cls.targets) and n not in inside
                  and not n.endswith("lm_head") and "embed" not in n.rpartition(".")[2]]
    return names


def adapter_layers(model: nn.Module) -> dict[str, Adapter]:
    """name -> adapter layer, for every adapter in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapter)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors and the adapters' training-state buffers (what a checkpoint stores), by their
    names in the model."""
    out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name, layer in adapter_layers(model).items():
        for b in layer.checkpoint_buffers:
            out[f"{name}.{b}"] = getattr(layer, b).detach()
    return out


@torch.no_grad()
def set_initial_factors(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Load an initialiser's factors ("<layer>.<tensor>": PiSSA/MiLoRA/LoftQ's lora_A, lora_B; the spectral
    adapter's spectral_U/S/V) into the adapters (Adapter.load_initial_factors); DoRA's magnitude is then
    re-fitted so that the layer starts at exactly W_res + s·BA."""
    for name, layer in adapter_layers(model).items():
        prefix = name + "."
        layer.load_initial_factors({k[len(prefix):]: v for k, v in factors.items()
                                    if k.startswith(prefix) and "." not in k[len(prefix):]})


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], copy=None) -> None:
    """The checkpoint's adapter tensors into the model, checked against its names and shapes. copy(param, tensor)
    puts one in place (default param.copy_(tensor); qtune.fsdp copies a whole tensor's shard into a sharded one);
    tensors are visited in sorted order (so that every rank of a sharded model visits them alike)."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    for name, layer in adapter_layers(model).items():  # training-state buffers load in place like parameters
        for b in layer.checkpoint_buffers:
            params[f"{name}.{b}"] = getattr(layer, b)
            expected.add(f"{name}.{b}")
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise QtuneError(f"The adapter checkpoint does not fit this model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}). Use the model and method the run was trained with.")
    with torch.no_grad():
        for n in sorted(tensors):
            t = tensors[n]
            if params[n].shape != t.shape:
                raise QtuneError(f"Adapter tensor {n} has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(params[n].shape)}. Use the rank and model the run was trained with.")
            if copy is None:
                params[n].copy_(t)
            else:
                copy(params[n], t)
