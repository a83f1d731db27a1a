"""Which models qtune trains, and how it finds their parts.

Any decoder-only `AutoModelForCausalLM` whose projections are `nn.Linear` is trained: by qtune's own
decoder block for the families in qtune.engine.block.FAMILIES, by transformers' own forward for the
rest (the "generic" path). What cannot work is refused here, by name, before any weight is read:
encoder and encoder-decoder models, vision-language checkpoints, GPT-2-style Conv1D projections,
mixture-of-experts layers whose experts are one 3-D parameter.

The loss is the model's own: qtune's chunked loss bypasses `model.forward`, so the transforms a causal
LM applies to its logits after the head are read from its config (HEAD_TRANSFORMS) and applied on
every path, and the generic path checks at start that qtune's logits are the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtune.errors import QtuneError

ALL_LINEAR = "all-linear"  # --target-modules' default: every linear inside the decoder layers


def check_config(config, where: str = "") -> None:
    """Refuse, by name, a config that is not a text-only decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = config.model_type
    at = f" in {where}" if where else ""
    if getattr(config, "vision_config", None) is not None or getattr(config, "audio_config", None) is not None:
        text = getattr(config, "text_config", None)
        hint = f" Use its text-only model (model_type {text.model_type!r})." if text is not None else ""
        raise QtuneError(f"{kind!r}{at} is a vision-language (multimodal) checkpoint; qtune trains text-only causal "
                         f"language models.{hint}")
    if getattr(config, "is_encoder_decoder", False):
        raise QtuneError(f"{kind!r}{at} is an encoder-decoder model; qtune trains decoder-only causal language models "
                         "(Llama, Mistral, Qwen, Gemma, Phi-3, OLMo, Granite, StableLM, ...).")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise QtuneError(f"{kind!r}{at} is an encoder-only (masked language) model; qtune trains decoder-only causal "
                         "language models (Llama, Mistral, Qwen, Gemma, Phi-3, OLMo, Granite, StableLM, ...).")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None):
        raise QtuneError(f"{kind!r}{at} has no causal-LM class in transformers (AutoModelForCausalLM); qtune trains "
                         "decoder-only causal language models.")


def check_modules(model: nn.Module) -> None:
    """Refuse, by name, a model whose decoder projections qtune cannot quantize and adapt (call on the meta
    skeleton: no weight is needed)."""
    kind = model.config.model_type
    layers = decoder_layers(model)
    conv = next(((n, m) for n, m in layers.named_modules() if type(m).__name__ == "Conv1D"), None)
    if conv is not None:
        raise QtuneError(f"{kind!r}'s projections are transformers' Conv1D ({conv[0]}, GPT-2 style: the weight stored "
                         "transposed); qtune quantizes and adapts nn.Linear projections. Use a model with nn.Linear "
                         "layers (Llama, Mistral, Qwen, Gemma, Phi-3, OLMo, Granite, StableLM, ...).")
    fused = next(((n, p) for n, p in layers.named_parameters() if p.ndim == 3), None)
    if fused is not None:
        owner = layers.get_submodule(fused[0].rpartition(".")[0])
        raise QtuneError(f"{kind!r} is a mixture-of-experts model whose experts are one 3-D parameter "
                         f"({type(owner).__name__}.{fused[0].rpartition('.')[2]}, {tuple(fused[1].shape)}); qtune "
                         "quantizes and adapts nn.Linear projections only. Use a dense model.")
    if not any(isinstance(m, nn.Linear) for m in layers.modules()):
        types = sorted({type(m).__name__ for m in layers.modules() if not list(m.children())})
        raise QtuneError(f"{kind!r}'s decoder layers have no nn.Linear projection (their layers: {', '.join(types)}); "
                         "qtune quantizes and adapts nn.Linear projections.")


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (transformers' base model: embeddings, layers, final norm)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else None
    return inner if isinstance(inner, nn.Module) else model.base_model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the ModuleList of the decoder with one entry per hidden layer."""
    inner = decoder(model)
    n = model.config.get_text_config().num_hidden_layers
    for _, m in inner.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise QtuneError(f"Cannot find the {n} decoder layers of {model.config.model_type!r} (no ModuleList of that length "
                     "in its base model); qtune trains decoder-only causal language models.")


def linear_names(model: nn.Module, kinds: tuple[type, ...] | None = None) -> list[str]:
    """Full names of the linears (or `kinds`) inside the decoder layers: what qtune quantizes and adapts.
    lm_head and the embeddings are outside."""
    from quant import QuantLinear

    kinds = kinds or (nn.Linear, QuantLinear)
    if getattr(model, "config", None) is None:  # not a transformers model (a test's module): all but lm_head
        return [n for n, m in model.named_modules() if isinstance(m, kinds) and not n.endswith("lm_head")]
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return [f"{prefix}.{n}" for n, m in layers.named_modules() if n and isinstance(m, kinds)]


def is_target(name: str, target_modules: list[str]) -> bool:
    """Whether `--target-modules` selects this module (of those inside the decoder layers): all of them
    for all-linear, else those whose last name part is listed."""
    return ALL_LINEAR in target_modules or name.rpartition(".")[2] in target_modules


def select_targets(names: list[str], target_modules: list[str]) -> list[str]:
    return [n for n in names if is_target(n, target_modules)]


# --- the head: the model's own transforms of the logits ----------------------------------------

@dataclass(frozen=True)
class Head:
    """logits = softcap · tanh((scale · h·Wᵀ) / softcap), or scale · h·Wᵀ without soft-capping."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# config attribute -> how it enters the logits (transformers' *ForCausalLM.forward)
HEAD_TRANSFORMS = {
    "logits_scaling": lambda v: Head(scale=1.0 / v),     # Granite: logits / logits_scaling
    "logit_scale": lambda v: Head(scale=float(v)),         # Cohere: logits * logit_scale
    "final_logit_softcapping": lambda v: Head(softcap=float(v)),  # Gemma-2, Gemma-3
}


def head_of(config) -> Head:
    scale, softcap = 1.0, None
    for key, make in HEAD_TRANSFORMS.items():
        value = getattr(config, key, None)
        if value is None or (key != "final_logit_softcapping" and float(value) == 1.0):
            continue
        h = make(value)
        scale, softcap = scale * h.scale, h.softcap if h.softcap is not None else softcap
    return Head(scale, softcap)


@torch.no_grad()
def _probe(model: nn.Module, ours, theirs) -> tuple[float, float]:
    """(max |ours() − theirs()| / max |theirs()|, the tolerance of the model's dtype) in eval mode on a probe."""
    was = model.training
    model.eval()
    try:
        a, b = ours().float(), theirs().float()
    finally:
        model.train(was)
    tol = 1e-4 if model.get_output_embeddings().weight.dtype == torch.float32 else 3e-2
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6), tol


def _probe_ids(model: nn.Module, n: int) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.arange(1, min(n + 1, vocab), device=model.get_output_embeddings().weight.device)[None]


def check_head(model: nn.Module, engine) -> None:
    """At start, on the generic path: qtune's logits (decoder + head + Head transforms) equal the model's own
    `forward` on a few tokens; a transform qtune does not know would make its loss not the model's."""
    ids = _probe_ids(model, 8)
    err, tol = _probe(model, lambda: engine.logits(ids, torch.ones_like(ids)), lambda: model(input_ids=ids).logits)
    if not err <= tol:
        raise QtuneError(f"qtune's loss would not be {model.config.model_type!r}'s own: its logits differ from the "
                         f"model's forward by {err:.2%} (relative) on a probe, so its head applies a transform qtune "
                         "does not know. This architecture is not supported yet; please report it.")


def check_packing(model: nn.Module, engine) -> None:
    """At start, on the generic path under --packing per-example: the model honours transformers' packed
    format (qtune.engine: no 2-D mask, position ids restarting per example), i.e. the second of two packed
    examples gets the logits it has alone. A model whose forward builds its own mask would attend across
    them; it is refused by name rather than trained on context it will never see."""
    ids = _probe_ids(model, 12)
    half = ids.shape[1] // 2
    segments = torch.ones_like(ids)
    segments[:, half:] = 2
    second = ids[:, half:]
    err, tol = _probe(model, lambda: engine.logits(ids, segments)[:, half:],
                      lambda: engine.logits(second, torch.ones_like(second)))
    if not err <= tol:
        raise QtuneError(f"{model.config.model_type!r} does not keep packed examples apart: on a probe, an example "
                         f"packed after another gets logits {err:.2%} (relative) off its own, so its forward ignores "
                         "transformers' packed-sequence format. Pass --packing none (one example per row), and "
                         "please report it.")
