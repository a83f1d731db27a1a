"""Every method on the real SmolLM2-135M and the shipped data (slow): 30 steps lower the held-out loss; `qtune
eval` of the merged fp16 export is within 0.5% of `qtune eval` of the run on the same held-out text (Hamlet's
opening); the PEFT-format export loads in PEFT and gives qtune's logits, where PEFT has the method."""

from __future__ import annotations

import pytest
import torch

from qtune.config import METHODS, TrainConfig
from qtune.embedded import shakespeare_texts
from qtune.evaluate import evaluate_file
from qtune.export import export_merged, export_peft, load_run
from qtune.loader import QuantSpec, load_tokenizer, quantized_cache_path, resolve_model_dir
from qtune.train import train
from quant import QuantLinear

pytestmark = pytest.mark.slow

# learning rates at which 30 steps move each method (vectors and norms need larger ones than low-rank factors)
LR = {"ia3": 3e-2, "lntuning": 1e-2, "bitfit": 1e-2, "bone": 3e-3, "bat": 3e-3}
OPTIONS = {"loradash": dict(dash_steps=10), "adalora": dict(rank_init=8, rank=4)}
PEFT_METHODS = ("qlora", "qdora", "qpissa", "loha", "lokr", "ia3", "lntuning", "bone", "bat", "adalora")
PEFT_ON_4BIT = ("qlora", "qdora", "qpissa", "ia3", "lntuning", "bone", "bat", "adalora")  # PEFT 0.21 cannot run LoHa/LoKr on a 4-bit layer


def embedded_fp32():
    """The embedded model as the runs train from it: its GGUF file, decoded to fp32 by transformers' own reader."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(None)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer = None  # plain fp32 weights (transformers marks GGUF loads as quantized)
    return model


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The first ~12 KB of Hamlet (held out of every training set)."""
    hamlet = next(p for p in shakespeare_texts("eval") if p.name.startswith("hamlet"))
    path = tmp_path_factory.mktemp("held") / "hamlet_opening.txt"
    path.write_text(hamlet.read_text(errors="replace")[5000:17000])
    return path


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_merges_and_exports_on_smollm2(method, held_out, tmp_path):
    opts = {"rank": 8, **OPTIONS.get(method, {})}
    cfg = TrainConfig(method=method, output=str(tmp_path / "run"), seq_len=128, batch_size=2, max_steps=30,
                      warmup_steps=3, lr=LR.get(method, 2e-3), eval_every=0, eval_batches=8, save_every=0, **opts)
    summary = train(cfg, progress=False)
    print(method, "held-out", summary)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.01

    of_run = evaluate_file(str(held_out), run_dir=str(tmp_path / "run"), seq_len=128, progress=False)
    merged = export_merged(tmp_path / "run", tmp_path / "merged", progress=False)
    of_export = evaluate_file(str(held_out), model=str(merged), seq_len=128, compute_dtype=of_run.compute_dtype,
                              progress=False)
    print(method, of_run, of_export, sep="\n  ")
    assert of_export.tokens == of_run.tokens
    assert abs(of_export.loss - of_run.loss) <= 0.005 * of_run.loss

    if method not in PEFT_METHODS:
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(resolve_model_dir(None))
    ids = tok("Arr, what be the capital of Spain?", return_tensors="pt").input_ids
    _, ours, *_ = load_run(tmp_path / "run", progress=False, compute_dtype="float32")
    with torch.no_grad():
        want = ours(ids).logits
    if method == "qpissa":  # a LoRA of rank 2r for the ORIGINAL weights: W + s·(B'A' − B₀A₀), not qtune's residual base
        from qtune.adapters import adapter_layers
        from qtune.base_init import initial_factors

        base, reference = embedded_fp32(), embedded_fp32()
        factors = initial_factors(tmp_path / "run")
        with torch.no_grad():  # the equation, densely
            for name, layer in adapter_layers(ours).items():
                start = factors[f"{name}.lora_B"].float() @ factors[f"{name}.lora_A"].float()
                reference.get_submodule(name).weight += layer.scale * (layer.delta_weight() / layer.scale - start)
            want = reference(ids).logits
    elif method in PEFT_ON_4BIT:
        base = AutoModelForCausalLM.from_pretrained(
            quantized_cache_path(resolve_model_dir(None), QuantSpec(4), torch.float32), dtype=torch.float32)
        for m in base.modules():  # PEFT dequantizes (DoRA's norms) to the quant state's dtype, the checkpoint's bf16;
            state = getattr(getattr(m, "weight", None), "quant_state", None)  # qtune to fp32: the same, in fp32
            if state is not None:
                state.dtype = torch.float32
    else:  # the same NF4 weights dequantized in fp32, as plain linears (transformers' dequantize() rounds to bf16)
        base = embedded_fp32()
        with torch.no_grad():
            for name, m in ours.named_modules():
                if isinstance(m, QuantLinear):
                    base.get_submodule(name.removesuffix(".base_layer")).weight.copy_(m.dequantized_weight(torch.float32))
    peft_model = PeftModel.from_pretrained(base, export_peft(tmp_path / "run", tmp_path / "adapter", progress=False))
    peft_model.train()  # bitsandbytes' CPU eval path repacks weights; train mode (no dropout here) dequantizes as qtune
    with torch.no_grad():
        got = peft_model(ids).logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{method}: PEFT vs qtune logits, max |Δ| / max |logit| = {rel:.2e}")
    assert rel < 1e-4
