"""Shared fixtures and helpers of the reliability tests (tests/test_reliability.py, tests/test_safety.py):
a tiny corpus, the tiny model quantized once into the session cache, a tiny trained run, and the flags
of a tiny run."""


from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import SENTENCES
from qtune.checkpoint import verify_manifest
from qtune.cli import main
from qtune.config import TrainConfig
from qtune.train import read_metrics, train


REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 300

@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """conftest's one_thread for every test here."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability-data") / "corpus.txt"
    path.write_text("\n".join(SENTENCES * 40))
    return path


@pytest.fixture(scope="module")
def warm_cache(tiny_llama):
    """Quantize the tiny model into the session cache once, in-process, before any subprocess needs it
    (so that the subprocesses only read the cache)."""
    from qtune.loader import QuantSpec, load_model

    load_model(Path(tiny_llama), QuantSpec(4), torch.float32, progress=False)
    return tiny_llama


def tiny_cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), seq_len=32, batch_size=2, rank=4, alpha=8,
                compute_dtype="float32", max_steps=6, eval_every=0, save_every=2, warmup_steps=2, lr=3e-3,
                keep_checkpoints=5)
    base.update(kw)
    return TrainConfig(**base)


def cli_args(model, data, out, **kw) -> list[str]:
    """Flags of a tiny CLI run; kw overrides (underscores for dashes)."""
    flags = {"model": model, "data": data, "output": out, "seq_len": 32, "batch_size": 2, "rank": 4,
             "max_steps": 6, "save_every": 2, "keep_checkpoints": 5, "eval_every": 0, "compute_dtype": "float32",
             "warmup_steps": 2, "lr": 3e-3}
    flags.update(kw)
    return [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def qtune_argv(*args) -> list[str]:
    return [sys.executable, "-m", "qtune.cli", *[str(a) for a in args]]


def subprocess_env() -> dict:
    env = dict(os.environ)  # QTUNE_CACHE: the session's isolated cache (conftest)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest, and two runs side by side do not spin-wait
    env.setdefault("TQDM_DISABLE", "1")
    return env


def metric_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows, tolerating a torn last line (a process may be killed while writing)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def losses(run: Path) -> dict[int, float]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(steps) + 1)), f"metrics.jsonl steps are not 1..N once each: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def assert_only_complete_checkpoints(run: Path) -> None:
    """checkpoints/ holds complete step-* folders (manifest verified) and, at most, '.tmp-' leftovers."""
    root = run / "checkpoints"
    for p in root.iterdir() if root.is_dir() else []:
        if p.name.startswith("step-"):
            verify_manifest(p)  # raises if incomplete or corrupt
        else:
            assert p.name.startswith(".tmp-"), f"unexpected entry in {root}: {p.name}"


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)



@pytest.fixture(scope="module")
def trained_run(warm_cache, corpus, tmp_path_factory):
    """A tiny run trained in-process for 4 steps, with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("reliability-run") / "run"
    train(tiny_cfg(warm_cache, corpus, out, max_steps=4, save_every=2), progress=False)
    return out


def copy_run(src: Path, dst: Path, checkpoints: bool = True) -> Path:
    """A copy of a run folder that is a run of its own (run.yaml's output names the copy)."""
    shutil.copytree(src, dst, ignore=None if checkpoints else shutil.ignore_patterns("checkpoints"))
    cfg = yaml.safe_load((dst / "run.yaml").read_text())
    (dst / "run.yaml").write_text(yaml.safe_dump({**cfg, "output": str(dst)}, sort_keys=False))
    return dst


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
