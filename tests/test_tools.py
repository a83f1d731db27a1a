"""The pure parts of the measurement tools in tools/ (their runs are benchmarks, not tests)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import thread_profile  # noqa: E402

# lines as `perf script -F tid,ip,sym,dso -G` prints them (paths shortened), one per sample
PERF_SCRIPT = """\
   101      7faa7fdc0503 [unknown] (/tmp/perf-101.map)
   102      7faa7fdc02f9 [unknown] (/tmp/perf-101.map)
   102      7faac121de62 [unknown] (/site-packages/torch/lib/libgomp.so.1)
   102      7faac121de62 [unknown] (/site-packages/torch/lib/libgomp.so.1)
   102      7faac121e02a [unknown] (/site-packages/torch/lib/libgomp.so.1)
   101      7fbc42ca3f16 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)
   101          ecf0c80 dnnl::impl::cpu::x64::matmul::brgemm_matmul_t<13168>::compute_kernel (/torch/lib/libtorch_cpu.so)
   101          1234567 c10::impl::OperatorEntry::lookup (/torch/lib/libtorch_cpu.so)
   101          2345678 dequantizeBlockwise4bitCpu<bf16_t, 1> (/site-packages/bitsandbytes/libbitsandbytes_cpu.so)
   101          3456789 kernel._omp_fn.0 (/tmp/torchinductor_root/cu/cujcwjxrknb7.main.so)
   101          4567890 _int_malloc (/usr/lib/x86_64-linux-gnu/libc.so.6)
   101     ffffffff81000 clear_page_erms ([kernel.kallsyms])
"""


def test_thread_profile_groups_samples_by_thread_and_code():
    per_tid = thread_profile.parse_perf_script(PERF_SCRIPT)
    assert set(per_tid) == {101, 102}
    main, worker = per_tid[101], per_tid[102]
    assert worker == {"GEMM": 1, "OpenMP wait": 3}
    assert main["GEMM"] == 2  # the JIT map and oneDNN's own C++ code inside libtorch_cpu
    assert main["Python"] == 1 and main["torch"] == 1 and main["dequantize"] == 1 and main["compiled"] == 1
    assert main["libc / kernel"] == 2
    assert sum(main.values()) == 8


def test_thread_profile_report_states_the_workers_wait_share():
    per_tid = thread_profile.parse_perf_script(PERF_SCRIPT * 10)
    text = thread_profile.report("qlora", per_tid, 101, [2.0, 2.0, 2.0], 499)
    assert "| main | 80 |" in text and "| worker 102 | 40 |" in text
    assert "waited for work 75%" in text  # 3 of the worker's 4 samples are in libgomp
    assert "1.50 s of the median step" in text
