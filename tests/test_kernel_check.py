"""qtune.engine.compiled.check_half_kernels: a machine whose C++ compiler miscompiles inductor's 512-bit bf16
kernels (seen: a Xeon with avx512_bf16 and no AMX, torch 2.13.0, g++ 12.2, where checkpointed compiled blocks
trained to NaN) gets 256-bit kernels, or no compiling, with a warning; the verdict is kept per machine."""

from __future__ import annotations

import json

import pytest
import torch

import qtune.engine.compiled as qc


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """compiling on, an empty cache, and inductor's simdlen and qtune's note restored afterwards."""
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(qc, "_enabled", True)
    monkeypatch.setattr(qc, "_failed", False)
    monkeypatch.setattr(qc, "KERNEL_NOTE", None)
    monkeypatch.setattr(qc, "_verdicts", {})
    with inductor_config.patch({"cpp.simdlen": None}):  # inductor's default (the vector ISA's width), restored after
        yield tmp_path


def test_after_the_check_compiled_bf16_kernels_are_correct(fresh):
    """On this machine's real compiler: whatever the verdict, the kernels compiled afterwards (under the setting
    the check left) equal the eager results, bit for bit, at several shapes."""
    note = qc.check_half_kernels(torch.bfloat16)
    record = json.loads((fresh / "kernel_check.json").read_text())
    assert list(record.values()) in (["ok"], ["simdlen 256"], ["eager"])
    assert (note is None) == (list(record.values()) == ["ok"])
    if qc._failed:
        return  # compiling is off: nothing compiled to check
    g = torch.Generator().manual_seed(1)

    def f(x, y):
        return x.t().contiguous().float(), (y * 2).t().contiguous(), x.float().softmax(-1).to(x.dtype)

    for shape in [(64, 64), (32, 96), (256, 192)]:
        x, y = (torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(2))
        got = torch.compile(f, fullgraph=True, dynamic=False)(x, y)
        for a, b in zip(got, f(x, y)):
            assert torch.equal(a, b), shape
        torch._dynamo.reset()


def test_a_miscompiling_machine_gets_256_bit_kernels_and_a_warning(fresh, monkeypatch):
    from torch._inductor import config as inductor_config

    seen = []

    def fake(dtype, tag):  # 512-bit kernels wrong, 256-bit right; records the simdlen each check ran under
        seen.append((tag, inductor_config.cpp.simdlen))
        return tag == "256"

    monkeypatch.setattr(qc, "_half_kernels_correct", fake)
    with pytest.warns(UserWarning, match="512-bit bfloat16 CPU kernels came out wrong.*compiles 256-bit kernels instead"):
        note = qc.check_half_kernels(torch.bfloat16)
    assert seen == [("512", None), ("256", 256)]  # the first under inductor's default width (None: the ISA's)
    assert inductor_config.cpp.simdlen == 256 and "256-bit" in note and qc.KERNEL_NOTE == note and not qc._failed
    # the verdict is kept: the next process (here: a call with this process's memory cleared) compiles nothing
    # and applies it again
    inductor_config.cpp.simdlen = None  # the fixture's patch restores what it was before the test
    monkeypatch.setattr(qc, "_verdicts", {})
    monkeypatch.setattr(qc, "_half_kernels_correct", lambda *a: pytest.fail("checked again"))
    with pytest.warns(UserWarning, match="256-bit"):
        assert qc.check_half_kernels(torch.bfloat16) == note
    assert inductor_config.cpp.simdlen == 256


def test_a_machine_where_both_widths_are_wrong_runs_eagerly(fresh, monkeypatch):
    monkeypatch.setattr(qc, "_half_kernels_correct", lambda dtype, tag: False)
    with pytest.warns(UserWarning, match="runs eagerly"):
        note = qc.check_half_kernels(torch.bfloat16)
    assert qc._failed and not qc.enabled() and "compiling off" in note


def test_float32_and_compiling_off_check_nothing(fresh, monkeypatch):
    monkeypatch.setattr(qc, "_half_kernels_correct", lambda *a: pytest.fail("checked"))
    assert qc.check_half_kernels(torch.float32) is None
    monkeypatch.setattr(qc, "_enabled", False)
    assert qc.check_half_kernels(torch.bfloat16) is None
    assert not (fresh / "kernel_check.json").exists()
