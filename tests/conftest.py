"""Shared fixtures: tolerances per dtype (set once, here), a tiny offline tokenizer, and tiny
random Llama / Mistral / Qwen2 checkpoints written as real Hugging Face folders."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import qtune.engine.compiled as qtune_compiled

# Inductor's artifacts: chosen now, while $QTUNE_CACHE is still the run's (.ci/run's three sessions share it; here,
# ~/.cache/qtune), in its folder for this vector ISA (qtune.engine.compiled.inductor_cache_dir), for qtune's compiles
# and the tests' own torch.compile alike, rather than a cold compile in each session's fresh $QTUNE_CACHE
# (_isolated_cache below)
qtune_compiled._cache_dir()

# Tolerances, once per dtype. fp32: accumulation-order noise (different GEMM blockings of sums of
# ~100 products, with cancellation) reaches ~1e-5 relative on gradients; 1e-4 leaves a margin.
# bf16: 8 mantissa bits -> relative spacing 2^-8 ≈ 0.4%; a few roundings in a small network.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SENTENCES = ["the quick brown fox jumps over the lazy dog", "Arr, matey! The capital of France be Paris.",
             "What is two plus two? Four.", "### Instruction:\nAdd the numbers\n\n### Response:\n",
             "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"]


def make_tokenizer(chat_template: str | None = CHATML, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here (no network, no files) with a ChatML template like SmolLM2's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, tie: bool = False):
    """A 2-layer model of the given family, small enough for a forward/backward in milliseconds."""
    from transformers import AutoConfig

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(arch, **common)


def write_tiny_model(folder, arch: str = "llama", tie: bool = False, seed: int = 0, dtype=torch.float32,
                     shards: bool = False):
    """Save a random model + tokenizer as a Hugging Face folder; returns the folder."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tok) + 8, tie=tie), dtype=dtype)
    model.save_pretrained(folder, max_shard_size="100KB" if shards else "5GB")
    tok.save_pretrained(folder)
    return folder


def make_base(kind: str, in_features: int, out_features: int, bias: bool = True, seed: int = 0):
    """A frozen base linear: "dense" (nn.Linear) or "quant" (its NF4 QuantLinear, fp32 compute)."""
    from torch import nn

    from quant import QuantLinear

    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    if kind == "dense":
        return lin.requires_grad_(False)
    return QuantLinear.from_linear(lin, "nf4", compute_dtype=torch.float32)


def dense_weight(base) -> torch.Tensor:
    """The (dequantized) base weight in fp32."""
    from quant import QuantLinear

    return base.dequantized_weight(torch.float32) if isinstance(base, QuantLinear) else base.weight.detach().float()


@pytest.fixture(scope="module")
def one_thread():
    """Small numeric work runs fastest on one thread and does not spin-wait on a busy 2-core machine
    (seen: a 0.03 s SVD taking 14 s with two threads while another job ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _eager_by_default():
    """The suite runs qtune's fused kernels eagerly (the same math; compiling each new shape costs
    seconds); tests of the compiled kernels ask for the `compiled` fixture."""
    import qtune.engine.compiled as qc

    old = os.environ.get("QTUNE_COMPILE")
    os.environ["QTUNE_COMPILE"] = "0"
    qc.set_enabled(False)
    yield
    if old is None:
        os.environ.pop("QTUNE_COMPILE", None)
    else:
        os.environ["QTUNE_COMPILE"] = old


@pytest.fixture
def compiled(monkeypatch):
    """torch.compile on for this test (qtune.engine.compiled), as in a user's run. Whether the decoder
    blocks compiled is each test's own check (Engine.execution_report)."""
    import qtune.engine.compiled as qc

    monkeypatch.setenv("QTUNE_COMPILE", "1")
    monkeypatch.setattr(qc, "_enabled", True)
    monkeypatch.setattr(qc, "_failed", False)
    yield
    assert not qc._failed, "torch.compile failed on this machine: the compiled path was not tested"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """qtune's cache (converted and quantized models) goes to a fresh folder per test session."""
    old = os.environ.get("QTUNE_CACHE")
    os.environ["QTUNE_CACHE"] = str(tmp_path_factory.mktemp("qtune-cache"))
    yield
    if old is None:
        os.environ.pop("QTUNE_CACHE", None)
    else:
        os.environ["QTUNE_CACHE"] = old


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small plain-text training file (the sentences, repeated); test modules may define their own."""
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(SENTENCES * 40))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch, tie=False, shards=False) -> folder, cached per argument set."""
    made = {}

    def make(arch: str = "llama", tie: bool = False, shards: bool = False):
        key = (arch, tie, shards)
        if key not in made:
            made[key] = write_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, tie=tie, shards=shards)
        return made[key]

    return make
