"""Multi-process training (qtune.distributed, qtune.fsdp) on the CPU with gloo: 2 processes train as one
process with their global batch (losses, held-out losses, the final adapter and optimizer state within 1e-5 in
fp32), for ddp and fsdp, on chat data whose rows carry different numbers of labelled tokens (so that the
loss scaling by the global count is tested); resume under another number of processes; a killed rank; the
export; the per-rank plan; the cache lock; and each bad input's named error.

The 2-process runs are real `qtune train --nproc-per-node 2` subprocesses (torchrun's API, gloo) on conftest's
tiny random Llama, --no-compile (eager: a few seconds each); the 1-process references run in-process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qtune.cli import main
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.train import read_metrics, train

from reliability import REPO, SUBPROCESS_TIMEOUT, _one_thread, max_abs_diff, metric_rows, subprocess_env  # noqa: F401

STEPS = 4


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """Chat examples of 1 to 12 answer words: rows of the packed data differ in their labelled tokens."""
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        q = " ".join(rng.choice(["what", "is", "the", "sea", "fox", "two", "Paris"]) for _ in range(rng.randint(2, 8)))
        a = " ".join(rng.choice(["arr", "matey", "four", "the", "capital", "be"]) for _ in range(rng.randint(1, 12)))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    path = tmp_path_factory.mktemp("dist-data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def flags(model, data, out, **kw) -> dict:
    base = dict(model=str(model), data=str(data), output=str(out), seq_len=64, rank=4, alpha=8, compute_dtype="float32",
                max_steps=STEPS, eval_every=2, save_every=2, warmup_steps=1, lr=3e-3, keep_checkpoints=5, compile=False,
                batch_size=4)
    base.update(kw)
    return base


def argv(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(name if v else "--no-" + name[2:])
        else:
            out += [name, str(v)]
    return out


def launch(values: dict, nproc: int = 2, extra=(), wait: bool = True):
    cmd = [sys.executable, "-m", "qtune", "train", *argv(values), "--nproc-per-node", str(nproc), *extra]
    if not wait:
        return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def reference(model, data, out, **kw) -> Path:
    train(TrainConfig(**flags(model, data, out, **kw)), progress=False)
    return out


def curve(run: Path) -> tuple[dict, dict]:
    rows = read_metrics(run / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)), f"a step logged twice (only rank 0 writes): {train_steps}"
    return ({r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r})


def assert_same_run(run: Path, ref: Path, tol: float = 1e-5) -> None:
    (loss, ev), (ref_loss, ref_ev) = curve(run), curve(ref)
    assert sorted(loss) == sorted(ref_loss) and set(ref_ev) <= set(ev)  # a resumed run also scored its first end
    for k in ref_loss:
        assert loss[k] == pytest.approx(ref_loss[k], rel=tol), (k, loss, ref_loss)
    for k in ref_ev:
        assert ev[k] == pytest.approx(ref_ev[k], rel=tol), (k, ev, ref_ev)
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    ref_norms = {r["step"]: r["grad_norm"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r}
    for k in ref_norms:  # the global gradient norm (and clipping to 1: these are above it)
        assert norms[k] == pytest.approx(ref_norms[k], rel=1e-4), (k, norms, ref_norms)
    last = f"checkpoints/step-{max(ref_loss):06d}"
    a, b = load_file(run / last / "adapter.safetensors"), load_file(ref / last / "adapter.safetensors")
    # the adapters (entries ~0.1) within 1e-5: Adam's update m/√v turns the rounding of a near-zero gradient
    # (its sum in another order) into a visible step, so the entries agree to ~1e-6, not to the last bit
    assert max_abs_diff(a, b) <= tol, max_abs_diff(a, b)
    oa, ob = load_file(run / last / "optimizer.safetensors"), load_file(ref / last / "optimizer.safetensors")
    assert sorted(oa) == sorted(ob)
    for k in ob:  # each moment tensor within 1e-4 of its own largest entry
        assert float((oa[k].double() - ob[k].double()).abs().max()) <= 1e-4 * float(ob[k].double().abs().max()) + 1e-12, k


@pytest.fixture(scope="module")
def ref_b4(tiny_llama, chat, tmp_path_factory):
    """One process, batch 4, no accumulation."""
    return reference(tiny_llama, chat, tmp_path_factory.mktemp("ref") / "b4")


@pytest.fixture(scope="module")
def ref_b2_acc2(tiny_llama, chat, tmp_path_factory):
    """One process, batch 2, two micro-batches per step."""
    return reference(tiny_llama, chat, tmp_path_factory.mktemp("ref") / "b2a2", batch_size=2, grad_accum=2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_as_one_process_with_their_global_batch(tiny_llama, chat, ref_b4, tmp_path, strategy):
    out = tmp_path / strategy
    r = launch(flags(tiny_llama, chat, out, batch_size=2), extra=["--distributed", strategy])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("qtune: done") == 1  # rank 0 reports; the progress bar and summary appear once
    assert_same_run(out, ref_b4)
    start = [x for x in read_metrics(out / "metrics.jsonl") if x.get("event") == "start"][0]
    ref_start = [x for x in read_metrics(ref_b4 / "metrics.jsonl") if x.get("event") == "start"][0]
    assert (start["world_size"], start["distributed"], start["global_batch"]) == (2, strategy, 4)
    assert start["threads_per_rank"] == max(1, len(os.sched_getaffinity(0)) // 2)
    rows = [x for x in read_metrics(out / "metrics.jsonl") if "loss" in x]
    ref_rows = [x for x in read_metrics(ref_b4 / "metrics.jsonl") if "loss" in x]
    assert [x["tokens"] for x in rows] == [x["tokens"] for x in ref_rows]  # global tokens, so global tokens/s
    assert [x["label_tokens"] for x in rows] == [x["label_tokens"] for x in ref_rows]
    assert len({x["label_tokens"] for x in rows}) > 1  # the scaling by the global count is exercised
    base, ref_base = start["quantized_base_bytes_per_rank"], ref_start["quantized_base_bytes_per_rank"]
    if strategy == "fsdp":  # each rank holds its half of every code and scale tensor (dim 0 padded to even)
        assert ref_base / 2 <= base <= ref_base / 2 + 64 * 8, (base, ref_base)
    else:
        assert base == ref_base


# what each method needs to show its distributed part within 4 steps: LoRA-Dash's directions join at step 2 (new
# parameters mid-run), RoSA's support and PiSSA's factors are chosen on rank 0 and read by the other, AdaLoRA's
# budget falls from step 1 (its ranks decided from the summed gradients, the same on every rank)
METHOD_FLAGS = {"loradash": dict(dash_steps=2, dash_directions=2), "qrosa": dict(rosa_mask_steps=2),
                "adalora": dict(budget_start=1, budget_end=3)}
FAST_METHODS = ("qdora", "qpissa", "qrosa", "loradash", "adalora")


@pytest.mark.parametrize("method,strategy", [
    *[pytest.param(m, "ddp", marks=() if m in FAST_METHODS else pytest.mark.slow)
      for m in ("qdora", "qpissa", "qrosa", "loha", "lokr", "ia3", "lntuning", "bitfit", "bone", "bat", "adalora",
                "loradash", "spectral")],
    ("qdora", "fsdp"), ("qrosa", "fsdp"), pytest.param("qpissa", "fsdp", marks=pytest.mark.slow)])
def test_each_method_trains_on_two_processes_as_on_one(tiny_llama, chat, tmp_path, method, strategy):
    extra = dict(method=method, **METHOD_FLAGS.get(method, {}))
    ref = reference(tiny_llama, chat, tmp_path / "ref", **extra)
    out = tmp_path / "run"
    r = launch(flags(tiny_llama, chat, out, batch_size=2, **extra), extra=["--distributed", strategy])
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(out, ref)
    if method == "loradash":  # its directions joined mid-run, on both ranks alike
        reports = [x for x in read_metrics(out / "metrics.jsonl") if x.get("event") == "method"]
        assert reports[-1]["dash_switched"] == reports[-1]["layers"] > 0, reports


def test_fsdp_refuses_what_it_cannot_shard(tiny_llama, chat, tmp_path):
    r = launch(flags(tiny_llama, chat, tmp_path / "a", batch_size=2, method="loha"), extra=["--distributed", "fsdp"])
    assert r.returncode != 0 and "--distributed fsdp runs qtune's decoder block" in r.stdout + r.stderr
    assert "Use --distributed ddp for loha" in r.stdout + r.stderr
    env = subprocess_env()
    env["QTUNE_GENERIC"] = "1"  # the generic path (transformers' forward), as for an architecture qtune's block lacks
    cmd = [sys.executable, "-m", "qtune", "train", *argv(flags(tiny_llama, chat, tmp_path / "b", batch_size=2)),
           "--nproc-per-node", "2", "--distributed", "fsdp"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode != 0 and "this model runs transformers' forward" in r.stdout + r.stderr


@pytest.mark.parametrize("level,after", [("weights", "max"), ("none", "none")])
def test_fsdp_refuses_held_dequantized_weights_and_drops_the_ones_auto_chose(tiny_llama, tmp_path, monkeypatch,
                                                                             level, after):
    """--recompute weights would hold every layer's dequantized base on each rank, undoing the shards: fsdp refuses
    it by name; --recompute auto, resolved for one process before sharding, is stepped down to max there, and
    none (no checkpointing) drops its held copies and stays uncheckpointed."""
    import dataclasses
    import types

    from qtune.config import TrainConfig
    from qtune.engine.linear import DENSE, hold_dense_weights
    from qtune.fsdp import check_supported

    with pytest.raises(QtuneError, match="--recompute weights holds every layer's dequantized base"):
        check_supported(TrainConfig(model=str(tiny_llama), recompute="weights"))
    check_supported(TrainConfig(model=str(tiny_llama), recompute="auto"))  # allowed: resolved per strategy
    import qtune.fsdp
    from qtune.engine import RecomputePolicy
    from qtune.model import build_model

    cfg = TrainConfig(model=str(tiny_llama), data="x", output=str(tmp_path / "r"), compute_dtype="float32")
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    engine = model.qtune_engine
    engine.policy = RecomputePolicy.from_config(dataclasses.replace(cfg, recompute=level))
    for layer in model.model.layers:
        hold_dense_weights(layer, torch.float32)

    class Stop(Exception):
        pass

    def stop(*a, **k):  # the mesh is where sharding starts: what came before it is what is checked
        raise Stop

    monkeypatch.setattr("torch.distributed.device_mesh.init_device_mesh", stop)
    with pytest.raises(Stop):
        qtune.fsdp.shard_model(model, types.SimpleNamespace(world=2), torch.device("cpu"))
    assert engine.policy.keep_weights is False and engine.policy.level == after
    assert engine.policy.keep_mlp is (after == "max") and engine.policy.checkpointing is (after == "max")
    assert not any(DENSE in m._buffers for m in model.modules())


def test_the_generic_path_trains_on_two_processes_with_ddp(tiny_llama, chat, tmp_path, monkeypatch):
    monkeypatch.setenv("QTUNE_GENERIC", "1")
    ref = reference(tiny_llama, chat, tmp_path / "ref")
    out = tmp_path / "run"
    r = launch(flags(tiny_llama, chat, out, batch_size=2))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_layers_under_two_processes(tiny_llama, chat, ref_b4, tmp_path, strategy, compiled):
    """The compiled decoder layers engage under ddp and fsdp (FSDP2's gathered parameters as graph inputs), and
    the run still equals one process's (eager) within 1e-5."""
    out = tmp_path / strategy
    r = launch(flags(tiny_llama, chat, out, batch_size=2, compile=True), extra=["--distributed", strategy])
    assert r.returncode == 0, r.stdout + r.stderr
    execution = [x for x in read_metrics(out / "metrics.jsonl") if x.get("event") == "execution"][0]
    assert execution["layers"] == {"compiled": 2, "eager": 0}, execution
    assert_same_run(out, ref_b4)


def test_fsdp_with_gradient_accumulation(tiny_llama, chat, ref_b2_acc2, tmp_path):
    out = tmp_path / "fsdp-acc"
    r = launch(flags(tiny_llama, chat, out, batch_size=1, grad_accum=2), extra=["--distributed", "fsdp"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(out, ref_b2_acc2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_under_another_process_count_continues_the_same_run(tiny_llama, chat, tmp_path, strategy):
    """2 processes × batch 2 for 2 steps, then resumed: fsdp by 2 processes again (its shards gathered and
    re-split), ddp by 1 process × batch 4; the result equals one process's 4 steps."""
    constant = dict(lr_scheduler="constant", eval_every=0)
    ref = reference(tiny_llama, chat, tmp_path / "ref", **constant)
    out = tmp_path / "run"
    r = launch(flags(tiny_llama, chat, out, batch_size=2, max_steps=2, **constant), extra=["--distributed", strategy])
    assert r.returncode == 0, r.stdout + r.stderr
    if strategy == "fsdp":
        r = launch(flags(tiny_llama, chat, out, batch_size=2, max_steps=STEPS, **constant),
                   extra=["--distributed", strategy, "--resume"])
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        res = CliRunner().invoke(main, ["train", "--output", str(out), "--resume", "--batch-size", "4",
                                        "--max-steps", str(STEPS)])
        assert res.exit_code == 0, res.output
    assert_same_run(out, ref)


def test_resume_with_another_global_batch_is_refused(tiny_llama, chat, tmp_path):
    out = tmp_path / "run"
    r = launch(flags(tiny_llama, chat, out, batch_size=2, max_steps=2, eval_every=0))
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(QtuneError, match=r"trained with 4 rows per optimizer step .* this run has 2 \(1 × --batch-size 2"):
        from qtune.train import resume_config

        train(resume_config(out, {"batch_size": 2, "max_steps": 4}), resume=True, progress=False)
    assert len(list((out / "checkpoints").glob("step-*"))) == 1  # nothing lost


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(p.name))
    return out


def _workers(launcher: int) -> list[int]:
    """The worker processes under a launcher (python -m qtune train, whose child is torchrun's agent in-process)."""
    found = []
    for c in _children(launcher):
        cmd = Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")
        if b"qtune" in b" ".join(cmd):
            found.append(c)
    return found


def test_a_killed_rank_ends_the_run_and_resume_reproduces_the_uninterrupted_losses(tiny_llama, chat, tmp_path):
    steps = 12
    ref = reference(tiny_llama, chat, tmp_path / "ref", max_steps=steps, eval_every=0)
    out = tmp_path / "run"
    values = flags(tiny_llama, chat, out, batch_size=2, max_steps=steps, eval_every=0)
    proc = launch(values, wait=False)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not any(r.get("step", 0) >= 3 and "loss" in r for r in metric_rows(out / "metrics.jsonl")):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)  # no hang: the agent stops the other rank
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "a worker failed" in output
    done = [r["step"] for r in metric_rows(out / "metrics.jsonl") if "loss" in r]
    assert max(done) < steps, "the run finished before the kill: nothing was tested"
    r = launch(values, extra=["--resume"])
    assert r.returncode == 0, r.stdout + r.stderr
    (loss, _), (ref_loss, _) = curve(out), curve(ref)
    assert sorted(loss) == list(range(1, steps + 1))
    for k in ref_loss:
        assert loss[k] == pytest.approx(ref_loss[k], rel=1e-5)


def test_a_two_process_run_exports_the_one_process_model(tiny_llama, chat, ref_b4, tmp_path):
    from qtune.export import export_merged

    out = tmp_path / "ddp"
    r = launch(flags(tiny_llama, chat, out, batch_size=2))
    assert r.returncode == 0, r.stdout + r.stderr
    a = export_merged(out, tmp_path / "merged-2", "float16")
    b = export_merged(ref_b4, tmp_path / "merged-1", "float16")
    ta = {k: v for f in sorted(Path(a).glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(Path(b).glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(ta) == sorted(tb)
    worst = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    assert worst <= 1e-3, worst  # adapters equal to ~1e-8; fp16 rounding of the merged sums may differ by one ulp


# --- bad input -------------------------------------------------------------------------------------------

def test_distributed_without_several_processes_is_refused(tiny_llama, chat, tmp_path):
    res = CliRunner().invoke(main, ["train", *argv(flags(tiny_llama, chat, tmp_path / "x")), "--distributed", "ddp"])
    assert res.exit_code == 2
    assert "--distributed ddp needs several processes" in res.output and "--nproc-per-node" in res.output


def test_fsdp_with_disk_offload_is_refused_by_name(tiny_llama, chat, tmp_path):
    r = launch(flags(tiny_llama, chat, tmp_path / "x", batch_size=2, offload="disk"), extra=["--distributed", "fsdp"])
    assert r.returncode != 0
    assert "--distributed fsdp shards the quantized base" in r.stdout + r.stderr
    assert "--offload disk" in r.stdout + r.stderr


def test_more_processes_than_gpus_is_refused(monkeypatch):
    from qtune.distributed import launch as start

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(QtuneError, match=r"--nproc-per-node 4 is more than the 2 GPU\(s\)"):
        start(["train"], 4)
    with pytest.raises(QtuneError, match="at least 1"):
        start(["train"], 0)


def test_worker_flags_are_the_given_ones_less_the_launchers():
    from qtune.cli import _worker_args, train as command

    ctx = command.make_context("train", ["--model", "m", "--no-compile", "--resume", "--nproc-per-node", "2",
                                         "--distributed", "fsdp", "--rank", "8", "--output", "o"])
    args = _worker_args(command, ctx.params)
    pairs = {a: b for a, b in zip(args, args[1:] + [None])}
    assert (pairs["--model"], pairs["--rank"], pairs["--output"], pairs["--distributed"]) == ("m", "8", "o", "fsdp")
    assert "--no-compile" in args and "--resume" in args
    assert "--nproc-per-node" not in args and "--nnodes" not in args  # the launcher's own
    assert "--compile" not in args and "--overwrite" not in args  # what was not given is not passed


# --- plan and cache --------------------------------------------------------------------------------------

def test_plan_per_rank(tiny_llama):
    from qtune.plan import plan_memory

    cfg = TrainConfig(model=str(tiny_llama), compute_dtype="float32", batch_size=2, seq_len=64)
    assert plan_memory(cfg, world=2, strategy="ddp").total_bytes == plan_memory(cfg).total_bytes  # one process's
    # 65B across 2 ranks (README's table): half the quantized linears, plus two layers gathered whole
    big = TrainConfig(model=str(REPO / "examples/configs/llama-1-65b.json"), rank=64, batch_size=1, seq_len=512,
                      optim="paged_adamw8bit", compute_dtype="bfloat16")
    one, fsdp = plan_memory(big, "cuda"), plan_memory(big, "cuda", world=2, strategy="fsdp")
    assert 0.5 * one.base_weights < fsdp.base_weights < 0.56 * one.base_weights
    assert fsdp.optimizer_states == -(-one.optimizer_states // 2)
    assert fsdp.total_bytes + fsdp.overhead_bytes < 24 * 2**30 < one.total_bytes
    res = CliRunner().invoke(main, ["plan", "--model", str(REPO / "examples/configs/llama-1-65b.json"), "--rank", "64",
                                    "--batch-size", "1", "--seq-len", "512", "--optim", "paged_adamw8bit",
                                    "--device", "cuda", "--nproc-per-node", "2", "--distributed", "fsdp", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert (out["nproc_per_node"], out["distributed"], out["total_bytes"]) == (2, "fsdp", fsdp.total_bytes)


def test_a_cache_entry_being_filled_is_waited_for(tiny_model_factory, tmp_path):
    """While one process holds an entry's lock, another loading that model waits; then it reads the entry."""
    from qtune.loader import QuantSpec, cache_lock, quantized_cache_path

    model = tiny_model_factory("llama")
    entry = quantized_cache_path(Path(model), QuantSpec(4), torch.float32)
    code = ("import torch, pathlib; from qtune.loader import QuantSpec, load_model; "
            f"load_model(pathlib.Path({str(model)!r}), QuantSpec(4), torch.float32, progress=False); print('loaded')")
    with cache_lock(entry):
        proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        assert proc.poll() is None, "the loader did not wait for the lock"
    out, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0 and "loaded" in out
    assert (entry / "config.json").is_file()
