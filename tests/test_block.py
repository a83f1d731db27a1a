"""qtune's own decoder block (qtune.engine.block) against transformers' own decoder layers and model, in
fp32: outputs and gradients (w.r.t. the input and every parameter) for each family it covers: Llama,
Mistral past its sliding window, Qwen2 with its q/k/v biases (and with full and sliding layers mixed),
Qwen3 with its QK-norm, Phi-3 (fused qkv and gate_up, a sliding window, a partial rotary embedding),
Gemma-2 (sandwich norms, soft-capped scores, sliding and full layers), Gemma-3 (QK-norm, local and
global layers with their two RoPE bases, (1 + w) norms, scaled embeddings). Layer by layer (the same additive mask given to both), the whole stack (masks
built by each side: causal, right padding, sliding windows), and a compiled QLoRA model of each family
(qtune's loss against the model's own transformers forward)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TOL, make_tokenizer
from qtune.engine import Engine
from qtune.engine.attention import attention_bias
from qtune.engine.block import activation, decoder_block, layer_windows, position_embeddings

FP32 = TOL[torch.float32]
KERNELS = ("eager", "sdpa")

# name -> (architecture, config overrides, sequence length). hidden 64, 4 heads, 2 KV heads: GQA.
CASES = {
    "llama": ("llama", {}, 16),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True), 16),  # o_proj and MLP biases too
    "mistral-window": ("mistral", dict(sliding_window=8), 24),                 # every layer sliding, t > window
    "qwen2": ("qwen2", {}, 16),                                                # q/k/v biases
    "qwen2-mixed": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                  num_hidden_layers=3), 24),                   # full, sliding, sliding
    "qwen3": ("qwen3", dict(head_dim=32), 16),                                 # QK-norm; head_dim ≠ hidden / heads
    "qwen3-mixed": ("qwen3", dict(head_dim=32, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                  num_hidden_layers=3), 24),
    "phi3": ("phi3", {}, 16),                                                  # fused qkv_proj and gate_up_proj
    "phi3-window": ("phi3", dict(sliding_window=8, partial_rotary_factor=0.5), 24),  # and half of each head rotated
    # sliding, full (Gemma-2's default alternation); scores soft-capped at 2 (they reach it); scale ≠ 1/√d
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0, sliding_window=8), 24),
    # QK-norm; sliding (local RoPE base 10⁴), full (global base 10⁶), sliding
    "gemma3": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, num_hidden_layers=3,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]), 24),
}


def rotation(model, x: torch.Tensor, i: int):
    """transformers' own (cos, sin) for layer i (Gemma-3's per layer type)."""
    position_ids = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    if model.config.model_type == "gemma3_text":
        return model.model.rotary_emb(x, position_ids, model.config.layer_types[i])
    return model.model.rotary_emb(x, position_ids)


def family_config(arch: str, vocab_size: int = 512, **overrides):
    """conftest.tiny_config's shape, with overrides given to the config's own constructor (Qwen2 and
    Qwen3 derive layer_types from use_sliding_window / sliding_window / max_window_layers there)."""
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(arch, **{**common, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that attention is far from uniform; every bias non-zero (Qwen2's q/k/v, Llama's
    with attention_bias) and every norm weight away from 1 (RMSNorms, Qwen3's q_norm / k_norm): a term
    that qtune dropped or misplaced changes the result."""
    g = torch.Generator().manual_seed(seed)
    offset = 0.0 if model.config.model_type.startswith("gemma") else 1.0  # Gemma's norms scale by (1 + w)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_(offset + 0.3 * noise)
        elif "embed_tokens" in name:  # hidden states of RMS ~1, as in a trained model: gradients of order 1
            p.copy_(noise)
        else:  # projections (gain ~0.8 at width 64) and biases
            p.copy_(0.1 * noise)


def family_model(case: str, seed: int = 0):
    arch, overrides, _ = CASES[case]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(arch, **overrides), dtype=torch.float32,
                                             attn_implementation="eager")
    randomize(model, seed)
    return model.train()


def right_padded_mask(b: int, t: int, pad: int = 5) -> torch.Tensor:
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - pad:] = 0
    return mask


def out_and_grads(fn, x: torch.Tensor | None, params: dict, weight: torch.Tensor):
    """fn(x) and the gradients of Σ fn(x)·weight w.r.t. x (when given) and each parameter (None where
    it got none)."""
    for p in params.values():
        p.grad = None
    if x is not None:
        x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out * weight).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
    return out.detach(), (x.grad if x is not None else None), grads


def assert_grads_close(got: dict, ref: dict, tol: dict) -> None:
    """Each gradient within tol, its absolute part scaled by the gradient's own size where that exceeds 1
    (sums in another order differ by ~1e-6 of the largest terms: Gemma's reach ~25)."""
    assert got.keys() == ref.keys()
    for name in ref:
        assert ref[name] is not None, f"transformers gave {name} no gradient"
        assert got[name] is not None, f"qtune's block gave {name} no gradient"
        scaled = dict(tol, atol=tol["atol"] * max(1.0, ref[name].abs().max().item()))
        torch.testing.assert_close(got[name], ref[name], **scaled, msg=lambda m: f"{name}: {m}")


def expected_windows(model) -> list[int | None]:
    """The sliding window transformers' own attention of each layer runs with (None: full causal)."""
    config = model.config
    out = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
        if getattr(config, "layer_types", None) is not None:  # and the config's own word for it
            assert (window is not None) == (config.layer_types[i] == "sliding_attention"), (i, config.layer_types)
        out.append(window)
    return out


@pytest.mark.parametrize("case", CASES)
def test_layer_windows_follow_transformers(case):
    model = family_model(case)
    windows = layer_windows(model.config)
    assert windows == expected_windows(model)
    if case.endswith("mixed"):  # a real mix: the first layer full, the others sliding
        assert windows == [None, 8, 8] and model.config.layer_types == ["full_attention"] + ["sliding_attention"] * 2
    if case == "mistral-window":
        assert windows == [8, 8]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_block_equals_transformers_layer(case, kernel):
    """Each layer: transformers' decoder layer (its eager attention, the additive 4-D mask) against
    decoder_block with the same mask, right padding in one row, the layer's window where it has one."""
    model = family_model(case)
    _, _, t = CASES[case]
    b, hidden = 2, model.config.hidden_size
    mask = right_padded_mask(b, t)
    windows = layer_windows(model.config)
    g = torch.Generator().manual_seed(1)
    for i, layer in enumerate(model.model.layers):
        x = torch.randn(b, t, hidden, generator=g)
        weight = torch.randn(b, t, hidden, generator=g)
        position_ids = torch.arange(t)[None].expand(b, -1)
        cos, sin = rotation(model, x, i)
        q_cos, q_sin = position_embeddings(model, x, position_ids)[i]
        assert torch.equal(q_cos, cos) and torch.equal(q_sin, sin)
        bias = attention_bias(mask, torch.float32, windows[i])
        params = dict(layer.named_parameters())

        ref, ref_dx, ref_grads = out_and_grads(
            lambda h: layer(h, attention_mask=bias, position_ids=position_ids, position_embeddings=(cos, sin)),
            x, params, weight)
        got, got_dx, got_grads = out_and_grads(
            lambda h: decoder_block(layer, h, cos, sin, bias, kernel, keep_attention=False, keep_down=False,
                                    act=activation(model.config)),
            x, params, weight)
        torch.testing.assert_close(got, ref, **FP32, msg=lambda m: f"layer {i} output: {m}")
        torch.testing.assert_close(got_dx, ref_dx, **FP32, msg=lambda m: f"layer {i} input gradient: {m}")
        assert_grads_close(got_grads, ref_grads, FP32)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_stack_equals_transformers_model(case, kernel):
    """Engine.hidden_states (qtune's masks, rotary, blocks and final norm) against transformers' own
    model.model (its own masks: causal, padding, sliding windows per layer type), right padding in one
    row: the real positions' hidden states and every parameter's gradient of a weighted sum over them."""
    model = family_model(case)
    _, _, t = CASES[case]
    b, hidden = 2, model.config.hidden_size
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (b, t), generator=g)
    mask = right_padded_mask(b, t)
    real = mask.bool()
    weight = torch.randn(b, t, hidden, generator=g) * mask[..., None]
    params = dict(model.model.named_parameters())
    engine = Engine(model, attention=kernel, checkpointing=False, compile_reason="compile off")
    assert engine.unsupported is None  # qtune's block runs, not transformers' forward

    ref, _, ref_grads = out_and_grads(
        lambda _: model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state,
        None, params, weight)
    got, _, got_grads = out_and_grads(lambda _: engine.hidden_states(ids, mask), None, params, weight)
    assert engine.execution_report(1)["layers"] == {"compiled": 0, "eager": len(model.model.layers)}
    torch.testing.assert_close(got[real], ref[real], **FP32)
    assert_grads_close(got_grads, ref_grads, FP32)

    if any(w is not None for w in layer_windows(model.config)):  # the window matters here: without it qtune differs
        window = model.config.sliding_window
        model.config.sliding_window = None
        try:
            with torch.no_grad():
                full = engine.hidden_states(ids, mask)
        finally:
            model.config.sliding_window = window
        assert (full[real] - ref[real]).abs().max() > 1e-2


# --- a compiled QLoRA model of each family ----------------------------------------------------------

COMPILED_CASES = {"llama": ("llama", {}), "mistral": ("mistral", dict(sliding_window=8)), "qwen2": ("qwen2", {}),
                  "qwen3": ("qwen3", dict(head_dim=32)),
                  "phi3": ("phi3", dict(sliding_window=8, partial_rotary_factor=0.5)),
                  # and the final logits soft-capped at a value tiny logits reach (the head's transform)
                  "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                            sliding_window=8, final_logit_softcapping=0.5)),
                  "gemma3": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                                 final_logit_softcapping=0.5,
                                                 layer_types=["sliding_attention", "full_attention"]))}


def write_family_model(folder, case: str, seed: int = 0):
    """A random checkpoint of the family (randomized as above: Qwen2's biases, Qwen3's q/k norms) and the
    offline tokenizer, as a Hugging Face folder."""
    arch, overrides = COMPILED_CASES[case]
    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(arch, vocab_size=len(tok) + 8, **overrides),
                                             dtype=torch.float32)
    randomize(model, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", COMPILED_CASES)
def test_compiled_block_equals_transformers_forward(case, tmp_path, compiled):
    """qtune's training build (QLoRA, NF4, fp32 compute, checkpointing): every layer one compiled graph,
    and causal_lm_loss's summed loss and adapter gradients equal the model's own transformers forward
    (the adapters' reference forwards, transformers' masks), right padding, 32 tokens (Mistral's, Phi-3's
    and Gemma's windows 8; Gemma's final soft-capping in qtune's chunked loss)."""
    from qtune.config import TrainConfig
    from qtune.engine import causal_lm_loss
    from qtune.model import build_model

    folder = write_family_model(tmp_path / "model", case)
    cfg = TrainConfig(model=str(folder), data="x", output=str(tmp_path / "r"), rank=4, seq_len=32, batch_size=2,
                      compute_dtype="float32")
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    torch.manual_seed(1)
    for m in model.modules():  # non-zero B so that every adapter term matters
        if hasattr(m, "lora_B"):
            m.lora_B.data.normal_(0, 0.1)
    model.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=g)
    mask = right_padded_mask(2, 32, pad=6)
    labels = torch.where(mask.bool(), ids, -100)
    n_labels = int((labels[:, 1:] != -100).sum())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)

    def run(loss_fn):
        for p in params.values():
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params.items()}

    def qtune_loss():
        loss, n = causal_lm_loss(model, ids, mask, labels)
        assert n == n_labels
        return loss

    loss_q, grads_q = run(qtune_loss)
    engine = model.qtune_engine
    assert engine.unsupported is None
    layers = len(model.model.layers)
    assert engine.execution_report(1)["layers"] == {"compiled": layers, "eager": 0}, engine.runner.paths
    with engine.reference_forwards():  # the adapters' own forwards, backward's recomputation included
        loss_t, grads_t = run(lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss * n_labels)
    torch.testing.assert_close(loss_q, loss_t, **FP32)
    assert_grads_close(grads_q, grads_t, FP32)
