"""Reading a model from a GGUF file, one tensor at a time.

    --model model.gguf (or a folder holding exactly one .gguf file)
      → config and tokenizer from the file's metadata (transformers' GGUF mappings)
      → each tensor: decoded by gguf-py (any ggml type: F16, Q8_0, Q4_K, …) to fp32, renamed and
        un-permuted by transformers' tensor processor for the architecture, handed to the loader,
        which quantizes it to NF4 and drops it.

The file is memory-mapped by gguf's GGUFReader, never read whole: peak memory while loading is the
quantized model plus one decoded tensor, as with safetensors shards. What transformers cannot map
(its GGUF support lists the architectures) is refused by name before any tensor is read.
"""

from __future__ import annotations

import mmap
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qtune.errors import QtuneError

SPLIT_NAME = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
SPLIT_COUNT_KEY = "split.count"


def is_gguf(path) -> bool:
    return path is not None and Path(path).suffix.lower() == ".gguf"


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf file of a folder that has no
    config.json. None when `path` is an ordinary model folder. Split and multiple files are refused."""
    if path.is_file():
        if not is_gguf(path):
            return None
        _refuse_split_name(path)
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if not files:
        return None
    if all(SPLIT_NAME.search(f.name) for f in files):
        _refuse_split_name(files[0])
    if len(files) > 1:
        raise QtuneError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files[:4])}"
                         f"{', …' if len(files) > 4 else ''}); qtune cannot tell which one to train. Pass --model "
                         "the file itself, e.g. --model " + str(files[0]))
    return files[0]


def _refuse_split_name(path: Path) -> None:
    if SPLIT_NAME.search(path.name):
        raise QtuneError(f"{path.name} is one part of a split GGUF model; qtune reads single-file GGUF only. Merge the "
                         "parts first with llama.cpp's `llama-gguf-split --merge <first part> merged.gguf`, then pass "
                         "--model merged.gguf.")


@lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime: int):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise QtuneError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]}); it is truncated, "
                         "corrupt, or not GGUF. Download or export it again.") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise QtuneError(f"{path} is truncated: its tensors need {end:,} bytes but the file has {size:,}. Download or "
                         "export it again.")
    count = field(reader, SPLIT_COUNT_KEY)
    if count and int(count) > 1:
        raise QtuneError(f"{Path(path).name} is part 1 of a {count}-part split GGUF model; qtune reads single-file "
                         "GGUF only. Merge the parts with llama.cpp's `llama-gguf-split --merge` first.")
    return reader


def reader(path: Path):
    """gguf.GGUFReader of `path` (memory-mapped), checked for truncation and splits; cached per file
    version (parsing a 49k-token vocabulary takes seconds)."""
    st = Path(path).stat()
    return _reader(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _release(r, tensor) -> None:
    """Drop a decoded tensor's pages of the mapping from this process (they stay in the page cache), so
    that the mapped file does not accumulate in the resident set while a large model streams in."""
    mm = getattr(r.data, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = int(tensor.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, int(tensor.data_offset) + int(tensor.n_bytes) - start)
    except (OSError, ValueError):
        pass


def field(reader, key: str):
    """A metadata value as Python (str, int, float, bool, or a list of them), None if absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def architecture(path: Path) -> str:
    arch = field(reader(path), "general.architecture")
    if not arch:
        raise QtuneError(f"{path} has no general.architecture key; it is not a model GGUF file.")
    return arch


def metadata_dir(path: Path) -> Path:
    """$QTUNE_CACHE/gguf-metadata/<stem>-<hash of the file's path, size and mtime>: the config and tokenizer that
    transformers built from this file's metadata, saved as Hugging Face files (config.json, tokenizer.json, ...).

    Building them parses the whole metadata with gguf's GGUFReader (a 49k-token vocabulary: seconds, and ~250k
    Python objects, 0.16 GiB of RSS that outlives the parse in the allocator's arenas). Once saved, a later load
    of the same file whose quantized base is cached opens no GGUF at all."""
    import hashlib

    from qtune.embedded import cache_dir

    digest = hashlib.sha256(fingerprint(path).encode()).hexdigest()[:12]
    return cache_dir() / "gguf-metadata" / f"{Path(path).stem}-{digest}"


def _save_metadata(path: Path, config, tokenizer) -> None:
    """Write metadata_dir(path) once, atomically (a half-written folder never has the final name)."""
    import os
    import shutil
    import tempfile

    target = metadata_dir(path)
    if (target / "config.json").is_file():
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError:  # a read-only cache: the next load parses the file again
        return
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process wrote it first
            pass
    except OSError:  # no room to write it: the next load parses the file again
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_config(path: Path, trust_remote_code: bool = False):
    """The transformers config from the file's metadata (transformers' GGUF mapping), or from its saved copy."""
    import copy

    meta = metadata_dir(path)
    if (meta / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(meta)
    st = Path(path).stat()
    return copy.deepcopy(_config(Path(path).resolve(), st.st_size, st.st_mtime_ns, trust_remote_code))


@lru_cache(maxsize=4)
def _config(path: Path, size: int, mtime: int, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = architecture(path)
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, NotImplementedError) as e:
        if "not supported" in str(e) or arch not in GGUF_SUPPORTED_ARCHITECTURES:
            known = ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")))
            raise QtuneError(f"{path.name} is a GGUF model of architecture {arch!r}, which transformers cannot read from "
                             f"GGUF (it maps: {known}). Train from the model's Hugging Face release (safetensors) "
                             "instead.") from None
        raise QtuneError(f"Cannot read the model config from {path.name}'s metadata ({e}).") from None


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer from the file's metadata (then saved with the config: metadata_dir), or from that saved copy."""
    from transformers import AutoTokenizer

    meta = metadata_dir(path)
    if (meta / "config.json").is_file():
        return AutoTokenizer.from_pretrained(meta)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise QtuneError(f"Cannot build a tokenizer from {path.name}'s metadata ({type(e).__name__}: {str(e)[:160]}). "
                         "Train from the model's Hugging Face release, which ships its tokenizer files.") from None
    _save_metadata(path, load_config(path, trust_remote_code), tok)
    return tok


def tensor_count(path: Path) -> int:
    return len(reader(path).tensors)


def fingerprint(path: Path) -> str:
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def iter_tensors(path: Path, probe: nn.Module, config):
    """Yield (transformers key, fp32 tensor) for each tensor of the file, decoded one at a time.

    `probe` is the model's skeleton (meta device, plain nn.Linear) whose state-dict names the GGUF
    names are mapped to. Tensors the model has no place for (e.g. llama.cpp's rope_freqs) are
    yielded with key None so that the caller's progress counts them."""
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    r = reader(path)
    arch = architecture(path)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(probe, processor)
    parsed = {"tensors": {}, "config": config.to_dict()}
    for t in r.tensors:
        try:
            weights = dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise QtuneError(f"Cannot decode tensor {t.name} ({t.tensor_type.name}) of {Path(path).name}: {e}. "
                             "Upgrade the gguf package (pip install -U gguf), or use another quantization of the "
                             "model.") from None
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=names, parsed_parameters=parsed)
        key, w = names.get(result.name), result.weights
        if key is not None and (w.dtype != np.float32 or not w.flags.writeable or not w.flags.c_contiguous):
            w = np.array(w, dtype=np.float32, order="C")  # F32/F16 tensors decode to views of the mapping
        del weights, result
        _release(r, t)
        yield key, None if key is None else torch.from_numpy(w)
