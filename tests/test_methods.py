"""Every method end to end on a tiny model: trains, equals the base (or the original weight) at
step 0, resumes without recomputing its init, merges, and exports to PEFT where PEFT has the method."""

import json

import pytest
import torch

from qtune.config import TrainConfig
from qtune.export import export_merged, export_peft, load_run
from qtune.loader import QuantSpec, load_model
from qtune.model import build_model
from qtune.train import read_metrics, train

IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12, 3, 60]])


def cfg_for(model_dir, corpus, out, **kw):
    base = dict(model=str(model_dir), data=str(corpus), output=str(out), seq_len=32, batch_size=2, rank=4, alpha=8,
                compute_dtype="float32", max_steps=4, eval_every=0, save_every=2, lr=5e-3, warmup_steps=0,
                pissa_niter=0)
    base.update(kw)
    return TrainConfig(**base)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method, init, bits", [
    ("qdora", "default", 4), ("qpissa", "pissa", 4), ("qlora", "milora", 4), ("qlora", "loftq", 4),
    ("qdora", "pissa", 4), ("qlora", "default", 8), ("qpissa", "pissa", 16), ("qrosa", "default", 4)])
def test_method_trains_merges_and_resumes(tiny_llama, corpus, tmp_path, method, init, bits):
    cfg = cfg_for(tiny_llama, corpus, tmp_path / "run", method=method, init=init, bits=bits)
    (tmp_path / "run").mkdir()
    model, *_ = build_model(cfg, tmp_path / "run", progress=False)
    reference = load_model(tiny_llama, QuantSpec(16), torch.float32, progress=False)
    plain = load_model(tiny_llama, QuantSpec(bits), torch.float32, progress=False)
    if init == "default":  # the adapter starts as the identity on the quantized base
        torch.testing.assert_close(logits(model), logits(plain), atol=1e-5, rtol=1e-4)
    elif bits == 16:  # PiSSA moves weight between base and adapter: the sum is the original model
        torch.testing.assert_close(logits(model), logits(reference), atol=1e-4, rtol=1e-4)
    else:  # quantized residual + adapter is closer to the original model than plain NF4 is
        err = (logits(model) - logits(reference)).abs().mean()
        err_plain = (logits(plain) - logits(reference)).abs().mean()
        assert err < err_plain, (err, err_plain)
    shutil_rmtree(tmp_path / "run")

    summary = train(cfg, progress=False)
    assert summary["last_loss"] < summary["first_loss"]
    if method == "qrosa":  # the sparse support was chosen from gradients and kept with the run
        from safetensors.torch import load_file

        masks = load_file(tmp_path / "run" / "rosa_mask.safetensors")
        assert len(masks) == 14 and all(m.numel() > 0 for m in masks.values())
    if init != "default":  # the initial factors and the residual base are kept with the run
        assert (tmp_path / "run" / "init_adapter.safetensors").is_file() and (tmp_path / "run" / "base").is_dir()

    # merged export == the adapter model
    out = export_merged(tmp_path / "run", tmp_path / "merged", dtype="float16", progress=False)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _, ours, *_ = load_run(tmp_path / "run", progress=False)
    want = logits(ours)
    assert ((logits(merged) - want).abs().max() / want.abs().max()) < 2e-3


def shutil_rmtree(path):
    import shutil

    shutil.rmtree(path)


def test_pissa_resume_reuses_the_saved_init(tiny_llama, corpus, tmp_path, monkeypatch):
    import qtune.base_init as bi

    cfg = cfg_for(tiny_llama, corpus, tmp_path / "run", method="qpissa", pissa_niter=2, max_steps=2)
    train(cfg, progress=False)
    monkeypatch.setattr(bi, "pissa_init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    cfg4 = TrainConfig.from_dict({**cfg.to_dict(), "max_steps": 4})
    train(cfg4, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_rosa_resume_reuses_the_saved_mask_and_peft_export_is_refused(tiny_llama, corpus, tmp_path, monkeypatch):
    import qtune.adapters.rosa_mask as rs
    from qtune.errors import QtuneError

    cfg = cfg_for(tiny_llama, corpus, tmp_path / "run", method="qrosa", rosa_density=0.05, max_steps=2)
    train(cfg, progress=False)
    monkeypatch.setattr(rs, "accumulate_weight_grad_squares", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    train(TrainConfig.from_dict({**cfg.to_dict(), "max_steps": 4}), resume=True, progress=False)
    _, model, *_ = load_run(tmp_path / "run", progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.nnz == int(0.05 * 64 * 64 + 0.999) and layer.sparse_values.abs().sum() > 0
    with pytest.raises(QtuneError, match="merged"):
        export_peft(tmp_path / "run", tmp_path / "adapter", progress=False)


def test_dora_peft_export_matches_peft_on_the_bnb_base(tiny_llama, corpus, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from qtune.loader import quantized_cache_path

    train(cfg_for(tiny_llama, corpus, tmp_path / "run", method="qdora"), progress=False)
    out = export_peft(tmp_path / "run", tmp_path / "adapter", progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    base = AutoModelForCausalLM.from_pretrained(quantized_cache_path(tiny_llama, QuantSpec(4), torch.float32),
                                                dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out)
    model.train()  # bitsandbytes' CPU eval path repacks weights; train mode (dropout 0) dequantizes as we do
    _, ours, *_ = load_run(tmp_path / "run", progress=False)
    torch.testing.assert_close(logits(model), logits(ours), atol=1e-4, rtol=1e-4)


def test_pissa_peft_export_is_a_lora_for_the_original_base(tiny_llama, corpus, tmp_path):
    """At 16 bits the residual + s·B'A' is exact, so PEFT's LoRA (rank 2r: [B'|B₀][A';−A₀]) on the
    ORIGINAL weights must reproduce our adapter model to fp32 precision."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    train(cfg_for(tiny_llama, corpus, tmp_path / "run", method="qpissa", bits=16), progress=False)
    out = export_peft(tmp_path / "run", tmp_path / "adapter", progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(original, out)
    _, ours, *_ = load_run(tmp_path / "run", progress=False)
    torch.testing.assert_close(logits(model), logits(ours), atol=1e-4, rtol=1e-4)
