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
    """The kernels flag is oneDNN's, what torch's compiler asks; on x86 it needs AVX-512 (AVX2 is not enough).
    auto's bf16 needs the kernels and a measured speed-up on top."""
    kernels = precision.cpu_has_bf16_kernels()
    assert kernels == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX"):
        assert not kernels
    assert precision.cpu_has_fast_bf16() == (kernels and precision.cpu_bf16_speedup() >= precision.BF16_MIN_SPEEDUP)


@pytest.fixture
def no_speedup_yet(monkeypatch, tmp_path):
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_speedup", None)
    return tmp_path


@pytest.mark.parametrize("speedup,dtype", [(0.55, "float32"), (0.99, "float32"), (1.0, "bfloat16"), (6.8, "bfloat16")])
def test_auto_needs_bf16_kernels_that_outrun_float32(monkeypatch, no_speedup_yet, speedup, dtype):
    """A Xeon with avx512_bf16 and no AMX measured 0.54-0.60x (bf16 slower: float32), one with AMX ~7x."""
    monkeypatch.setattr(precision, "cpu_has_bf16_kernels", lambda: True)
    monkeypatch.setattr(precision, "_measure_bf16_speedup", lambda: speedup)
    assert precision.resolve_compute_dtype("auto", "cpu") == dtype
    if dtype == "float32":  # an explicit bf16 there warns with the measured figure
        with pytest.warns(UserWarning, match=rf"measured {speedup:.2f}x float32's rate"):
            assert precision.resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"


def test_the_speedup_is_measured_once_per_machine_and_kept(monkeypatch, no_speedup_yet):
    """Where oneDNN has bf16 kernels: a real measurement (a positive rate ratio), kept in the cache, so that a
    new process (here: a cleared in-process value) reads it instead of measuring; without them nothing is
    measured (a bf16 product would take seconds) and the speed-up is 0."""
    if not precision.cpu_has_bf16_kernels():
        monkeypatch.setattr(precision, "_measure_bf16_speedup", lambda: pytest.fail("measured without kernels"))
        assert precision.cpu_bf16_speedup() == 0.0 and not precision.cpu_has_fast_bf16()
        return
    first = precision.cpu_bf16_speedup()
    assert 0 < first < 100
    record = no_speedup_yet / "cpu_bf16_speedup.json"
    assert list(__import__("json").loads(record.read_text()).values()) == [first]
    monkeypatch.setattr(precision, "_speedup", None)
    monkeypatch.setattr(precision, "_measure_bf16_speedup", lambda: pytest.fail("measured again"))
    assert precision.cpu_bf16_speedup() == first


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
