"""Load a causal LM with its frozen linears quantized, streaming one tensor at a time.

    config.json → skeleton on the meta device (accelerate) → QuantLinear in place of every
    decoder linear → tensors streamed from the safetensors shards, each quantized as it arrives.

Peak memory while loading ≈ the quantized model + one tensor in flight (the shard files are
memory-mapped by safetensors, never read whole). A checkpoint that is already bitsandbytes 4-bit
(transformers' `quantization_config` with load_in_4bit — published "-bnb-4bit" models, and qtune's
own cache) is loaded as it is, without re-quantizing. After the first load of a model at given
quantization settings, the quantized model is saved to $QTUNE_CACHE/quantized/ in that same
format, so later runs skip quantization.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qtune.architectures import check_config, check_modules, linear_names
from qtune import gguf_io
from qtune.embedded import cache_dir, smollm2_gguf_path
from qtune.errors import QtuneError
from qtune.gguf_io import find_gguf, is_gguf
from quant import QuantLinear, QuantizedWeight, quantize

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class QuantSpec:
    """How the frozen base linears are stored."""

    bits: int = 4  # 4, 8 or 16 (16 = not quantized)
    quant_type: str = "nf4"  # at 4 bits: nf4 | fp4
    double_quant: bool = True

    @property
    def kind(self) -> str | None:
        return None if self.bits == 16 else ("int8" if self.bits == 8 else self.quant_type)


# --- where the model is ----------------------------------------------------------------------

def resolve_model_dir(model: str | None) -> Path:
    """Where the model is: a local folder with config.json + *.safetensors, a hub id resolved by
    huggingface_hub (transformers' own cache and resolution), or a GGUF file (a .gguf path, or a
    folder holding exactly one; qtune.gguf_io). The embedded model (None) is its shipped GGUF file."""
    if model is None:
        return smollm2_gguf_path()
    path = Path(model).expanduser()
    if path.exists():
        gguf = find_gguf(path)
        if gguf is not None:
            return gguf
        if not (path / "config.json").is_file():
            raise QtuneError(f"{path} has no config.json. Pass --model a Hugging Face model folder "
                             "(config.json + *.safetensors), a .gguf file, or a hub id.")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise QtuneError(f"Model path not found: {model}. Pass --model an existing folder "
                         "(config.json + *.safetensors) or a hub id like org/name.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                             "tokenizer.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated repo: all end here
        raise QtuneError(f"Could not fetch {model!r} from the Hugging Face Hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}). Without network access, download the model "
                         "elsewhere and pass its local folder with --model.") from None


def load_config(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if is_gguf(model_dir):
        config = gguf_io.load_config(model_dir, trust_remote_code)
        check_config(config, str(model_dir))
        return config
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise QtuneError(f"Cannot read the model config in {model_dir}: {e}. qtune trains decoder-only causal "
                         "language models that transformers knows (AutoModelForCausalLM).") from None
    check_config(config, str(model_dir))
    return config


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if is_gguf(model_dir):
        tok = gguf_io.load_tokenizer(model_dir, trust_remote_code)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise QtuneError(f"No tokenizer in {model_dir} (tokenizer.json / tokenizer.model). Copy the model's "
                         "tokenizer files into that folder.")
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, checked against its index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise QtuneError(f"{index.name} in {model_dir} lists shard(s) that are missing: {', '.join(missing)}. "
                             "Download the missing files again.")
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise QtuneError(f"{model_dir} holds only pickle checkpoints (*.bin), which qtune never loads (they can run "
                         "code). Convert them to safetensors first, or use the model's safetensors release.")
    raise QtuneError(f"No model.safetensors or model.safetensors.index.json in {model_dir}. "
                     "Pass --model a folder with safetensors weights.")


def _open_shard(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise QtuneError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt. "
                         "Download it again.") from None


# --- the quantized model -----------------------------------------------------------------------

def is_prequantized(config) -> bool:
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit")) or qc.get("quant_method") == "qtune"


def prequantized_bits(config) -> int | None:
    """4 or 8 for a checkpoint stored quantized (bitsandbytes 4-bit, or qtune's 8-bit cache), else None."""
    if not is_prequantized(config):
        return None
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return 8 if qc.get("quant_method") == "qtune" and qc.get("kind") == "int8" else 4


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The linears QLoRA quantizes: every nn.Linear inside the decoder layers (not lm_head, not the embeddings)."""
    return linear_names(model, (nn.Linear,))


def build_skeleton(config, compute_dtype: torch.dtype, quantized: list[str] | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    """The model with every weight on the meta device; `quantized` linears replaced by empty QuantLinears."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = _without_quantization(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=compute_dtype, trust_remote_code=trust_remote_code)
    check_modules(model)
    for name in quantized or []:
        parent, child = _parent(model, name)
        lin = getattr(parent, child)
        bias = None if lin.bias is None else torch.empty(lin.out_features, device="meta", dtype=compute_dtype)
        setattr(parent, child, QuantLinear(lin.in_features, lin.out_features, None, bias))
    model.config.use_cache = False
    return model


def load_model(model_dir: Path, quant: QuantSpec, compute_dtype: torch.dtype = torch.bfloat16,
               trust_remote_code: bool = False, use_cache: bool = True, progress: bool = True,
               transform=None, offload: str = "none") -> nn.Module:
    """The base model with its decoder linears quantized per `quant` (unless bits == 16).

    offload (quant.offload): 'disk' leaves the quantized linears in the quantized cache's (or the
    pre-quantized checkpoint's) files and reads them at each use; a model not yet in the cache is
    quantized into it first (that first pass holds the quantized model in memory once). 'cpu' keeps
    them in host memory and copies them to the compute device at each use.

    transform(name, weight) -> tensor | QuantizedWeight, if given, sees each decoder linear's weight
    before it is quantized and returns what becomes the frozen base (PiSSA's residual, LoftQ's
    quantized residual). It bypasses the shared quantized cache."""
    config = load_config(model_dir, trust_remote_code)
    stored_bits = prequantized_bits(config)
    if stored_bits and quant.bits != stored_bits:
        raise QtuneError(f"{model_dir} is already quantized to {stored_bits} bits (its config has a quantization_config), "
                         f"so it cannot be loaded with --bits {quant.bits}. Use --bits {stored_bits}, or the model's "
                         "unquantized release for 8 or 16 bits.")
    if transform is not None and is_prequantized(config):
        raise QtuneError(f"{model_dir} is already quantized, so its weights cannot be decomposed for this --init. "
                         "Use the model's unquantized release, or --init default.")
    if offload not in ("none", "cpu", "disk"):
        raise QtuneError(f"Unknown --offload {offload!r}. Use none, cpu or disk.")
    if offload != "none" and (quant.bits == 16 or transform is not None):
        raise QtuneError(f"--offload {offload} streams the quantized base; it needs --bits 4 or 8 and --init default "
                         f"(this run has --bits {quant.bits}{' and an initialiser that rewrites the base' if transform else ''}).")
    if quant.bits != 16 and not is_prequantized(config) and (use_cache or offload == "disk") and transform is None:
        cached = quantized_cache_path(model_dir, quant, compute_dtype)
        with cache_lock(cached):  # one process fills an entry; the others wait, then read it
            if not (cached / "config.json").is_file():
                model = _stream_load(model_dir, config, quant, compute_dtype, progress, trust_remote_code=trust_remote_code)
                save_quantized(model, cached, model_dir)
                if offload == "none":
                    return model
                if offload == "cpu":
                    return _offload_to_host(model)
                del model
                gc.collect()
        model_dir, config = cached, load_config(cached, trust_remote_code)
    model = _stream_load(model_dir, config, quant, compute_dtype, progress, transform, offload, trust_remote_code)
    return _offload_to_host(model) if offload == "cpu" else model


def _offload_to_host(model: nn.Module) -> nn.Module:
    from quant.offload import stream_quantized_linears

    model._qtune_prefetcher = stream_quantized_linears(model, "cpu")
    return model


def _stream_load(model_dir, config, quant, compute_dtype, progress, transform=None, offload: str = "none",
                 trust_remote_code: bool = False) -> nn.Module:
    """offload 'disk' (pre-quantized sources only): each quantized linear becomes a StreamedWeight
    that reads its tensors from the shard at every use; only one linear's tensors are ever held
    while loading (to learn its format)."""
    from accelerate.utils import set_module_tensor_to_device

    from quant.offload import FILES, Prefetcher, StreamedWeight

    gguf = is_gguf(model_dir)  # a GGUF file: decoded one tensor at a time (qtune.gguf_io), never pre-quantized
    shards = [] if gguf else shard_files(model_dir)
    prequantized = is_prequantized(config)
    probe = None
    if prequantized:  # quantized modules = those whose quant-state blob is in the checkpoint
        names = set()
        for shard in shards:
            names |= {k.split(".weight.quant_state.")[0] for k in _open_shard(shard).keys() if ".weight.quant_state." in k}
        quantized, linears = sorted(names), set()
    else:
        probe = build_skeleton(config, compute_dtype, trust_remote_code=trust_remote_code)
        linears = set(quantized_linear_names(probe))
        quantized = sorted(linears) if quant.bits != 16 else []
    model = build_skeleton(config, compute_dtype, quantized, trust_remote_code)
    qset = set(quantized)
    pending: dict[str, dict[str, torch.Tensor]] = {}  # prequantized parts of one module
    on_disk: dict[str, tuple[Path, list[str]]] = {}   # --offload disk: module -> (shard, its keys)
    if gguf:
        total = gguf_io.tensor_count(model_dir)
        entries = ((key, lambda t=t: t, model_dir) for key, t in gguf_io.iter_tensors(model_dir, probe, config))
    else:
        total = sum(len(_open_shard(s).keys()) for s in shards)
        entries = ((key, lambda f=f, key=key, shard=shard: _get(f, key, shard), shard)
                   for shard in shards for f in [_open_shard(shard)] for key in f.keys())
    del probe
    bar = tqdm(total=total, desc="loading" + (" + quantizing" if qset and not prequantized else ""),
               unit="tensor", disable=not progress)
    for key, read, shard in entries:
        bar.update()
        if key is None:
            continue  # a GGUF tensor the model has no place for (llama.cpp's rope_freqs)
        owner = key.split(".weight")[0]
        if owner in qset and (key == owner + ".weight" or key.startswith(owner + ".weight.")):
            if prequantized and offload == "disk":
                on_disk.setdefault(owner, (shard, []))[1].append(key)
                continue
            t = read()
            if prequantized:  # a heap copy, like the tensors below: the meter then counts it
                pending.setdefault(owner, {})[key] = t.clone()
                continue
            t = transform(owner, t) if transform is not None and key == owner + ".weight" else t
            _module(model, owner).qweight = (t if isinstance(t, QuantizedWeight) else
                                             quantize(t, quant.kind, quant.double_quant, compute_dtype))
            continue
        if not _has_tensor(model, key):
            continue  # e.g. lm_head.weight of a tied model, rotary buffers
        if offload == "disk":  # positioned reads: the shard's pages never enter this process's RSS
            t = FILES.get(str(shard), key)
        else:
            t = read()
        if transform is not None and owner in linears and key == owner + ".weight":  # --bits 16
            t = transform(owner, t)
        # a copy, not a view of the memory-mapped shard: the shard can be unmapped, and the
        # weights are ordinary (counted) heap memory
        t = t.to(compute_dtype, copy=True) if t.is_floating_point() else t.clone()
        set_module_tensor_to_device(model, key, "cpu", value=t)
    bar.close()
    if on_disk:
        prefetcher = Prefetcher()
        model._qtune_prefetcher = prefetcher
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # the forward's order
        for owner in sorted(on_disk, key=order.__getitem__):
            shard, keys = on_disk[owner]
            try:  # positioned reads, not the mmap: see quant.offload._Files
                meta = QuantizedWeight.from_state_tensors({k: FILES.get(str(shard), k) for k in keys}, owner + ".")
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                raise QtuneError(f"Cannot read {owner}'s quantized tensors from {shard} ({e}); the file is probably "
                                 "truncated or corrupt. Delete it (qtune's cache refills) or download it again.") from None
            meta.set_compute_dtype(compute_dtype)
            _module(model, owner).qweight = StreamedWeight(owner + ".", meta, path=str(shard), prefetcher=prefetcher)
            del meta
    for owner, parts in pending.items():
        qw = QuantizedWeight.from_state_tensors(parts, owner + ".")
        qw.set_compute_dtype(compute_dtype)
        _module(model, owner).qweight = qw
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    missing += [n for n in quantized if _module(model, n).qweight is None]
    if missing:
        raise QtuneError(f"The checkpoint in {model_dir} lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}. "
                         "A shard is probably missing or from another model; download the model again.")
    return model


def _get(f, key, shard):
    try:
        return f.get_tensor(key)
    except Exception as e:
        raise QtuneError(f"Cannot read tensor {key} from {shard} ({e}); the file is probably truncated or "
                         "corrupt. Download it again.") from None


@contextlib.contextmanager
def cache_lock(entry: Path):
    """An exclusive lock on a quantized-cache entry (fcntl.flock on `$QTUNE_CACHE/locks/<entry>.lock`, released
    when the process ends, even by SIGKILL): processes that start at once (the ranks of a run, or two runs)
    fill the entry once, and none reads or replaces it while another writes it. Where flock is missing (not
    POSIX), none."""
    locks = entry.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename in save_quantized still guards the entry's content
        yield
        return
    with open(locks / f"{entry.parent.name}-{entry.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def quantized_cache_path(model_dir: Path, quant: QuantSpec, compute_dtype: torch.dtype = torch.bfloat16) -> Path:
    """$QTUNE_CACHE/quantized/<name>-<kind>-<hash of the source files and settings>.

    The compute dtype is part of the key because the unquantized tensors (embeddings, norms) are
    stored in it."""
    h = hashlib.sha256()
    for p in [model_dir] if is_gguf(model_dir) else [model_dir / "config.json", *shard_files(model_dir)]:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(f"{quant.kind}|{quant.double_quant}|{compute_dtype}|v1".encode())
    return cache_dir() / "quantized" / f"{model_dir.stem if is_gguf(model_dir) else model_dir.name}-{quant.kind}-{h.hexdigest()[:12]}"


def save_quantized(model: nn.Module, out: Path, source_dir: Path | None = None) -> Path:
    """Write the (quantized) base model as a transformers bitsandbytes-4-bit folder (atomically).

    transformers' `from_pretrained(out)` opens it as a bitsandbytes 4-bit model (nf4/fp4); the
    8-bit block-wise format is qtune's own (quant_method "qtune")."""
    from huggingface_hub import save_torch_state_dict

    kinds = {m.qweight.quant_type for m in model.modules() if isinstance(m, QuantLinear)}
    kind = kinds.pop() if len(kinds) == 1 else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = dict(model.state_dict())
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # stored once, as the embedding (transformers' convention)
        save_torch_state_dict(state, tmp, max_shard_size="2GB")
        config = model.config.to_dict()
        qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        if kind in ("nf4", "fp4"):
            dq = any(m.qweight.state.nested for m in qlayers)
            dtype = str(qlayers[0].qweight.compute_dtype).removeprefix("torch.")
            config["quantization_config"] = {
                "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": kind, "bnb_4bit_use_double_quant": dq, "bnb_4bit_compute_dtype": dtype,
                "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": ["lm_head"]}
        elif kind == "int8":
            config["quantization_config"] = {"quant_method": "qtune", "kind": kind}
        # no quantized layer (a --bits 16 base): a plain checkpoint
        config["use_cache"] = True
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if source_dir is not None and (source_dir / name).is_file():
                shutil.copy2(source_dir / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- small helpers -----------------------------------------------------------------------------

def _without_quantization(config):
    import copy

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _has_tensor(model: nn.Module, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    try:
        mod = model.get_submodule(parent)
    except AttributeError:
        return False
    return leaf in mod._parameters or leaf in mod._buffers
