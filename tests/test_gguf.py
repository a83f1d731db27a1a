"""GGUF in and out (qtune.gguf_io, qtune.gguf_export) on tiny random models of each family llama.cpp runs.

Out: a trained run exported as GGUF is read back by transformers' own GGUF reader (gguf_file=) and
compared with the merged fp16 export of the same run. In: a GGUF file loads in qtune as transformers
loads it (same dequantized weights, same logits), one tensor at a time. Bad files get named errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import SENTENCES, make_tokenizer
from qtune.cli import main
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.export import export_merged, load_run, merged_state
from qtune.gguf_export import export_gguf, write_gguf
from qtune.loader import QuantSpec, load_config, load_model, resolve_model_dir
from qtune.train import train
from quant import QuantLinear

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
# Each family at settings GGUF carries: transformers' GGUF reader maps only some keys (e.g. not Phi-3's partial
# rotary factor, Gemma's soft-caps or query_pre_attn_scalar), so a knob it drops would be read back as the
# family's default.
KNOBS = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": dict(),
    "qwen2": dict(),
    "qwen3": dict(),
    "gemma2": dict(sliding_window=8),  # head_dim = query_pre_attn_scalar = 256, the defaults transformers reads back
    "gemma3_text": dict(sliding_window=8),
    "phi3": dict(),
    "stablelm": dict(),
}
ARCHS = list(KNOBS)
SEQ = 24
# mean |Δlogit| relative to the logit range, against the merged fp16 export. q8_0 and f16 hold the issue's
# SmolLM2 bounds here too; q4_0 on these random Gaussian matrices (every 32-value block full-range, 4 bits each)
# reaches ~3%, so the tiny models get 5% and tests/test_gguf_real.py holds SmolLM2 to the 3%. The
# quantization itself is checked value by value against the formats' equations below.
TOLERANCE = {"f16": 2e-3, "q8_0": 5e-3, "q4_0": 5e-2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one thread is fastest (conftest.one_thread)."""


def tiny_model(folder: Path, arch: str, **overrides) -> Path:
    tok = make_tokenizer()
    config = AutoConfig.for_model(arch, **{**COMMON, "vocab_size": len(tok) + 8, **KNOBS.get(arch, {}), **overrides})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def probe_ids() -> torch.Tensor:
    tok = make_tokenizer()
    return torch.tensor([tok(" ".join(SENTENCES))["input_ids"][:SEQ]])


@pytest.fixture(scope="module")
def run_of(tmp_path_factory, corpus):
    """run_of(arch) -> (run folder, merged fp16 export folder), trained 3 steps once."""
    made = {}

    def make(arch: str):
        if arch not in made:
            base = tmp_path_factory.mktemp(f"gguf-{arch}")
            model = tiny_model(base / "model", arch)
            run = base / "run"
            train(TrainConfig(model=str(model), method="qlora", bits=4, compute_dtype="float32", rank=4, alpha=8,
                              seq_len=32, batch_size=2, data=str(corpus), output=str(run), max_steps=3, lr=2e-2,
                              warmup_steps=0, eval_every=0, eval_batches=1, save_every=0), progress=False)
            made[arch] = run, export_merged(run, base / "merged", progress=False)
        return made[arch]

    return make


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(probe_ids()).logits[0].float()


def _read_back(folder: Path):
    (file,) = folder.glob("*.gguf")
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=file.name, dtype=torch.float32).eval(), file


# --- out -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_gguf_reads_back_as_the_merged_model(arch, gguf_type, run_of, tmp_path):
    run, merged = run_of(arch)
    out = export_gguf(run, tmp_path / "gguf", gguf_type, progress=False)
    got, file = _read_back(out)
    want = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval())
    g = _logits(got)
    err = ((g - want).abs().mean() / (want.max() - want.min())).item()
    assert err <= TOLERANCE[gguf_type], f"{arch} {gguf_type}: mean |Δlogit| {err:.2e} of the logit range"
    if gguf_type != "f16":  # the type is real: coarser than f16 (the f16 file's error is far smaller)
        assert err > 1e-5
    report = json.loads((out / "qtune_export.json").read_text())
    assert report["gguf_type"] == gguf_type and report["file"] == file.name and report["f16_fallbacks"] == 0
    assert (out / "Modelfile").read_text().splitlines()[2] == f"FROM ./{file.name}"
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_exported_tokenizer_encodes_as_the_runs(arch, run_of, tmp_path):
    run, merged = run_of(arch)
    out = export_gguf(run, tmp_path / "gguf", "q8_0", progress=False)
    (file,) = out.glob("*.gguf")
    ours = AutoTokenizer.from_pretrained(out, gguf_file=file.name)
    ref = AutoTokenizer.from_pretrained(merged)
    texts = SENTENCES + ["<|im_start|>user\nHello, world!<|im_end|>", "  two  spaces, tabs\tand ünïcödé 123456"]
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    assert ours.eos_token == ref.eos_token


def test_llama_q_and_k_are_permuted_as_llama_cpp_lays_them_out_and_gemma_norms_shifted(run_of, tmp_path):
    """The layout itself, read with gguf-py (not through transformers, which undoes both)."""
    from gguf import GGUFReader, dequantize

    from qtune.gguf_export import _permute

    for arch in ("llama", "gemma2"):
        run, merged = run_of(arch)
        out = export_gguf(run, tmp_path / arch, "f16", progress=False)
        r = GGUFReader(next(out.glob("*.gguf")))
        tensors = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()) for t in r.tensors}
        ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
        q = ref["model.layers.0.self_attn.q_proj.weight"]
        if arch == "llama":
            # llama.cpp's row order, written out here: head h, pair j -> rows (h, j) and (h, j + d/2) interleaved
            d = q.shape[0] // 4
            rows = [h * d + j + half * d // 2 for h in range(4) for j in range(d // 2) for half in (0, 1)]
            assert torch.allclose(tensors["blk.0.attn_q.weight"], q[rows], atol=1e-3)
            assert torch.equal(_permute(q, 4), q[rows])
        else:  # Gemma: no permutation; norms stored as 1 + w
            assert torch.allclose(tensors["blk.0.attn_q.weight"], q, atol=1e-3)
            w = ref["model.layers.0.input_layernorm.weight"]
            assert torch.allclose(tensors["blk.0.attn_norm.weight"], 1 + w, atol=1e-6)
        assert "output.weight" not in tensors  # both tied: the embedding serves as the output


def _naive(x: torch.Tensor, gguf_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's reference Q8_0 / Q4_0 round trip, written from the format: blocks of 32 along a row, one scale
    each, computed in float32 and stored as fp16. Q8_0: d = max|x| / 127, q = round(x / d). Q4_0: d = m / -8
    with m the value of largest magnitude (sign kept), q = min(15, trunc(x / d + 8.5)), value (q - 8) d.
    Returns (values, |d|)."""
    b = x.float().reshape(-1, 32)
    if gguf_type == "q8_0":
        d = b.abs().amax(1, keepdim=True) / 127
        q = torch.round(b * torch.where(d == 0, 0, 1 / d))
        d16 = d.half().float()
        return (q * d16).reshape(x.shape), d16.expand_as(b).reshape(x.shape)
    m = b.gather(1, b.abs().argmax(1, keepdim=True))
    d = m / -8
    q = torch.clamp(torch.trunc(b * torch.where(d == 0, 0, 1 / d) + 8.5), max=15)
    d16 = d.half().float()
    return ((q - 8) * d16).reshape(x.shape), d16.abs().expand_as(b).reshape(x.shape)


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_matrices_are_quantized_by_the_formats_equations(gguf_type, run_of, tmp_path):
    from gguf import GGUFReader, dequantize

    run, merged = run_of("qwen2")
    out = export_gguf(run, tmp_path / "gguf", gguf_type, progress=False)
    tensors = {t.name: t for t in GGUFReader(next(out.glob("*.gguf"))).tensors}
    _, model, *_ = load_run(run, progress=False)
    wanted = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    ref = {k: t for k, t in merged_state(model, torch.float32) if k in wanted}  # the merged fp32 weights
    for hf, name in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                     ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight")]:
        t = tensors[name]
        assert t.tensor_type.name == gguf_type.upper()
        got = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        want, d = _naive(ref[hf], gguf_type)
        # the same grid point (a value exactly on a rounding edge may go either way in float32 vs float64)
        step = (want - got).abs() > 0.1 * d
        assert step.float().mean() < 1e-3, f"{name}: {step.float().mean():.2%} of values differ"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    if gguf_type == "q4_0":  # the output matrix is kept at 8 bits, as llama-quantize keeps it finer
        assert tensors["output.weight"].tensor_type.name == "Q8_0"
        assert tensors["token_embd.weight"].tensor_type.name == "Q4_0"


def test_rows_the_type_cannot_hold_are_written_f16_and_counted(tmp_path, corpus):
    model = tiny_model(tmp_path / "model", "llama", hidden_size=48, num_attention_heads=4)  # 48 % 32 != 0
    run = tmp_path / "run"
    train(TrainConfig(model=str(model), method="qlora", bits=4, compute_dtype="float32", rank=4, alpha=8, seq_len=32,
                      batch_size=2, data=str(corpus), output=str(run), max_steps=1, eval_every=0, eval_batches=1,
                      save_every=0), progress=False)
    out = export_gguf(run, tmp_path / "gguf", "q8_0", progress=False)
    report = json.loads((out / "qtune_export.json").read_text())
    # every matrix with 48-wide rows: q, k, v, o? (o: 48 in), gate, up (48 in); down has 128-wide rows
    assert report["f16_fallbacks"] == 2 * 6 + 1, report  # 6 per layer + the tied embedding
    assert report["tensor_types"]["Q8_0"] == 2, report  # the two down_proj
    got, _ = _read_back(out)
    want = _logits(AutoModelForCausalLM.from_pretrained(export_merged(run, tmp_path / "merged", progress=False),
                                                        dtype=torch.float32).eval())
    assert ((_logits(got) - want).abs().mean() / (want.max() - want.min())).item() < TOLERANCE["q8_0"]


# --- in ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_of(tmp_path_factory):
    """gguf_of(arch, type) -> a GGUF file written from a tiny random Hugging Face model (qtune's writer)."""
    made = {}

    def make(arch: str, gguf_type: str = "q8_0") -> Path:
        if (arch, gguf_type) not in made:
            base = tmp_path_factory.mktemp(f"gguf-in-{arch}")
            folder = tiny_model(base / "hf", arch)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            path = base / f"{arch}.gguf"
            write_gguf(path, model, AutoTokenizer.from_pretrained(folder), folder, gguf_type)
            made[arch, gguf_type] = path
        return made[arch, gguf_type]

    return make


@pytest.mark.parametrize("arch", ARCHS)
def test_a_gguf_file_loads_as_transformers_reads_it(arch, gguf_of):
    path = gguf_of(arch)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours = load_model(resolve_model_dir(str(path)), QuantSpec(16), torch.float32, use_cache=False, progress=False)
    assert type(ours) is type(ref)
    assert torch.allclose(_logits(ours.eval()), _logits(ref), atol=1e-5, rtol=1e-5)
    # at 4 bits each linear is the NF4 of exactly the weight transformers decodes
    q4 = load_model(path, QuantSpec(4), torch.float32, use_cache=False, progress=False)
    from quant import quantize

    state = ref.state_dict()
    for name, m in q4.named_modules():
        if isinstance(m, QuantLinear):
            want = quantize(state[name + ".weight"], "nf4", True, torch.float32).dequantize(torch.float32)
            assert torch.equal(m.dequantized_weight(torch.float32), want), name


def test_training_from_a_gguf_file_and_its_tokenizer(gguf_of, corpus, tmp_path):
    path = gguf_of("qwen2")
    run = tmp_path / "run"
    result = train(TrainConfig(model=str(path.parent), method="qdora", bits=4, compute_dtype="float32", rank=4,
                               alpha=8, seq_len=32, batch_size=2, data=str(corpus), output=str(run), max_steps=2,
                               eval_every=0, eval_batches=1, save_every=0), progress=False)
    assert result is not None and (run / "checkpoints").is_dir()
    merged = export_merged(run, tmp_path / "merged", progress=False)  # the tokenizer comes from the file
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok(SENTENCES[0])["input_ids"] == make_tokenizer()(SENTENCES[0])["input_ids"]


def test_a_gguf_files_config_and_tokenizer_are_parsed_once_then_read_from_their_saved_copy(gguf_of, monkeypatch):
    """Building the config and tokenizer parses the whole GGUF metadata (for SmolLM2: seconds, and 0.16 GiB of RSS
    that outlives the parse); qtune saves them as Hugging Face files beside its quantized cache, and a later load
    of the same file reads those, opening no GGUFReader, with the same config and the same token ids."""
    import gguf

    from qtune import gguf_io
    from qtune.loader import load_tokenizer

    path = gguf_of("llama")
    ref_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    first_tok, first_config = load_tokenizer(path), load_config(path)
    meta = gguf_io.metadata_dir(path)
    assert (meta / "config.json").is_file() and (meta / "tokenizer.json").is_file()
    gguf_io._reader.cache_clear()
    gguf_io._config.cache_clear()

    def no_reader(*a, **k):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    config, tok = load_config(path), load_tokenizer(path)
    assert config.to_diff_dict() == ref_config.to_diff_dict() == first_config.to_diff_dict()
    for text in SENTENCES:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"] == first_tok(text)["input_ids"]
    assert tok.pad_token_id is not None and tok.eos_token == ref_tok.eos_token


def test_an_unwritable_cache_still_loads_a_gguf_files_tokenizer(gguf_of, monkeypatch, tmp_path):
    """Where the saved copy cannot be written (a read-only $QTUNE_CACHE), the tokenizer still comes from the file."""
    import tempfile

    from qtune import gguf_io
    from qtune.loader import load_tokenizer

    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path / "cache"))  # one where no earlier test saved this file's copy
    path = gguf_of("qwen2")
    assert not (gguf_io.metadata_dir(path) / "config.json").exists()

    def read_only(*a, **k):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    tok = load_tokenizer(path)
    assert tok(SENTENCES[0])["input_ids"] == AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(
        SENTENCES[0])["input_ids"]
    assert not gguf_io.metadata_dir(path).exists()


# --- bad input -----------------------------------------------------------------------------------

def test_folders_with_several_or_split_gguf_files_are_refused_by_name(gguf_of, tmp_path):
    data = gguf_of("llama").read_bytes()
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(data)
    with pytest.raises(QtuneError, match="holds 2 GGUF files"):
        resolve_model_dir(str(tmp_path / "two"))
    assert resolve_model_dir(str(tmp_path / "two" / "b.gguf")) == tmp_path / "two" / "b.gguf"
    (tmp_path / "split").mkdir()
    for i in (1, 2):
        (tmp_path / "split" / f"m-0000{i}-of-00002.gguf").write_bytes(data)
    for where in (tmp_path / "split", tmp_path / "split" / "m-00001-of-00002.gguf"):
        with pytest.raises(QtuneError, match="split GGUF.*llama-gguf-split --merge"):
            resolve_model_dir(str(where))


def test_truncated_and_corrupt_gguf_files_are_refused_by_name(gguf_of, tmp_path):
    data = gguf_of("llama").read_bytes()
    cases = {"short.gguf": (data[: len(data) - 4096], "truncated"), "header.gguf": (data[:200], "not a readable GGUF"),
             "magic.gguf": (b"XXXX" + data[4:], "not a readable GGUF")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(QtuneError, match=message):
            load_config(resolve_model_dir(str(tmp_path / name)))


def test_an_architecture_transformers_cannot_read_from_gguf_is_refused_by_name(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "olmo2.gguf", "olmo2")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", torch.zeros(8, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QtuneError, match="architecture 'olmo2'.*transformers cannot read"):
        load_config(resolve_model_dir(str(tmp_path / "olmo2.gguf")))
    r = CliRunner().invoke(main, ["plan", "--model", str(tmp_path / "olmo2.gguf")])
    assert r.exit_code == 2 and "architecture 'olmo2'" in r.output, r.output


def test_unknown_gguf_type_and_unwritable_layouts_are_refused_before_loading(run_of, tmp_path, corpus):
    run, _ = run_of("llama")
    with pytest.raises(QtuneError, match="Unknown --gguf-type 'q5_k'"):
        export_gguf(run, tmp_path / "x", "q5_k", progress=False)
    r = CliRunner().invoke(main, ["export", "--run", str(run), "--output", str(tmp_path / "y"), "--format", "gguf",
                                  "--gguf-type", "q5_k"])
    assert r.exit_code == 2 and "q5_k" in r.output
    # Gemma-2 with query_pre_attn_scalar != head_dim: llama.cpp would scale attention wrongly
    model = tiny_model(tmp_path / "g2", "gemma2", query_pre_attn_scalar=24)
    run2 = tmp_path / "run2"
    train(TrainConfig(model=str(model), method="qlora", bits=4, compute_dtype="float32", rank=4, alpha=8, seq_len=32,
                      batch_size=2, data=str(corpus), output=str(run2), max_steps=1, eval_every=0, eval_batches=1,
                      save_every=0), progress=False)
    with pytest.raises(QtuneError, match="query_pre_attn_scalar=24"):
        export_gguf(run2, tmp_path / "z", "f16", progress=False)
    assert not any(p.exists() for p in (tmp_path / "x", tmp_path / "y", tmp_path / "z"))


def test_a_failed_gguf_export_leaves_nothing(run_of, tmp_path, monkeypatch):
    import gguf

    run, _ = run_of("llama")
    real, calls = gguf.quants.quantize, []

    def failing(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(QtuneError, match="No space left|Could not write"):
        export_gguf(run, tmp_path / "out", "q8_0", progress=False)
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
