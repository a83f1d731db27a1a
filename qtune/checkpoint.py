"""Checkpoints that are either complete or absent.

A checkpoint is a folder `checkpoints/step-000123/` holding
    adapter.safetensors     the trainable tensors, by their names in the model
    optimizer.safetensors   every tensor of the optimizer's state_dict (bitsandbytes 8-bit and
                            paged state included), flattened to "state/<param>/<key>"
    trainer.json            step, data position, the optimizer's non-tensor state, metrics so far
    rng.safetensors         torch's CPU (and CUDA) generator states
    manifest.json           sha256 and size of each file above — written last
It is written under a temporary name and renamed into place once every file is flushed, so a
kill at any moment leaves either the complete folder or none. Loading verifies the manifest.
Nothing here unpickles anything: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qtune.errors import QtuneError

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json with the sha256 and size of every other file in `folder` (recursively)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    _write_json(folder / MANIFEST, {"files": entries})


def verify_manifest(folder: Path) -> None:
    """Raise QtuneError unless every file of the manifest is present with its recorded hash."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise QtuneError(f"{folder} has no {MANIFEST}: it is incomplete. Use another checkpoint or re-run training.")
    for name, entry in json.loads(manifest.read_text())["files"].items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            raise QtuneError(f"Checkpoint file {p} is missing or does not match its manifest (corrupt or "
                             "modified). Use an earlier checkpoint or re-run training.")


def atomic_folder(final: Path):
    """A context manager giving a temporary sibling folder that becomes `final` on success."""
    return _AtomicFolder(Path(final))


class _AtomicFolder:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.final.name}.", dir=self.final.parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _fsync_tree(self.tmp)
        if self.final.exists():
            old = self.final.with_name(f".tmp-old-{self.final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        return False


def save_checkpoint(folder: Path, adapter: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    trainer_state: dict, scheduler=None, optimizer_state: dict | None = None) -> Path:
    """Write a complete checkpoint at `folder` (atomically). Errors such as a full disk leave no folder.
    optimizer_state: the optimizer's state_dict as given (fsdp's, gathered whole); None: optimizer.state_dict()."""
    try:
        with atomic_folder(folder) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in adapter.items()}, tmp / "adapter.safetensors")
            tensors, meta = flatten_optimizer_state(optimizer.state_dict() if optimizer_state is None else optimizer_state)
            save_file(tensors, tmp / "optimizer.safetensors")
            state = dict(trainer_state, optimizer=meta,
                         scheduler=scheduler.state_dict() if scheduler is not None else None)
            _write_json(tmp / "trainer.json", state)
            save_file(rng_state(), tmp / "rng.safetensors")
            write_manifest(tmp)
    except (OSError, SafetensorError) as e:
        raise QtuneError(f"Could not write checkpoint {folder} ({write_error_reason(e)}). Free disk space or choose "
                         "another --output; earlier checkpoints are untouched.") from None
    return folder


def write_error_reason(e: Exception) -> str:
    """The reason of a failed write: OSError's strerror, or safetensors' I/O error (it reports a full disk as
    SafetensorError "... I/O error: No space left on device (os error 28)"); anything else is re-raised."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if "I/O error" in str(e):
        return str(e).split("I/O error: ", 1)[-1]
    raise e


def load_checkpoint(folder: Path) -> dict:
    """{'adapter', 'optimizer_tensors', 'trainer', 'rng'} of a verified checkpoint."""
    verify_manifest(folder)
    return {"adapter": load_file(folder / "adapter.safetensors"),
            "optimizer_tensors": load_file(folder / "optimizer.safetensors"),
            "trainer": json.loads((folder / "trainer.json").read_text()),
            "rng": load_file(folder / "rng.safetensors")}


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders with a manifest, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the last `keep` checkpoints; each is renamed to '.tmp-...' first, so a kill during the
    deletion never leaves a half-deleted step-* folder."""
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        trash = old.with_name(f".tmp-deleting-{old.name}")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def remove_stale_tmp(run_dir: Path) -> None:
    """Remove '.tmp-' folders that killed processes left in checkpoints/ (call before resuming)."""
    for stale in (Path(run_dir) / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


# --- optimizer state without pickle ------------------------------------------------------------

def flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able metadata.

    Per-parameter state may nest dicts (bitsandbytes 0.50 keeps its 8-bit quantization state in
    one); every leaf is named by its path, "state/<param>/<key>[/<subkey>...]"."""
    tensors, scalars, seen = {}, {}, set()

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif torch.is_tensor(value):
            t = value.detach().contiguous().cpu()
            ptr = t.untyped_storage().data_ptr()
            tensors[prefix] = t.clone() if ptr in seen else t  # shared maps (8-bit qmaps): one copy each
            seen.add(ptr)
        else:
            scalars[prefix] = value

    for pid, st in sd["state"].items():
        walk(f"state/{pid}", st)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, pid, *path = name.split("/")
        node = state.setdefault(int(pid), {})
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.random.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
