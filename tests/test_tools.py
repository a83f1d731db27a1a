"""The pure parts of the measurement tools in tools/ (their runs are benchmarks, not tests), and the
worker protocol that tools/bench_methods.py --against-tree shares with other checkouts."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools import bench_methods, bench_peft, harness, profile_step

ROOT = Path(__file__).resolve().parents[1]


def test_profile_step_reads_gemm_flops_and_kinds_from_recorded_shapes():
    """mm (with and without out=, as inductor calls it), addmm and bmm, as the profiler records their
    input shapes: the FLOPs are 2·b·m·k·n of the two multiplied operands, whatever else is recorded."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    a, b, bias, out = torch.randn(64, 32), torch.randn(32, 16), torch.randn(16), torch.empty(64, 16)
    ba, bb = torch.randn(3, 8, 5), torch.randn(3, 5, 7)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.mm(a, b)
        torch.mm(a, b, out=out)
        torch.addmm(bias, a, b)
        torch.bmm(ba, bb)
    got = sorted((e.key, profile_step.mm_flops(e.key, [list(s) for s in e.input_shapes]))
                 for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    assert got == [("aten::addmm", 2 * 64 * 32 * 16), ("aten::bmm", 2 * 3 * 8 * 5 * 7),
                   ("aten::mm", 2 * 64 * 32 * 16), ("aten::mm", 2 * 64 * 32 * 16)]
    assert profile_step.gemm_kind("aten::mm", [[1024, 576], [576, 49152]], 16, 49152) == "head (loss chunks)"
    assert profile_step.gemm_kind("aten::addmm", [[1536], [1024, 16], [16, 1536]], 16, 49152) == "adapters (rank 16)"
    assert profile_step.gemm_kind("aten::addmm_", [[1024, 1536], [1024, 16], [16, 1536]], 16, 49152) == "adapters (rank 16)"
    assert profile_step.mm_flops("aten::addmm_", [[1024, 1536], [1024, 16], [16, 1536]]) == 2.0 * 1024 * 16 * 1536
    assert profile_step.gemm_kind("aten::mm", [[48, 1024], [1024, 576]], 16, 49152) == "adapters (rank 16)"  # q/k/v's
    assert profile_step.gemm_kind("aten::mm", [[1024, 576], [576, 192]], 16, 49152) == "base linears"  # k_proj
    assert profile_step.gemm_kind("aten::mm", [[1024, 576], [576, 1536], [1024, 1536]], 16, 49152) == "base linears"
    assert profile_step.gemm_kind("aten::bmm", [[9, 256, 64], [9, 64, 256]], 16, 49152) == "attention (batched)"


def test_profile_step_perf_groups_perf_report_rows():
    """--perf: the rows of `perf report --stdio --sort dso,sym` (percent, object, [.] symbol), and the group
    each sample's object and symbol falls in, the first group that matches."""
    text = """# Samples: 15K of event 'cycles:P'
#
    38.35%  libtorch_cpu.so                                             [.] mkl_blas_avx512_sgemm_kernel_0
     2.76%  libgomp.so.1                                                [.] 0x000000000001de62
     1.67%  libtorch_cpu.so                                             [.] Sleef_finz_expf16_u10avx512f
     1.53%  libtorch_cpu.so                                             [.] c10::function_ref<void (char**, long const*)>::callback_fn
     1.42%  c5c6vrnzxtjnjgeozfymavupwzmdwqp.main.so                     [.] kernel._omp_fn.0
     1.04%  libpython3.11.so.1.0                                        [.] gc_collect_main
     0.28%  libc.so.6                                                   [.] _int_malloc
     0.25%  [kernel.kallsyms]                                           [k] exc_page_fault
     0.26%  libtorch_cpu.so                                             [.] omp_parallel_acopy
                --0.65%--0
"""
    rows = profile_step.parse_perf_report(text)
    assert [r[0] for r in rows] == [38.35, 2.76, 1.67, 1.53, 1.42, 1.04, 0.28, 0.25, 0.26]
    assert rows[3][2] == "c10::function_ref<void (char**, long const*)>::callback_fn"
    assert [profile_step.perf_group(dso, sym).split(" ")[0] for _, dso, sym in rows] == [
        "GEMM", "OpenMP", "vector", "ATen", "inductor's", "Python", "libc", "OS", "GEMM"]
    assert profile_step.perf_group("libfoo.so", "bar") == "other"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX2 is an x86 instruction set")
def test_isa_cap_restarts_the_process_with_avx2_kernels_and_records_it(tmp_path, monkeypatch):
    """--isa avx2 (harness.cap_isa): the process re-executes itself with the caps, so that torch's own kernels run
    AVX2 code (whatever more the CPU has), and the machine record names the caps; the report's CPU class says the
    AVX2-only class is emulated."""
    code = ("import os, torch; from tools import harness as h; h.cap_isa('avx2'); "
            "import json; print(json.dumps({'isa': torch.backends.cpu.get_cpu_capability(), "
            "'caps': h.cpu_bf16()['isa_caps']}))")
    env = {**os.environ, "QTUNE_CACHE": str(tmp_path)}
    for k in harness.ISA_VARS:
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["isa"] == "AVX2" and got["caps"] == harness.ISA_CAPS["avx2"]
    assert "--isa avx2: restarting with ATEN_CPU_CAPABILITY=avx2" in out.stderr
    machine = {"bf16_kernels": False, "bf16_speedup": 0.0, "isa": "AVX2", "isa_caps": got["caps"]}
    assert harness.cpu_class(machine).startswith("AVX2 code paths forced on a CPU with more (ATEN_CPU_CAPABILITY=avx2")
    assert "AVX2-only class emulated" in harness.cpu_class(machine)
    assert harness.cpu_class({**machine, "isa": "AVX512", "isa_caps": {}}) == "no bf16 kernels (AVX2-only class)"
    for k in harness.ISA_VARS:
        monkeypatch.delenv(k, raising=False)
    assert harness.isa_note() == ""
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert harness.isa_note() == ", instruction sets capped: MKL_ENABLE_INSTRUCTIONS=AVX2"


def test_bench_methods_median_interval_brackets_the_median_and_pools_files(tmp_path):
    xs = [1.0 + 0.01 * k for k in range(101)]  # median 1.5
    lo, hi = bench_methods.median_interval(xs)
    assert 1.35 < lo < 1.5 < hi < 1.65
    assert bench_methods.median_interval([1.2] * 9) == (1.2, 1.2)
    for name, ratios in (("a.json", [1.0, 1.1, 1.2]), ("b.json", [1.3, 1.4])):
        (tmp_path / name).write_text(json.dumps({"rounds": [{"qrosa": {"pair_ratios": ratios}}]}))
    text = bench_methods.pool([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "qrosa: median 1.200x over 5 step pairs" in text


def test_bench_methods_summarizes_a_single_step_pair():
    """A smoke run (--repeats 1 --steps 1) has one pair: its ratio, with no spread."""
    rounds = [{"qdora": {"s": 1.1, "qlora_s": 1.0, "pair_ratios": [1.1], "heldout_after": 3.0,
                         "qlora_heldout_after": 3.0}}]
    s = bench_methods.summarize(rounds, ["qdora"])["qdora"]
    assert s["ratio"] == 1.1 and s["pairs"] == 1 and s["pair_quartiles"] == [1.1, 1.1]
    assert s["median_interval"] == [1.1, 1.1] and s["round_pair_medians"] == [1.1] and s["goal"] == 1.15


def _bench_peft_report(dtype: str, peer_s: float) -> dict:
    side = {"s_per_step": 2.0, "tokens_per_s": 500.0, "peak_rss_gib": 1.0, "process_peak_rss_gib": 1.2,
            "heldout_before": 4.0, "heldout_after": 3.5}
    peer = side | {"s_per_step": peer_s, "tokens_per_s": 500.0 * 2.0 / peer_s, "peak_rss_gib": 2.5,
                   "process_peak_rss_gib": 2.6}
    ratios = {"tokens_per_s": peer_s / 2.0, "peak_rss": 0.4, "process_peak_rss": 1.2 / 2.6, "heldout_after": 1.0}
    return {"args": {"compute_dtype": dtype, "plays": 4, "warmup": 2, "steps": 20, "repeats": 2},
            "machine": {"cpu": "test cpu", "threads": 2},
            "data": {"train_rows": 100, "heldout_rows_used": [0, 1], "heldout_label_tokens": 500},
            "gemm": {"start": {"gflops": 100.0}, "end": {"gflops": 100.0}, "gflops": 100.0},
            "flops": {"total": 120e9}, "methods": ["qlora"], "peer_pissa_prep": None,
            "results": {"qlora": {"qtune": side, "peer": peer, "ratios": ratios}}}


def test_bench_peft_fp32_report_names_its_dtype_and_keeps_the_bf16_table(tmp_path):
    bench_peft.write_report(_bench_peft_report("bfloat16", 5.0), tmp_path)
    bench_peft.write_report(_bench_peft_report("float32", 4.0), tmp_path)
    bf16, fp32 = (tmp_path / "bench_peft.md").read_text(), (tmp_path / "bench_peft_fp32.md").read_text()
    assert "bf16 compute (peer: autocast bf16)" in bf16 and "bf16 GEMM rate" in bf16
    assert "fp32 compute (peer: fp32 model, bnb compute dtype fp32, no autocast)" in fp32 and "fp32 GEMM rate" in fp32
    # 120 GFLOP in 2.0 s at 100 GFLOP/s: 60% of the limit; the peer's 4.0 s: 30%
    assert "| qlora | qtune | 2.000 | 500 |" in fp32 and "| 60.0% | 2.00× |" in fp32 and "| 30.0% |" in fp32
    assert "tokens/s ≥ 2.0× peer: 2.00× PASS" in fp32 and "2.50×" in bf16  # the bf16 table is not overwritten
    assert (tmp_path / "bench_peft_fp32.png").is_file() and (tmp_path / "bench_peft_fp32.json").is_file()


def test_bench_peft_auto_report_checks_each_run_against_its_budget(tmp_path):
    """--recompute auto --max-memory peer --tag auto: its own file, the auto goal (≥ 2.5×), and each qtune run's
    peak RSS against the budget it was given (not the default policy's ≤ 0.5×)."""
    report = _bench_peft_report("bfloat16", 6.0)
    report["args"]["tag"] = "auto"
    report["machine"].update(recompute="auto", max_memory="peer")
    run = {"train_peak_rss_bytes": 1.5 * 2**30, "max_memory_gib": 1.9,
           "execution": {"recompute": {"level": "weights"}}}
    report["results"]["qlora"]["runs"] = {"qtune": [run, dict(run)], "peer": []}
    bench_peft.write_report(report, tmp_path)
    text = (tmp_path / "bench_peft_auto.md").read_text()
    assert not (tmp_path / "bench_peft.md").exists()
    assert "the policy the qtune runs ran: qlora weights at 1.90 GiB, qlora weights at 1.90 GiB" in text
    assert "tokens/s ≥ 2.5× peer: 3.00× PASS (3× moonshot: reached)" in text
    assert "each run's peak RSS within its --max-memory: PASS" in text
    report["results"]["qlora"]["runs"]["qtune"][1]["train_peak_rss_bytes"] = 2 * 2**30  # over its 1.9 GiB
    bench_peft.write_report(report, tmp_path)
    assert "each run's peak RSS within its --max-memory: FAIL" in (tmp_path / "bench_peft_auto.md").read_text()
    report["args"]["compute_dtype"] = "float32"  # the float32 goal (AVX2-only CPUs) is 2.0x, with no moonshot
    bench_peft.write_report(report, tmp_path)
    text = (tmp_path / "bench_peft_fp32_auto.md").read_text()
    assert "tokens/s ≥ 2.0× peer: 3.00× PASS;" in text and "moonshot" not in text


def test_worker_command_is_the_protocol_every_checkout_speaks(tmp_path):
    """--against-tree runs the other checkout's own tools/bench_peft.py with only the flags every
    checkout's worker knows, its qtune first on PYTHONPATH. --compute-dtype always: a worker's default is auto,
    which is float32 on CPUs whose bf16 GEMMs are slower, so a bf16 benchmark must say bf16."""
    args = SimpleNamespace(model_dir=Path("/models/smol"), steps=1, warmup=0, threads=0, compute_dtype="bfloat16")
    old = tmp_path / "old"
    cmd, result, log = harness.worker_command(args, tmp_path, "qtune", "qlora", "qlora-0", tree=old)
    assert cmd[0] == sys.executable and result == tmp_path / "qlora-0.json" and log == tmp_path / "qlora-0.log"
    assert cmd[1:] == [str(old / "tools" / "bench_peft.py"), "--worker", "qtune", "qlora", "--work", str(tmp_path),
                       "--result", str(result), "--model-dir", "/models/smol", "--steps", "1", "--warmup", "0",
                       "--compute-dtype", "bfloat16"]
    args.threads, args.compute_dtype = 2, "float32"
    cmd, _, _ = harness.worker_command(args, tmp_path, "peer", "qdora", "t")
    assert cmd[1] == str(ROOT / "tools" / "bench_peft.py")  # this checkout's own worker, same entry point
    assert cmd[-4:] == ["--threads", "2", "--compute-dtype", "float32"]
    assert harness.worker_env(old)["PYTHONPATH"].split(os.pathsep)[0] == str(old.resolve())
    assert harness.worker_env()["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_bench_peft_runs_as_a_file_outside_the_repository(tmp_path):
    """`python tools/bench_peft.py` (how every checkout's workers start) imports its harness without the
    repository root on sys.path; here it rebuilds a report from raw runs."""
    report = _bench_peft_report("float32", 4.0)
    run = {"step_times_s": [2.0, 2.0], "step_tokens": [1000, 1000], "train_peak_rss_bytes": 2**30,
           "peak_rss_bytes": 2**30, "heldout_before": 4.0, "heldout_after": 3.5}
    report["results"]["qlora"]["runs"] = {"qtune": [run], "peer": [run | {"step_times_s": [4.0, 4.0]}]}
    (tmp_path / "bench_peft_fp32.json").write_text(json.dumps(report))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_peft.py"), "--report-only", "--compute-dtype",
                          "float32", "--out-dir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| qlora | qtune | 2.000 | 500 |" in out.stdout and "tokens/s ≥ 2.0× peer: 2.00× PASS" in out.stdout


def test_bench_cli_runs_qtune_train_with_the_bench_workers_config(tmp_path, monkeypatch):
    """tools/bench_cli compares `qtune train` with bench_peft's qtune worker: its flags must give the worker's own
    TrainConfig (harness.bench_config), field by field, apart from what only the CLI run has (data, schedule of
    evaluation and checkpoints)."""
    import dataclasses

    from click.testing import CliRunner

    import qtune.train
    from qtune.cli import main
    from tools import bench_cli

    own = {"model", "data", "eval_data", "eval_every", "eval_batches", "save_every"}
    for max_memory in (None, 2.5):  # --max-memory: the worker gets it as MAX_MEMORY_ENV, the CLI as the flag
        args = SimpleNamespace(model_dir=tmp_path / "m", warmup=2, steps=3, compute_dtype="bfloat16", recompute="max",
                               max_memory=max_memory)
        seen = {}
        monkeypatch.setattr(qtune.train, "train", lambda cfg, **kw: seen.setdefault("cfg", cfg))
        res = CliRunner().invoke(main, ["train", *bench_cli.cli_flags(args, tmp_path, tmp_path / "run")])
        assert "cfg" in seen, res.output
        want = harness.bench_config("qlora", 5, "bfloat16", tmp_path / "run", recompute="max",
                                    **({"max_memory": max_memory} if max_memory else {}))
        got = {f.name: getattr(seen["cfg"], f.name) for f in dataclasses.fields(want) if f.name not in own}
        assert got == {f.name: getattr(want, f.name) for f in dataclasses.fields(want) if f.name not in own}
    assert seen["cfg"].data == str(tmp_path / "train") and seen["cfg"].eval_every == 0
    assert seen["cfg"].model is None and want.model is None  # both: the embedded GGUF, the same NF4 codes


def test_auto_margin_brackets_the_rss_auto_chose_with(tmp_path, monkeypatch, compiled):
    """tools/auto_margin infers from a benchmark run's budget and the policy auto chose the RSS the process had at the
    choice: run auto itself (qtune.plan.resolve_recompute; compiled layers, where `weights` holds copies) at a known RSS
    and a budget short of every layer's copy; the inferred interval must hold that RSS, and what the run needed beyond
    plan and RSS must bracket the truth."""
    import dataclasses

    import qtune.memory
    import qtune.plan
    from tools import auto_margin

    cfg = harness.bench_config("qlora", 22, "float32", tmp_path / "run")
    rss = int(0.6 * 2**30)
    monkeypatch.setattr(qtune.memory, "current_rss_bytes", lambda: rss)
    full = auto_margin.need(cfg, "weights", 0)[1]
    budget_gib = (full + rss + qtune.plan.AUTO_CPU_RSS_FIXED) / (1 - qtune.plan.AUTO_CPU_RSS_FRACTION) / 2**30 - 0.05
    level, held = qtune.plan.resolve_recompute(dataclasses.replace(cfg, recompute="auto", max_memory=budget_gib))
    assert level == "weights" and 0 < held < qtune.plan.plan_memory(dataclasses.replace(cfg, recompute="weights")).layers
    plan = auto_margin.need(cfg, level, held)[0]
    extra = 2**28  # what the run "needed" beyond the plan and the RSS at the choice
    run = {"max_memory_gib": budget_gib, "execution": {"recompute": {"level": level, "held_layers": held}},
           "train_peak_rss_bytes": rss + plan + extra}
    path = tmp_path / "bench_peft_auto.json"
    path.write_text(json.dumps({"args": {"warmup": 2, "steps": 20, "compute_dtype": "float32"},
                                "results": {"qlora": {"runs": {"qtune": [run]}}}}))
    (row,) = auto_margin.analyse(path, qtune.plan.AUTO_CPU_RSS_FIXED)
    low, high = row["r"]
    assert row["held"] == held and low < rss <= high, (low, rss, high)
    assert row["needed"][0] <= extra < row["needed"][1]
    assert "weights" in auto_margin.table([row], qtune.plan.AUTO_CPU_RSS_FIXED)
