"""qtune/loader.py on tiny random models written as real Hugging Face folders (conftest).

References are built here from transformers itself: the same checkpoint through
AutoModelForCausalLM with each decoder linear's weight replaced by its dequantized NF4 (or 8-bit)
value — i.e. "the quantized model ≈ the same computation on the dequantized weight" (STYLE 10).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import quant
import quant.formats
import qtune.loader as loader
from conftest import TOL, write_tiny_model
from quant import QuantLinear
from quant._bnb import bitsandbytes as bnb
from qtune.errors import QtuneError
from qtune.loader import QuantSpec, load_model, load_tokenizer, resolve_model_dir

FP32 = TOL[torch.float32]


def _ids(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=g)


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _hf(folder, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)


def _dequantized_reference(folder, kind: str = "nf4"):
    """transformers' model with every decoder nn.Linear weight replaced by D(Q(W)) in fp32."""
    ref = _hf(folder)
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear) and not name.endswith("lm_head"):
            mod.weight.data = quant.quantize(mod.weight.data, kind).dequantize(torch.float32)
    return ref.eval()


def _decoder_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) and not n.endswith("lm_head")]


def _cache_entries() -> set[str]:
    root = Path(os.environ["QTUNE_CACHE"]) / "quantized"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def _forbid_quantize(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("re-quantized a checkpoint that is already quantized")

    monkeypatch.setattr(quant.formats, "quantize", boom)
    monkeypatch.setattr(loader, "quantize", boom)


# --- logits against transformers ----------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_nf4_model_equals_transformers_on_dequantized_weights(tiny_model_factory, arch):
    folder = Path(tiny_model_factory(arch))
    model = load_model(folder, QuantSpec(4), torch.float32, progress=False).eval()
    ref = _dequantized_reference(folder, "nf4")
    ids = _ids(model)
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), **FP32)
    if arch == "qwen2":  # q/k/v carry a bias, kept in the compute dtype next to the 4-bit weight
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, QuantLinear) and q.bias is not None
        torch.testing.assert_close(q.bias.detach(), ref.model.layers[0].self_attn.q_proj.bias.detach(), atol=0, rtol=0)


def test_bits16_equals_transformers_and_bits8_quantizes(tiny_model_factory):
    folder = Path(tiny_model_factory("llama"))
    plain = _hf(folder).eval()
    m16 = load_model(folder, QuantSpec(16), torch.float32, progress=False).eval()
    ids = _ids(plain)
    assert not any(isinstance(m, QuantLinear) for m in m16.modules())
    torch.testing.assert_close(_logits(m16, ids), _logits(plain, ids), **FP32)

    m8 = load_model(folder, QuantSpec(8), torch.float32, progress=False).eval()
    kinds = {m.qweight.quant_type for m in m8.modules() if isinstance(m, QuantLinear)}
    assert kinds == {"int8"}
    torch.testing.assert_close(_logits(m8, ids), _logits(_dequantized_reference(folder, "int8"), ids), **FP32)
    assert not torch.allclose(_logits(m8, ids), _logits(plain, ids), atol=1e-6, rtol=0)  # it did quantize


def test_decoder_linears_quantized_rest_in_compute_dtype(tiny_model_factory):
    folder = Path(tiny_model_factory("qwen2"))
    model = load_model(folder, QuantSpec(4), torch.bfloat16, progress=False)
    names = _decoder_linears(model)
    assert len(names) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert type(model.lm_head) is nn.Linear
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # QuantLinear's bias too
    assert not any(p.is_meta for p in model.parameters())
    q = model.model.layers[0].self_attn.q_proj
    assert q.qweight.packed.dtype == torch.uint8
    assert q.qweight.dequantize().dtype == torch.bfloat16  # dequantized just in time into the compute dtype


def test_sharded_equals_unsharded(tiny_model_factory):
    sharded = Path(tiny_model_factory("llama", shards=True))
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = load_model(Path(tiny_model_factory("llama")), QuantSpec(4), torch.float32, progress=False).eval()
    b = load_model(sharded, QuantSpec(4), torch.float32, progress=False).eval()
    ids = _ids(a)
    torch.testing.assert_close(_logits(b, ids), _logits(a, ids), atol=0, rtol=0)


def test_tied_embeddings(tiny_model_factory):
    folder = Path(tiny_model_factory("llama", tie=True))
    model = load_model(folder, QuantSpec(4), torch.float32, progress=False).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = _ids(model)
    torch.testing.assert_close(_logits(model, ids), _logits(_dequantized_reference(folder), ids), **FP32)
    again = load_model(folder, QuantSpec(4), torch.float32, progress=False).eval()  # from the cache,
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # lm_head stored once
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), atol=0, rtol=0)


# --- the quantized cache -------------------------------------------------------------------------

def test_cache_written_then_read_without_requantizing(tmp_path, monkeypatch):
    folder = Path(write_tiny_model(tmp_path / "m", "llama", seed=1))  # a folder no other test has cached
    before = _cache_entries()
    first = load_model(folder, QuantSpec(4), torch.float32, progress=False).eval()
    new = _cache_entries() - before
    assert len(new) == 1, new
    cached = Path(os.environ["QTUNE_CACHE"]) / "quantized" / new.pop()
    qc = json.loads((cached / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert (cached / "tokenizer.json").is_file()

    _forbid_quantize(monkeypatch)
    second = load_model(folder, QuantSpec(4), torch.float32, progress=False).eval()
    assert _cache_entries() - before == {cached.name}
    ids = _ids(first)
    torch.testing.assert_close(_logits(second, ids), _logits(first, ids), atol=0, rtol=0)


def test_cache_keeps_unquantized_tensors_exact_across_compute_dtypes(tmp_path):
    """A bf16 load first must not make a later fp32 load read bf16-rounded embeddings and norms."""
    folder = Path(write_tiny_model(tmp_path / "m", "llama", seed=2))
    load_model(folder, QuantSpec(4), torch.bfloat16, progress=False)
    fp32 = load_model(folder, QuantSpec(4), torch.float32, progress=False)
    src = _hf(folder)
    assert fp32.model.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(fp32.model.embed_tokens.weight, src.model.embed_tokens.weight, atol=0, rtol=0)
    torch.testing.assert_close(fp32.lm_head.weight, src.lm_head.weight, atol=0, rtol=0)


def test_transformers_opens_our_cache_as_bitsandbytes_4bit(tmp_path):
    folder = Path(write_tiny_model(tmp_path / "m", "qwen2", seed=3))
    before = _cache_entries()
    ours = load_model(folder, QuantSpec(4), torch.float32, progress=False).eval()
    (name,) = _cache_entries() - before
    hf = _hf(Path(os.environ["QTUNE_CACHE"]) / "quantized" / name)
    q = hf.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    assert type(hf.lm_head) is nn.Linear
    # train() mode: bnb's CPU eval + no_grad path repacks the weight for AVX512-bf16 (and asserts
    # out_features % 32 == 0); training mode uses the plain dequantize + matmul. Dropout is 0.
    hf.train()
    assert q.compute_dtype == torch.float32
    ids = _ids(ours)
    torch.testing.assert_close(_logits(hf, ids), _logits(ours, ids), **FP32)


def test_loads_bitsandbytes_checkpoint_written_by_transformers(tiny_model_factory, tmp_path, monkeypatch):
    from transformers import BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    hf = _hf(Path(tiny_model_factory("llama")), quantization_config=bnb_config, device_map="cpu")
    assert isinstance(hf.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    hf.save_pretrained(tmp_path / "bnb")
    hf.train()  # see test_transformers_opens_our_cache_as_bitsandbytes_4bit

    _forbid_quantize(monkeypatch)
    before = _cache_entries()
    ours = load_model(tmp_path / "bnb", QuantSpec(4), torch.float32, progress=False).eval()
    assert _cache_entries() == before  # already quantized: no second copy in the cache
    assert all(isinstance(ours.get_submodule(n), QuantLinear) for n in _decoder_linears(ours))
    ids = _ids(ours)
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), **FP32)


# --- memory while loading ------------------------------------------------------------------------

def test_streaming_load_keeps_no_full_precision_copy_of_quantized_linears(tmp_path, monkeypatch):
    """While loading, the live heap grows by about the NF4 model, not by the fp32 checkpoint (64 MB).

    What this can and cannot see: safetensors hands out tensors backed by a private mmap of the
    shard file (file pages, not malloc'd heap), so a raw tensor in flight — or a loader that read
    the whole checkpoint first — is invisible to heap_in_use_bytes. What it does catch is any heap
    copy kept per quantized linear (an fp32/bf16 weight, a dequantized cache, a weight left in
    the skeleton). The process-RSS picture of streaming is measured by tools/, not here.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtune.memory import heap_in_use_bytes

    if heap_in_use_bytes() == 0:
        pytest.skip("mallinfo2 unavailable (non-glibc)")
    cfg = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=8, vocab_size=512)
    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fp32_bytes = sum(p.numel() * 4 for p in src.parameters())  # ≈ 69 MB
    src.save_pretrained(tmp_path / "m", max_shard_size="8MB")
    del src
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 4

    samples = []
    real_get = loader._get

    def sampled_get(f, key, shard):
        samples.append(heap_in_use_bytes())  # sampled as every tensor arrives: the running heap
        return real_get(f, key, shard)

    monkeypatch.setattr(loader, "_get", sampled_get)
    base = heap_in_use_bytes()
    model = load_model(tmp_path / "m", QuantSpec(4), torch.float32, use_cache=False, progress=False)
    samples.append(heap_in_use_bytes())
    peak = max(samples) - base
    nf4_bytes = sum(m.qweight.nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    assert nf4_bytes < 0.2 * fp32_bytes
    # measured ≈ 1.02 × nf4_bytes (≈ 8.9 MB); a kept fp32 copy of the linears would add ~64 MB
    assert 0.5 * nf4_bytes < peak < 0.4 * fp32_bytes, (peak, nf4_bytes, fp32_bytes)


# --- errors: a QtuneError that names the problem and the fix -----------------------------------

def test_missing_model_path(tmp_path):
    with pytest.raises(QtuneError, match="not found") as e:
        resolve_model_dir(str(tmp_path / "nope"))
    assert "--model" in str(e.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(QtuneError, match="no config.json") as e:
        resolve_model_dir(str(tmp_path))
    assert "safetensors" in str(e.value)


def test_unsupported_architecture(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # refused before any weight is read
    with pytest.raises(QtuneError, match="'gpt2''s projections are transformers' Conv1D") as e:
        load_model(tmp_path, QuantSpec(4), torch.float32, progress=False)
    assert "nn.Linear" in str(e.value) and "Llama" in str(e.value)


def test_index_lists_missing_shard(tiny_model_factory, tmp_path):
    folder = shutil.copytree(tiny_model_factory("llama", shards=True), tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (folder / gone).unlink()
    with pytest.raises(QtuneError, match="missing") as e:
        load_model(folder, QuantSpec(4), torch.float32, progress=False)
    assert gone in str(e.value) and "Download" in str(e.value)


@pytest.mark.parametrize("keep", [0.5, 0.0001])  # data cut off / header cut off
def test_truncated_safetensors(tiny_model_factory, tmp_path, keep):
    folder = shutil.copytree(tiny_model_factory("llama"), tmp_path / "m")
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(QtuneError, match="truncated or corrupt") as e:
        load_model(folder, QuantSpec(4), torch.float32, progress=False)
    assert "Download it again" in str(e.value)


def test_pickle_checkpoint_refused(tiny_model_factory, tmp_path):
    shutil.copy(Path(tiny_model_factory("llama")) / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded: pickles can run code")
    with pytest.raises(QtuneError, match="pickle") as e:
        load_model(tmp_path, QuantSpec(4), torch.float32, progress=False)
    assert "safetensors" in str(e.value)


def test_missing_tokenizer(tiny_model_factory, tmp_path):
    shutil.copy(Path(tiny_model_factory("llama")) / "config.json", tmp_path / "config.json")
    with pytest.raises(QtuneError, match="No tokenizer") as e:
        load_tokenizer(tmp_path)
    assert "tokenizer files" in str(e.value)


def test_hub_id_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # 'someorg/somemodel' is no local folder here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(QtuneError, match="someorg/somemodel") as e:
        resolve_model_dir("someorg/somemodel")
    assert "network" in str(e.value) and "local folder" in str(e.value)
