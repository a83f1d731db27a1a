"""--compute-dtype auto: what it resolves to per device, that a run records the resolved dtype, that
a resume accepts `auto` for it, and that an explicit bf16 on a CPU without bf16 kernels warns."""

import warnings

import pytest
import torch
import yaml

from qtune import precision
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.train import resume_config, train
from test_train import text_file, tiny_cfg


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_cpu_follows_the_bf16_kernels(monkeypatch, fast):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    assert precision.resolve_compute_dtype("auto", "cpu") == ("bfloat16" if fast else "float32")


def test_auto_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_compute_dtype("auto", "cuda") == "float16"  # pre-Ampere
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_compute_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # qtune plan --device cuda on a CPU machine
    assert precision.resolve_compute_dtype("auto", torch.device("cuda")) == "bfloat16"


def test_the_detection_agrees_with_torch():
    """The flag is oneDNN's, what torch's compiler asks; on x86 it needs AVX-512 (AVX2 is not enough)."""
    fast = precision.cpu_has_fast_bf16()
    assert fast == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX"):
        assert not fast


def test_explicit_bf16_on_a_slow_cpu_warns_and_is_kept(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"--compute-dtype auto .* or float32"):
        assert precision.resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_compute_dtype("float32", "cpu") == "float32"
        assert precision.resolve_compute_dtype("bfloat16", "cpu", warn=False) == "bfloat16"
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
        assert precision.resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"


def test_unknown_dtype_is_refused_naming_auto():
    assert TrainConfig().compute_dtype == "auto"
    with pytest.raises(QtuneError, match="use auto, bfloat16, float32 or float16"):
        TrainConfig(compute_dtype="fp8")


def test_a_run_records_what_auto_chose_and_resumes_with_auto(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)  # this CPU, as an AVX2-only one
    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_llama, text_file(tmp_path), run, compute_dtype="auto", max_steps=2, eval_every=0, save_every=2)
    train(cfg, progress=False)
    assert yaml.safe_load((run / "run.yaml").read_text())["compute_dtype"] == "float32"
    assert resume_config(run, {"compute_dtype": "auto"}).compute_dtype == "float32"
    with pytest.raises(QtuneError, match="compute_dtype"):
        resume_config(run, {"compute_dtype": "bfloat16"})
