"""qtune.engine.compiled.check_half_kernels: a machine whose C++ compiler miscompiles inductor's 512-bit bf16
kernels (seen: a Xeon with avx512_bf16 and no AMX, torch 2.13.0, g++ 12.2, where checkpointed compiled blocks
trained to NaN) gets 256-bit kernels, or no compiling, with a warning; the verdict is kept per machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qtune.engine.compiled as qc


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """compiling on, an empty cache, and inductor's simdlen and qtune's note restored afterwards."""
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(qc, "_chosen_dir", str(tmp_path / "inductor"))  # what _cache_dir points inductor at
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


X86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX2 is an x86 instruction set")

BLOCK_SOFTMAX_CHECK = """
import json, torch
from qtune.engine.compiled import inductor_cache_dir
from qtune.engine.loss import _block_softmax
g = torch.Generator().manual_seed(0)
worst = 0.0
for c in (256, 255):
    z, t = torch.randn(c, 4096, generator=g), torch.randint(0, 8192, (c,), generator=g)
    m, s, zy = torch.full((c,), -1e30), torch.zeros(c), torch.zeros(c)
    e, m2, s2, _, _ = _block_softmax(z, t, 4096, m, s, zy)
    ref = torch.exp(z - z.amax(1, keepdim=True))
    worst = max(worst, (e - ref).abs().max().item(), ((s2 - ref.sum(1)) / ref.sum(1)).abs().max().item())
print(json.dumps({"worst": worst, "isa": torch.backends.cpu.get_cpu_capability(), "dir": inductor_cache_dir()}))
"""


@X86
def test_compiled_kernels_stay_right_when_the_cache_is_shared_by_two_vector_isas(tmp_path):
    """One $QTUNE_CACHE, read first by a process whose kernels are AVX-512 (where the CPU has it) and then by one
    capped at AVX2 (what a home folder shared by two CPU classes sees): each compiles its own C++ for its own
    ISA (inductor_cache_dir), so the compiled block softmax equals the eager one in both. With one inductor
    folder for both, the AVX2 process reused the AVX-512 graph's 16-lane C++ built with 8-lane vectors: wrong
    sums (off by 100 and more), then a segmentation fault."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", qc._BASE_ENV,
                                                             "ATEN_CPU_CAPABILITY")}
    env.update(QTUNE_CACHE=str(tmp_path), QTUNE_COMPILE="1")
    root = Path(__file__).resolve().parents[1]
    seen = []
    for caps in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        out = subprocess.run([sys.executable, "-c", BLOCK_SOFTMAX_CHECK], cwd=root, env={**env, **caps},
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        seen.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert [r["worst"] < 1e-5 for r in seen] == [True, True], seen
    assert seen[1]["isa"] == "AVX2" and seen[1]["dir"].endswith("cpu-avx2")
    assert all(r["dir"].startswith(str(tmp_path / "inductor")) for r in seen)


@X86
def test_a_users_inductor_folder_gets_the_per_isa_folders_too(tmp_path):
    """TORCHINDUCTOR_CACHE_DIR set by the user: the ISA folders go inside it, and a child process (whose
    TORCHINDUCTOR_CACHE_DIR is then the parent's ISA folder) keeps the same base; torch's own default is not
    taken as the user's."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    code = ("import os, subprocess, sys; from qtune.engine import compiled as qc; qc._cache_dir(); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR']); sys.stdout.flush(); "
            "subprocess.run([sys.executable, '-c', 'from qtune.engine.compiled import inductor_cache_dir as d; "
            "print(d())'], env={**os.environ, 'ATEN_CPU_CAPABILITY': 'avx2'}, check=True)")
    root = Path(__file__).resolve().parents[1]
    for user, base in ((str(tmp_path / "mine"), tmp_path / "mine"), (default_cache_dir(), tmp_path / "q" / "inductor")):
        env = {k: v for k, v in os.environ.items() if k not in (qc._BASE_ENV, "ATEN_CPU_CAPABILITY")}
        env.update(TORCHINDUCTOR_CACHE_DIR=user, QTUNE_CACHE=str(tmp_path / "q"))
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             check=True, timeout=300).stdout.split()
        assert Path(out[0]).parent == base and Path(out[0]).name.startswith("cpu-"), out
        assert out[1] == str(base / "cpu-avx2"), out
