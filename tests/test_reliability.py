"""Reliability: a real `qtune train` killed with SIGKILL resumes onto the uninterrupted loss curve;
checkpoints and exports appear complete or not at all (temporary '.tmp-' name, manifest, rename);
a full disk, a NaN loss and a mismatched --resume stop with a clear error; nothing from a user's
file is unpickled or executed; and the bad inputs not covered elsewhere each get a named error.

Subprocess tests run `python -m qtune.cli train` on conftest's tiny random Llama (fp32, seq-len 32):
a few seconds each, most of it imports. Several of these tests found bugs in qtune/ (a full disk
reported by safetensors as SafetensorError, export replacing any --output, in-place checkpoint
pruning, a torn metrics line, a moved run resumed into its old folder); they guard the fixes.
"""


from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qtune.checkpoint import MANIFEST, complete_checkpoints, load_checkpoint, verify_manifest
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.train import read_metrics, train

from reliability import (REPO, SUBPROCESS_TIMEOUT, _entries, _one_thread, assert_only_complete_checkpoints,  # noqa: F401
                         cli_args, copy_run, corpus, losses, max_abs_diff, metric_rows, qtune_argv, run_cli,
                         subprocess_env, tiny_cfg, trained_run, warm_cache)  # fixtures among them


# --- 1. SIGKILL a real `qtune train` and resume it ----------------------------------------------

KILL_STEPS = 40


def _wait_for_step(metrics: Path, proc: subprocess.Popen, step: int, timeout: float = SUBPROCESS_TIMEOUT) -> int | None:
    """Poll metrics.jsonl until a training line with step >= `step`; None if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r["step"] for r in metric_rows(metrics) if "loss" in r]
        if done and max(done) >= step:
            return max(done)
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.parametrize("optim", ["adamw8bit", pytest.param("paged_adamw8bit", marks=pytest.mark.slow),
                                   pytest.param("adamw", marks=pytest.mark.slow)])
def test_sigkill_mid_run_then_resume_reproduces_the_uninterrupted_run(warm_cache, corpus, tmp_path, optim):
    # rank 32 on the tiny model: gate/up lora_B (128x32) and down lora_A (32x128) have 4096 elements, so
    # bitsandbytes keeps 8-bit state for them and 32-bit state for the smaller tensors: both kinds are resumed
    save_every = 2
    flags = cli_args(warm_cache, corpus, "RUN", rank=32, alpha=32, dropout=0.1, optim=optim, max_steps=KILL_STEPS,
                     save_every=save_every, keep_checkpoints=3)
    argv = lambda out: qtune_argv("train", *[str(out) if a == "RUN" else a for a in flags])  # noqa: E731
    env = subprocess_env()

    full, part = tmp_path / "full", tmp_path / "part"
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("full", "killed")}
    # the uninterrupted reference runs alongside the one to be killed (their imports overlap)
    ref = subprocess.Popen(argv(full), env=env, stdout=logs["full"], stderr=subprocess.STDOUT)
    killed = subprocess.Popen(argv(part), env=env, stdout=logs["killed"], stderr=subprocess.STDOUT)
    try:
        seen = _wait_for_step(part / "metrics.jsonl", killed, 5)
        assert seen is not None, "the run ended before it could be killed: " + (tmp_path / "killed.log").read_text()
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
        ref.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        for proc in (ref, killed):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in logs.values():
            f.close()
    assert ref.returncode == 0, (tmp_path / "full.log").read_text()[-3000:]
    assert killed.returncode == -signal.SIGKILL

    # what the kill left: complete checkpoints only, metrics up to a step before the end
    last_logged = max(r["step"] for r in metric_rows(part / "metrics.jsonl") if "loss" in r)
    assert 5 <= last_logged < KILL_STEPS, "the kill did not land mid-run"
    assert_only_complete_checkpoints(part)
    kept = complete_checkpoints(part)
    assert kept, "no checkpoint was written before the kill"
    last_complete = load_checkpoint(kept[-1])["trainer"]["step"]
    if optim.endswith("8bit"):  # the state the resume starts from is bitsandbytes' 8-bit state (uint8 + absmax)
        resumed_state = load_file(kept[-1] / "optimizer.safetensors")
        assert any(k.endswith("/state1") and v.dtype == torch.uint8 for k, v in resumed_state.items())
        assert any(k.endswith("/absmax1") for k in resumed_state)

    res = subprocess.run(qtune_argv("train", "--output", part, "--resume"), env=env, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    starts = [r for r in read_metrics(part / "metrics.jsonl") if r.get("event") == "start"]
    resumed_from = starts[-1]["step"]
    assert resumed_from == last_complete
    assert resumed_from >= last_logged - save_every, "more than one checkpoint interval was lost"

    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, KILL_STEPS + 1))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-4, {s: (a[s], b[s]) for s in a if abs(a[s] - b[s]) > 1e-4}
    final = f"checkpoints/step-{KILL_STEPS:06d}"
    assert max_abs_diff(load_file(full / final / "adapter.safetensors"),
                        load_file(part / final / "adapter.safetensors")) <= 1e-4
    state = load_file(part / final / "optimizer.safetensors")
    state1 = {k: v for k, v in state.items() if k.endswith("/state1") or k.endswith("/exp_avg")}
    assert state1
    if optim.endswith("8bit"):  # really 8-bit state (and 32-bit for the small tensors), and it was resumed exactly
        assert {v.dtype for v in state1.values()} == {torch.uint8, torch.float32}
        ref_state = load_file(full / final / "optimizer.safetensors")
        assert all(torch.equal(state[k], ref_state[k]) for k in state if state[k].dtype == torch.uint8)


# --- 2. atomic exports --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_interrupted_export_leaves_nothing_that_looks_complete(trained_run, tmp_path, monkeypatch, fmt):
    import qtune.export as qe

    real, calls = qe.save_file, []

    def fail_after_first(tensors, path, *a, **k):
        calls.append(Path(path).name)
        if fmt == "peft" or len(calls) > 1:  # merged: the 1st shard is written, the 2nd hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(qe, "save_file", fail_after_first)
    out = tmp_path / "exports" / "model"
    with pytest.raises((OSError, QtuneError)):
        if fmt == "merged":
            qe.export_merged(trained_run, out, progress=False, shard_bytes=20_000)
        else:
            qe.export_peft(trained_run, out, progress=False)
    assert calls and (fmt == "peft" or len(calls) == 2)
    assert not out.exists()
    assert all(name.startswith(".tmp-") for name in _entries(out.parent)), _entries(out.parent)


def test_sigkilled_export_leaves_only_a_tmp_folder_and_a_new_export_succeeds(trained_run, tmp_path):
    """A real kill -9 between two shards: no OUT, only a '.tmp-' folder without manifest; exporting again works."""
    out = tmp_path / "exports" / "merged"
    script = ("import os, signal, sys\n"
              "import qtune.export as qe\n"
              "real, n = qe.save_file, [0]\n"
              "def die_on_second(*a, **k):\n"
              "    n[0] += 1\n"
              "    if n[0] == 2:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(*a, **k)\n"
              "qe.save_file = die_on_second\n"
              "qe.export_merged(sys.argv[1], sys.argv[2], progress=False, shard_bytes=20_000)\n")
    res = subprocess.run([sys.executable, "-c", script, str(trained_run), str(out)], env=subprocess_env(),
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not out.exists()
    left = _entries(out.parent)
    assert len(left) == 1 and left[0].startswith(".tmp-merged"), left
    partial = out.parent / left[0]
    assert any(partial.glob("shard-*.safetensors")) and not (partial / MANIFEST).exists()
    assert not (partial / "config.json").exists()

    from qtune.export import export_merged

    export_merged(trained_run, out, progress=False, shard_bytes=20_000)
    verify_manifest(out)
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()


def test_export_refuses_a_checkpoint_that_fails_its_manifest(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    latest = run / "checkpoints" / "step-000004"
    (latest / "optimizer.safetensors").unlink()  # a file the manifest lists is gone
    res = run_cli("export", "--run", run, "--output", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "optimizer.safetensors" in res.output and "manifest" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
    # a folder without manifest (e.g. what a kill leaves) is refused when named explicitly
    stray = run / "checkpoints" / ".tmp-step-000006.abc"
    shutil.copytree(run / "checkpoints" / "step-000002", stray)
    (stray / MANIFEST).unlink()
    res = run_cli("export", "--run", run, "--output", tmp_path / "out", "--checkpoint", stray)
    assert res.exit_code == 2 and "incomplete" in res.output and "Traceback" not in res.output
    # the fix the message names works: an earlier, intact checkpoint
    res = run_cli("export", "--run", run, "--output", tmp_path / "out", "--format", "peft",
                  "--checkpoint", run / "checkpoints" / "step-000002")
    assert res.exit_code == 0, res.output
    verify_manifest(tmp_path / "out")


def test_export_does_not_replace_an_existing_folder(trained_run, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = run_cli("export", "--run", trained_run, "--output", out, "--format", "peft")
    assert (out / "notes.txt").is_file(), "export deleted the user's folder"
    assert res.exit_code == 2 and "exists" in res.output


# --- 3. disk full while saving ------------------------------------------------------------------

def _full_disk_on(folder_prefix: str, error: BaseException):
    """A stand-in for qtune.checkpoint.save_file that fails inside the temporary folder of one checkpoint."""
    import qtune.checkpoint as qc

    real = qc.save_file

    def save_file(tensors, path, *a, **k):
        if Path(path).parent.name.startswith(folder_prefix):
            raise error
        return real(tensors, path, *a, **k)

    return save_file


ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_keeps_the_earlier_checkpoint_and_resume_works(warm_cache, corpus, tmp_path,
                                                                               monkeypatch):
    import qtune.checkpoint as qc

    run = tmp_path / "run"
    cfg = tiny_cfg(warm_cache, corpus, run)
    monkeypatch.setattr(qc, "save_file", _full_disk_on(".tmp-step-000004", ENOSPC))
    with pytest.raises(QtuneError, match=r"step-000004.*disk space") as e:
        train(cfg, progress=False)
    assert "earlier checkpoints are untouched" in str(e.value)
    assert _entries(run / "checkpoints") == ["step-000002"]  # no partial folder, not even a '.tmp-' one
    verify_manifest(run / "checkpoints" / "step-000002")

    monkeypatch.undo()
    train(TrainConfig.from_dict(cfg.to_dict()), resume=True, progress=False)
    assert sorted(losses(run)) == list(range(1, 7))
    assert [p.name for p in complete_checkpoints(run)] == ["step-000002", "step-000004", "step-000006"]
    starts = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "start"]
    assert starts[-1]["step"] == 2


def test_disk_full_cli_message_has_no_traceback(warm_cache, corpus, tmp_path, monkeypatch):
    import qtune.checkpoint as qc

    monkeypatch.setattr(qc, "save_file", _full_disk_on(".tmp-step-000004", ENOSPC))
    res = run_cli("train", *cli_args(warm_cache, corpus, tmp_path / "run"))
    assert res.exit_code == 2, res.output
    assert "No space left on device" in res.output and "Free disk space" in res.output
    assert "Traceback" not in res.output


def test_disk_full_as_safetensors_reports_it_gets_the_same_clear_error(warm_cache, corpus, tmp_path, monkeypatch):
    # the exception safetensors 0.8 really raises on a full filesystem (measured on a 64 KiB tmpfs)
    import qtune.checkpoint as qc
    from safetensors import SafetensorError

    real_error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(qc, "save_file", _full_disk_on(".tmp-step-000004", real_error))
    res = run_cli("train", *cli_args(warm_cache, corpus, tmp_path / "run"))
    assert res.exit_code == 2 and "disk space" in res.output, res.output


def test_disk_full_during_export_gets_a_clear_error(trained_run, tmp_path, monkeypatch):
    import qtune.export as qe

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qe, "save_file", full)
    res = run_cli("export", "--run", trained_run, "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert res.exit_code == 2 and "disk space" in res.output and "Traceback" not in res.output, res.output


# --- 4. NaN / inf loss --------------------------------------------------------------------------

@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_loss_stops_names_the_step_and_keeps_a_loadable_checkpoint(warm_cache, corpus, tmp_path,
                                                                               monkeypatch, poison):
    import qtune.train as qt

    real, calls = qt.causal_lm_loss, {"n": 0}

    def poisoned(*a, **k):  # training micro-batches only (evaluation calls qtune.model's own)
        calls["n"] += 1
        loss, n = real(*a, **k)
        return (loss * poison if calls["n"] >= 6 else loss), n

    monkeypatch.setattr(qt, "causal_lm_loss", poisoned)
    run = tmp_path / "run"
    res = run_cli("train", *cli_args(warm_cache, corpus, run, max_steps=8))
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert f"became {poison}" in res.output and "at step 6" in res.output
    good = run / "checkpoints" / "step-000004"
    assert str(good) in res.output.replace("\n", "")
    assert _entries(run / "checkpoints") == ["step-000002", "step-000004"]  # nothing saved after the bad step
    state = load_checkpoint(good)
    assert state["trainer"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["adapter"].values())


# --- 5. --resume with a different model or method -----------------------------------------------

@pytest.fixture
def run_yaml_only(tiny_llama, corpus, tmp_path):
    """A run folder holding only run.yaml (what resume_config reads): no training needed to test refusals."""
    run = tmp_path / "run"
    run.mkdir()
    tiny_cfg(tiny_llama, corpus, run).save(run / "run.yaml")
    return run


@pytest.mark.parametrize("flag, value, difference", [
    ("--method", "qdora", "method: run has 'qlora', flag says 'qdora'"),
    ("--method", "rosa", "method: run has 'qlora', flag says 'qrosa'"),  # aliases are resolved first
    ("--model", "OTHER", "model: run has 'TINY', flag says 'OTHER'"),
    ("--bits", "8", "bits: run has 4, flag says 8"),
    ("--quant-type", "fp4", "quant_type: run has 'nf4', flag says 'fp4'"),
    ("--init", "pissa", "init: run has 'default', flag says 'pissa'"),
    ("--seq-len", "64", "seq_len: run has 32, flag says 64"),
])
def test_resume_with_a_different_model_or_method_is_refused_showing_both(run_yaml_only, tiny_llama, tmp_path, flag,
                                                                          value, difference):
    other = str(tmp_path / "another-model")
    value = other if value == "OTHER" else value
    difference = difference.replace("TINY", str(tiny_llama)).replace("OTHER", other)
    res = run_cli("train", "--output", run_yaml_only, "--resume", flag, value)
    assert res.exit_code == 2, res.output
    out = res.output.replace("\n", "")
    assert difference in out, out
    assert "Traceback" not in out and "another --output" in out


def test_resume_refuses_a_config_file_that_differs(run_yaml_only, tmp_path):
    cfg_file = tmp_path / "other.yaml"
    cfg_file.write_text(yaml.safe_dump({"method": "qdora", "rank": 4}))
    res = run_cli("train", "--output", run_yaml_only, "--resume", "--config", cfg_file)
    assert res.exit_code == 2 and "method: run has 'qlora', flag says 'qdora'" in res.output.replace("\n", "")
