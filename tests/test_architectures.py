"""Every architecture qtune trains, end to end, on tiny random models with each family's own knobs.

Ten families, each a 2-layer model built from `AutoConfig.for_model` with its non-default settings
(Gemma's soft-capping, sliding windows shorter than the sequence and query_pre_attn_scalar ≠ head_dim,
Granite's four multipliers, Phi-3's fused projections with a partial rotary embedding, Qwen3's wide
heads, StableLM's LayerNorm and partial rotary, a tied Llama head), saved as Hugging Face folders:
- the step-0 loss equals transformers' own loss on the dequantized weights (fp32), on qtune's own
  block for the families it runs ("fused") and on transformers' forward for the others ("generic");
  a head transform (soft-capping, logits scaling) changes that loss, so it is really applied;
- QLoRA and QDoRA lower the loss on a repeated batch;
- a short trained run: its merged fp16 export, loaded by plain transformers, gives the adapter model's
  logits; its PEFT-format adapter on transformers' bitsandbytes 4-bit base gives them too; its memory
  plan is within ±10% of the metered peak (16 MiB when the peak is under 160 MiB).
And what qtune refuses, by name and before reading a weight (Conv1D, 3-D experts, encoder-only,
encoder-decoder, vision-language) from Python and the CLI; --target-modules narrows by name on Phi-3.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import SENTENCES, make_tokenizer
from qtune.adapters import adapter_layers
from qtune.architectures import Head
from qtune.cli import main
from qtune.config import TrainConfig, load_run_yaml
from qtune.engine import engine_of
from qtune.errors import QtuneError
from qtune.export import export_merged, export_peft, load_run
from qtune.model import build_model
from qtune.plan import plan_memory
from qtune.train import make_optimizer, read_metrics, train, train_step
from quant import QuantLinear

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              # weights 5x the 0.02 default: the frozen head's logits reach |z| ~ 3 (not ~0.7), so a logit
              # transform changes the loss, and a few adapter steps can lower it clearly
              initializer_range=0.1)
# each family's knobs that differ from the defaults qtune would get right by accident
KNOBS = {
    "llama": dict(tie_word_embeddings=True),  # a tied head: the export writes no lm_head
    "mistral": dict(sliding_window=8),
    "qwen2": dict(),  # q/k/v biases
    "qwen3": dict(head_dim=32),  # heads wider than hidden / heads; QK-norm
    "gemma2": dict(final_logit_softcapping=2.0, attn_logit_softcapping=2.0, sliding_window=8, head_dim=16,
                   query_pre_attn_scalar=24),
    "gemma3_text": dict(final_logit_softcapping=2.0, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        head_dim=16, query_pre_attn_scalar=24),
    "phi3": dict(sliding_window=8, partial_rotary_factor=0.5),  # fused qkv_proj and gate_up_proj
    "olmo2": dict(),
    "granite": dict(logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2),
    "stablelm": dict(),  # partial rotary (0.25), LayerNorm
}
ARCHS = list(KNOBS)
FUSED = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"}  # qtune's own decoder block
HEAD_TRANSFORMED = {"gemma2", "gemma3_text", "granite"}  # a logit transform after lm_head
SEQ = 24  # longer than the sliding windows (8)
FP16_TOL = 2e-3  # relative to the logits' scale: rounding each merged weight to fp16 (2^-11), as tests/test_export.py


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one thread is fastest (conftest.one_thread)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(arch) -> the folder of a tiny random model of that family (safetensors + tokenizer), made once."""
    made = {}

    def make(arch: str) -> Path:
        if arch not in made:
            tok = make_tokenizer()
            config = AutoConfig.for_model(arch, **COMMON, vocab_size=len(tok) + 8, **KNOBS[arch])
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            folder = tmp_path_factory.mktemp(f"arch-{arch}")
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            made[arch] = folder
        return made[arch]

    return make


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch-data") / "corpus.txt"
    path.write_text("\n".join(SENTENCES * 40))
    return path


def batch(pad_row: bool = True) -> dict:
    """Two rows of SEQ text tokens; the second right-padded by 5 (labels -100 there)."""
    tok = make_tokenizer()
    tokens = tok(" ".join(SENTENCES))["input_ids"]
    ids = torch.tensor([tokens[:SEQ], tokens[SEQ:2 * SEQ]])
    mask = torch.ones_like(ids)
    if pad_row:
        mask[1, -5:] = 0
        ids[1, -5:] = tok.pad_token_id
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "segment_ids": mask, "labels": labels}


def run_config(folder, **kw) -> TrainConfig:
    base = dict(model=str(folder), method="qlora", bits=4, compute_dtype="float32", rank=4, alpha=8, seq_len=SEQ,
                batch_size=2)
    base.update(kw)
    return TrainConfig(**base)


def dequantized_reference(model, folder):
    """transformers' own model from the folder, fp32, each quantized linear's weight replaced by qtune's
    dequantized one (the adapter wraps its base as .base_layer)."""
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    state = {n.removesuffix(".base_layer") + ".weight": m.dequantized_weight(torch.float32)
             for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(state) == len(adapter_layers(model)) > 0, (len(state), len(adapter_layers(model)))
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return ref.eval()


# --- 1. the step-0 loss is transformers' own ------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_step0_loss_equals_transformers_on_the_dequantized_weights(arch, tiny):
    folder = tiny(arch)
    model, *_ = build_model(run_config(folder), progress=False)
    engine = engine_of(model)
    if arch in FUSED:
        assert engine.unsupported is None, engine.unsupported
    else:
        assert engine.unsupported == f"architecture {arch}", engine.unsupported
    ref = dequantized_reference(model, folder)
    b = batch()
    model.eval()
    with torch.no_grad():
        want = ref(**b).loss
        total, count = engine.loss(b["input_ids"], b["segment_ids"], b["labels"])
    assert count == int((b["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, want, rtol=1e-5, atol=0)
    assert (arch in HEAD_TRANSFORMED) == (not engine.head.plain), engine.head
    if not engine.head.plain:  # the transform matters on these logits: without it the loss is another
        engine.head = Head()
        with torch.no_grad():
            plain_total, _ = engine.loss(b["input_ids"], b["segment_ids"], b["labels"])
        assert abs(plain_total / count - want) > 1e-3 * want, (plain_total / count, want)


# --- 2. training lowers the loss ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["qlora", "qdora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss_on_a_repeated_batch(arch, method, tiny):
    cfg = run_config(tiny(arch), method=method, lr=2e-2, warmup_steps=0)
    model, *_ = build_model(cfg, progress=False)
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    b = batch()
    losses = [train_step(model, optimizer, scheduler, [b])["loss"] for _ in range(10)]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.9 * losses[0], losses


# --- 3-5. a trained run: merged export, PEFT adapter, memory plan --------------------------------

@pytest.fixture(scope="module")
def trained(tiny, corpus, tmp_path_factory):
    """trained(arch, method) -> (run folder, qtune's fp32 logits of probe_ids() with the run's adapters, the
    adapted linears' names), made once; the adapters move the logits far more than fp16 rounding does."""
    made = {}
    settings = dict(data=str(corpus), seq_len=32, lr=2e-2, warmup_steps=0, eval_every=0, eval_batches=1, save_every=0)

    def make(arch: str, method: str):
        if not made:  # a process's first trainings meter what its libraries allocate once, at their first calls
            # (22-29 MiB for these models, whose plans are ~1 MiB: test_plan_is_close_to_the_metered_peak below)
            for m in ("qlora", "qdora"):
                train(run_config(tiny(arch), method=m, output=str(tmp_path_factory.mktemp("arch-warmup") / "run"),
                                 max_steps=1, **settings), progress=False)
        if (arch, method) not in made:
            run = tmp_path_factory.mktemp(f"arch-run-{arch}-{method}") / "run"
            cfg = run_config(tiny(arch), method=method, output=str(run), max_steps=3, **settings)
            train(cfg, progress=False)
            _, model, *_ = load_run(run, progress=False, compute_dtype="float32")
            adapters = adapter_layers(model)
            ids = probe_ids()
            with torch.no_grad():
                logits = engine_of(model).logits(ids, torch.ones_like(ids)).float()
                for m in adapters.values():  # B = 0: LoRA's product vanishes (DoRA keeps its trained magnitude)
                    m.lora_B.zero_()
                without = engine_of(model).logits(ids, torch.ones_like(ids)).float()
            effect = ((logits - without).abs().max() / logits.abs().max()).item()
            assert effect > 10 * FP16_TOL, f"the trained adapters barely change the logits ({effect:.1e})"
            made[arch, method] = run, logits, sorted(adapters)
        return made[arch, method]

    return make


def probe_ids() -> torch.Tensor:
    return batch(pad_row=False)["input_ids"][:1]


@pytest.mark.parametrize("method", ["qlora", "qdora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_gives_the_adapter_models_logits(arch, method, trained, tmp_path):
    from safetensors import safe_open

    run, want, _ = trained(arch, method)
    out = export_merged(run, tmp_path / "merged", progress=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    names = {k for f in out.glob("*.safetensors") for k in safe_open(f, "pt").keys()}
    assert ("lm_head.weight" in names) == (not merged.config.tie_word_embeddings), sorted(names)[-3:]
    with torch.no_grad():
        got = merged(probe_ids()).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < FP16_TOL, f"relative logit difference {err:.2e}"


@pytest.mark.parametrize("method", ["qlora", "qdora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_on_the_bnb_4bit_base_gives_qtunes_logits(arch, method, trained, tmp_path):
    peft = pytest.importorskip("peft")
    from qtune.loader import QuantSpec, quantized_cache_path, resolve_model_dir

    run, want, adapted = trained(arch, method)
    out = export_peft(run, tmp_path / "adapter", progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] == (method == "qdora")
    cfg = TrainConfig.from_dict(load_run_yaml(run))
    base_dir = quantized_cache_path(resolve_model_dir(cfg.model), QuantSpec(4), torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # bitsandbytes 4-bit, as cached
    assert sum(type(m).__name__ == "Linear4bit" for m in base.modules()) == len(adapted)
    model = peft.PeftModel.from_pretrained(base, out)
    got_adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                         if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and len(m.lora_A))
    assert got_adapted == adapted  # PEFT adapts exactly the linears qtune trained
    model.train()  # bitsandbytes' CPU eval path repacks weights; train mode uses the plain dequantize path
    with torch.no_grad():
        got = model(probe_ids()).logits.float()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["qlora", "qdora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_plan_is_close_to_the_metered_peak(arch, method, trained):
    run, _, _ = trained(arch, method)
    rows = read_metrics(run / "metrics.jsonl")
    measured = max(r["peak_memory_bytes"] for r in rows if "loss" in r)
    plan = plan_memory(TrainConfig.from_dict(load_run_yaml(run)))
    assert plan.trainable_params == next(r["trainable_params"] for r in rows if r.get("event") == "start")
    allowed = 16 * 2**20 if measured < 160 * 2**20 else 0.10 * measured
    assert abs(plan.total_bytes - measured) <= allowed, (plan.total_bytes / 2**20, measured / 2**20)


# --- what qtune refuses -------------------------------------------------------------------------

REFUSED = {  # model_type -> what the refusal names
    "gpt2": "projections are transformers' Conv1D",
    "mixtral": "mixture-of-experts model whose experts are one 3-D parameter",
    "bert": "is an encoder-only (masked language) model",
    "t5": "is an encoder-decoder model",
    "gemma3": "is a vision-language (multimodal) checkpoint",
    "llava": "is a vision-language (multimodal) checkpoint",
}


@pytest.fixture
def refused_folder(tmp_path):
    def make(arch: str) -> Path:
        folder = tmp_path / arch
        AutoConfig.for_model(arch, **{k: COMMON[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                               "num_attention_heads", "num_key_value_heads")},
                             vocab_size=300).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        (folder / "model.safetensors").write_bytes(b"")  # no weight: the refusal comes before any is read
        return folder

    return make


@pytest.mark.parametrize("arch", list(REFUSED))
def test_unsupported_models_are_refused_by_name_before_any_weight(arch, refused_folder, corpus, tmp_path):
    folder = refused_folder(arch)
    cfg = TrainConfig(model=str(folder), method="qlora", compute_dtype="float32")
    named = f"'{arch}'.*" + re.escape(REFUSED[arch])
    with pytest.raises(QtuneError, match=named):
        build_model(cfg, progress=False)
    with pytest.raises(QtuneError, match=named):
        plan_memory(cfg)
    for args in (["train", "--model", folder, "--data", corpus, "--output", tmp_path / "run", "--compute-dtype", "float32"],
                 ["plan", "--model", folder]):
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exit_code == 2, (res.exit_code, res.output)
        assert REFUSED[arch] in res.output and "Traceback" not in res.output, res.output


def test_target_modules_narrow_by_name_on_phi3(tiny, corpus, tmp_path):
    folder = tiny("phi3")
    cfg = run_config(folder, target_modules=["qkv_proj"])
    model, *_ = build_model(cfg, progress=False)
    adapted = list(adapter_layers(model))
    assert adapted == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(COMMON["num_hidden_layers"])], adapted
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan_memory(cfg).trainable_params == trainable
    everything = list(adapter_layers(build_model(run_config(folder), progress=False)[0]))
    assert sorted({n.rpartition(".")[2] for n in everything}) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]

    names = "This model's linear layers are: down_proj, gate_up_proj, o_proj, qkv_proj."
    with pytest.raises(QtuneError, match=re.escape(f"No linear layer matches --target-modules q_proj. {names}")):
        build_model(run_config(folder, target_modules=["q_proj"]), progress=False)
    res = CliRunner().invoke(main, [str(a) for a in ["train", "--model", folder, "--data", corpus, "--output", tmp_path / "run",
                                                     "--compute-dtype", "float32", "--target-modules", "q_proj"]])
    assert res.exit_code == 2 and names in res.output and "Traceback" not in res.output, res.output
