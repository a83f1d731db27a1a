"""Export a trained run as one GGUF file that llama.cpp and Ollama run.

    qtune export --run RUN --output DIR --format gguf [--gguf-type f16|q8_0|q4_0]
      → DIR/<DIR name>.<TYPE>.gguf, DIR/Modelfile (Ollama), DIR/qtune_export.json, DIR/manifest.json

The merged weights — D(Q(W)) + ΔW per adapted linear, from the adapter layers themselves
(qtune.export.merged_state) — are produced one tensor at a time in fp32, renamed to llama.cpp's
names (gguf-py's tensor name map), laid out as llama.cpp's converter lays them out, quantized by
gguf-py's numpy quantizers and written through GGUFWriter's temporary file: only the quantized
base and one tensor are in memory, never the fp16 model. The folder appears whole or not at all.

Layout facts (llama.cpp's convert_hf_to_gguf.py, which wrote the shipped SmolLM2 file):
- its `llama` architecture (Llama, Mistral) stores q/k rows interleaved per head (the converter's
  permute); Qwen, Gemma, Phi-3 and StableLM keep Hugging Face's order;
- Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w;
- 1-D tensors (norms, biases) stay F32; a matrix whose rows are not a whole number of the type's
  32-value blocks is written F16, as the converter does;
- with q4_0 the output matrix (or the tied embedding that serves as it) is written Q8_0: llama.cpp's
  own llama-quantize gives it a higher-precision type (Q6_K, which gguf-py cannot write).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qtune.errors import QtuneError

GGUF_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class GgufArch:
    """How one transformers model_type is written for llama.cpp."""

    name: str                  # general.architecture
    permute_qk: bool = False   # the `llama` graph's rotary layout
    norm_offset: float = 0.0   # Gemma: stored norm = 1 + w


ARCHS = {
    "llama": GgufArch("llama", permute_qk=True),
    "mistral": GgufArch("llama", permute_qk=True),
    "qwen2": GgufArch("qwen2"),
    "qwen3": GgufArch("qwen3"),
    "gemma2": GgufArch("gemma2", norm_offset=1.0),
    "gemma3_text": GgufArch("gemma3", norm_offset=1.0),
    "phi3": GgufArch("phi3"),
    "stablelm": GgufArch("stablelm"),
}


def check_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise QtuneError(f"Unknown --gguf-type {gguf_type!r}. Use one of: {', '.join(GGUF_TYPES)} (k-quants such as "
                         "q4_k_m: run llama.cpp's llama-quantize on the f16 file).")
    return gguf_type


def arch_for(config) -> GgufArch:
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise QtuneError(f"GGUF export does not know llama.cpp's layout for model type {config.model_type!r} (it writes: "
                         f"{', '.join(sorted(ARCHS))}). Export --format merged and convert that folder with llama.cpp's "
                         "convert_hf_to_gguf.py.")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise QtuneError(f"GGUF export does not write rope scaling of type {rope.get('rope_type')!r} (it writes default, "
                         "linear and llama3). Export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py.")
    if arch.name in ("gemma2", "gemma3"):
        scalar, head_dim = getattr(config, "query_pre_attn_scalar", None), _head_dim(config)
        big = config.num_hidden_layers in (46, 62)  # llama.cpp's 27B rule: scale by hidden / heads
        expected = config.hidden_size // config.num_attention_heads if big else head_dim
        if scalar is not None and scalar != expected:
            raise QtuneError(f"This {config.model_type} model scales attention by query_pre_attn_scalar={scalar}, but "
                             f"llama.cpp scales it by {expected} for a model of this shape and reads no key to change "
                             "that; its GGUF would compute wrong outputs. Export --format merged instead.")
        if arch.name == "gemma3" and getattr(config, "attn_logit_softcapping", None):
            raise QtuneError("llama.cpp's gemma3 has no attention soft-capping, which this model uses. Export --format "
                             "merged instead.")
    return arch


def _rope(config, layer_type: str = "full_attention") -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):  # per layer type (Gemma-3)
        params = params[layer_type]
    out = dict(params)
    if "rope_theta" not in out and getattr(config, "rope_theta", None) is not None:
        out["rope_theta"] = config.rope_theta
    return out


def write_gguf(path: Path, model, tokenizer, model_dir: Path, gguf_type: str = "q8_0", name: str | None = None,
               source_fields: dict | None = None, progress: bool = False):
    """Write `model` (a qtune model with adapters, merged as it goes, or a plain transformers model) as
    one GGUF file at `path`. Returns (tensors per ggml type, matrices that fell back to F16, tokenizer line)."""
    import gguf

    check_type(gguf_type)
    config = model.config
    arch = arch_for(config)
    counts: dict[str, int] = {}
    fallbacks = 0
    writer = gguf.GGUFWriter(path, arch.name, use_temp_file=True)
    # the tensors spool to a file beside the output (its temporary folder), never to memory or /tmp
    writer.temp_file = tempfile.SpooledTemporaryFile(max_size=64 * 2**20, dir=Path(path).parent)
    try:
        write_general(writer, name or Path(str(model_dir)).stem, gguf_type, source_fields or {})
        rope_freqs: list = []
        write_hparams(writer, config, arch, rope_freqs)
        tok_line = write_tokenizer(writer, Path(model_dir), tokenizer, config)
        total = sum(1 for k in model.state_dict() if ".weight." not in k and "lora_" not in k)
        bar = tqdm(total=total, desc="exporting gguf", unit="tensor", disable=not progress)
        for rf in rope_freqs:
            writer.add_tensor("rope_freqs.weight", rf)
        want = gguf.GGMLQuantizationType[gguf_type.upper()]
        for tname, data, qtype in gguf_tensors(model, config, arch, gguf_type):
            writer.add_tensor(tname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            fallbacks += qtype == gguf.GGMLQuantizationType.F16 and want != qtype
            bar.update()
        bar.close()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    finally:
        writer.close()
    return counts, int(fallbacks), tok_line


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# --- metadata ------------------------------------------------------------------------------------

def write_hparams(writer, config, arch: GgufArch, rope_freqs: list) -> None:
    """The {arch}.* keys llama.cpp's loader reads for this architecture."""
    import gguf

    w = writer
    head_dim = _head_dim(config)
    rope = _rope(config)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if config.model_type == "stablelm":
        w.add_layer_norm_eps(config.layer_norm_eps)
    else:
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
    w.add_rope_dimension_count(int(head_dim * partial))
    if getattr(config, "head_dim", None) and config.head_dim != config.hidden_size // config.num_attention_heads \
            or arch.name in ("gemma2", "gemma3", "qwen3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3":
        rope_freqs.append(_llama3_rope_factors(rope, head_dim))
    if arch.name in ("gemma2", "gemma3") and getattr(config, "sliding_window", None):
        w.add_sliding_window(config.sliding_window)
    if arch.name == "gemma2":
        w.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        w.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
    if arch.name == "gemma3":
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(config.final_logit_softcapping)
        local = _rope(config, "sliding_attention").get("rope_theta")
        if local is not None:
            w.add_rope_freq_base_swa(float(local))
        pattern = _swa_period(config)
        if pattern != 6:  # llama.cpp's default: every 6th layer global
            w.add_sliding_window_pattern(pattern)
    if arch.name == "phi3":
        w.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        orig = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))


def _swa_period(config) -> int:
    """Gemma-3's layer pattern as llama.cpp's sliding_window_pattern n: layer i is global iff i % n == n - 1."""
    types = list(getattr(config, "layer_types", None) or [])
    for n in [6, *range(1, len(types) + 1)]:  # llama.cpp's default first
        if all((t == "full_attention") == (i % n == n - 1) for i, t in enumerate(types)):
            return n
    raise QtuneError("This Gemma-3 model's sliding/global layer order is not periodic, which llama.cpp's "
                     "sliding_window_pattern cannot express. Export --format merged instead.")


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama-3.1's frequency-dependent rope scaling as llama.cpp takes it: one factor per rotary
    frequency (the rope_freqs tensor), from transformers' rope_parameters."""
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_general(writer, name: str, gguf_type: str, source_fields: dict) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    for key in ("general.organization", "general.basename", "general.size_label", "general.license"):
        value = source_fields.get(key)
        if isinstance(value, str):
            writer.add_string(key, value)
    for key in ("general.languages", "general.tags"):
        value = source_fields.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            writer.add_array(key, value)
    writer.add_finetune("qtune")
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- the tokenizer -------------------------------------------------------------------------------

def write_tokenizer(writer, model_dir: Path, tokenizer, config) -> str:
    """tokenizer.* keys. From a GGUF source they are the source file's own, copied with their types;
    from a Hugging Face folder they are built by gguf-py's vocab readers (the ones llama.cpp's converter
    uses). Returns a line for the export's report."""
    from qtune.gguf_io import is_gguf

    if is_gguf(model_dir):
        from qtune import gguf_io

        r = gguf_io.reader(model_dir)
        copied = 0
        for key, f in r.fields.items():
            if key.startswith("tokenizer."):
                sub = f.types[1] if len(f.types) > 1 else None
                writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
                copied += 1
        return f"tokenizer: {copied} keys copied from {model_dir.name}"
    return _tokenizer_from_folder(writer, model_dir, tokenizer, config)


def _tokenizer_from_folder(writer, model_dir: Path, tokenizer, config) -> str:
    import gguf
    from gguf.vocab import LlamaHfVocab, SpecialVocab

    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        raise QtuneError(f"GGUF export needs the model's tokenizer.json, which {model_dir} lacks (llama.cpp runs a GGUF "
                         "only with its vocabulary). Export --format merged instead, or add tokenizer.json there.")
    spec = json.loads(tj.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise QtuneError(f"GGUF export writes BPE tokenizers (byte-level or SentencePiece-style); {model_dir.name}'s is "
                         f"{model.get('type')!r}. Export --format merged and convert it with llama.cpp's "
                         "convert_hf_to_gguf.py.")
    if model.get("byte_fallback"):  # SentencePiece BPE (Llama-2, Mistral, Gemma, Phi-3): llama.cpp's "llama" vocab
        vocab = LlamaHfVocab(model_dir)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        merges, kind = False, "SentencePiece BPE"
    else:  # byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM): llama.cpp's "gpt2" vocab
        tokens, types = _byte_level_tokens(tokenizer, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        pre = _pre_tokenizer_name(spec)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        merges, kind = True, f"byte-level BPE, pre-tokenizer {pre!r}"
    special = SpecialVocab(model_dir, load_merges=merges, n_vocab=config.vocab_size)
    special.add_to_gguf(writer, quiet=True)
    return f"tokenizer: {kind}, {len(tokens)} tokens, built from {model_dir.name}/tokenizer.json"


def _byte_level_tokens(tokenizer, vocab_size: int):
    """(tokens, token types) padded to the model's vocabulary size, as llama.cpp's converter lists them."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the way text is split before BPE: the Split regex of tokenizer.json looked
    up in transformers' table of llama.cpp names; GPT-2's own regex (ByteLevel use_regex) is 'gpt-2'."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    def walk(node):
        if isinstance(node, dict):
            yield node
            for p in node.get("pretokenizers") or []:
                yield from walk(p)

    regexes, gpt2 = [], False
    for node in walk(spec.get("pre_tokenizer")):
        if node.get("type") == "Split":
            regexes.append((node.get("pattern") or {}).get("Regex"))
        if node.get("type") == "ByteLevel" and node.get("use_regex", True):
            gpt2 = True
    preferred = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35")
    for name in preferred + tuple(GGUF_PRE_TOKENIZER_SPLITS):
        if GGUF_PRE_TOKENIZER_SPLITS.get(name) in regexes:
            return name
    return "gpt-2" if gpt2 and not regexes else "default"


# --- tensors -------------------------------------------------------------------------------------

def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotary halves → llama.cpp's interleaved pairs, per head (rows only)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, config, arch: GgufArch, gguf_type: str):
    """Yield (llama.cpp name, numpy data, ggml type) for the merged model, one tensor at a time."""
    import gguf

    from qtune.export import merged_state

    names = gguf.get_tensor_name_map(_model_arch(arch.name), config.num_hidden_layers)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[gguf_type]
    tied = getattr(config, "tie_word_embeddings", False)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for key, t in merged_state(model, torch.float32):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise QtuneError(f"llama.cpp has no name for tensor {key} of this {config.model_type} model (gguf-py's map for "
                             f"{arch.name}). Export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py.")
        if arch.permute_qk and name.endswith(("attn_q.weight", "attn_q.bias")):
            t = _permute(t, n_head)
        elif arch.permute_qk and name.endswith(("attn_k.weight", "attn_k.bias")):
            t = _permute(t, n_kv)
        if arch.norm_offset and name.endswith("norm.weight"):
            t = t + arch.norm_offset
        data = t.detach().float().contiguous().numpy()
        if data.ndim == 1:
            yield name, data, gguf.GGMLQuantizationType.F32
            continue
        want = qtype
        if gguf_type == "q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
            want = gguf.GGMLQuantizationType.Q8_0
        block = gguf.GGML_QUANT_SIZES[want][0]
        if data.shape[-1] % block:
            want = gguf.GGMLQuantizationType.F16
        yield name, gguf.quants.quantize(data, want), want


def _model_arch(name: str):
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise QtuneError(f"The installed gguf package does not know llama.cpp architecture {name!r}; upgrade it "
                     "(pip install -U gguf).")


# --- the export ----------------------------------------------------------------------------------

def export_gguf(run_dir: Path, out: Path, gguf_type: str = "q8_0", checkpoint: Path | None = None,
                progress: bool = True) -> Path:
    from qtune.checkpoint import write_manifest
    from qtune.config import TrainConfig, load_run_yaml
    from qtune.export import _check_out, _writing, load_run
    from qtune.loader import load_config, resolve_model_dir

    check_type(gguf_type)
    run_dir, out = Path(run_dir), _check_out(out)
    if (run_dir / "run.yaml").is_file():  # refuse an unknown layout before loading anything
        run_cfg = TrainConfig.from_dict(load_run_yaml(run_dir))
        arch_for(load_config(resolve_model_dir(run_cfg.model), run_cfg.trust_remote_code))
    cfg, model, tokenizer, model_dir, ckpt = load_run(run_dir, checkpoint, progress)
    arch = arch_for(model.config)
    source_fields = {}
    from qtune.gguf_io import is_gguf

    if is_gguf(model_dir):
        from qtune import gguf_io

        r = gguf_io.reader(model_dir)
        source_fields = {k: gguf_io.field(r, k) for k in r.fields if k.startswith("general.")}
    file_name = f"{out.name}.{gguf_type.upper()}.gguf"
    with _writing(out) as tmp:
        name = source_fields.get("general.name") or Path(str(cfg.model or model_dir)).name
        counts, fallbacks, tok_line = write_gguf(tmp / file_name, model, tokenizer, model_dir, gguf_type,
                                                 f"{name} ({cfg.method} fine-tune)", source_fields, progress)
        eos = tokenizer.eos_token
        (tmp / "Modelfile").write_text(
            f"# Ollama: ollama create {out.name} -f Modelfile && ollama run {out.name}\n"
            f"# The chat template is the GGUF file's own (tokenizer.chat_template).\n"
            f"FROM ./{file_name}\n" + (f'PARAMETER stop "{eos}"\n' if eos else ""))
        (tmp / "qtune_export.json").write_text(json.dumps(
            {"run": str(run_dir), "checkpoint": ckpt.name, "method": cfg.method, "bits": cfg.bits, "format": "gguf",
             "gguf_type": gguf_type, "file": file_name, "architecture": arch.name, "tensor_types": counts,
             "f16_fallbacks": int(fallbacks), "tokenizer": tok_line}, indent=1))
        write_manifest(tmp)
    print(f"qtune: {file_name}: {sum(counts.values())} tensors ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})"
          + (f"; {fallbacks} matrices in F16 (rows not a multiple of the {gguf_type} block)" if fallbacks else "")
          + f"; {tok_line}")
    return out
