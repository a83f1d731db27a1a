"""Training on tiny random models: the loop learns, resumes exactly, and refuses what it must."""

import json

import pytest
import torch

from conftest import SENTENCES
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.train import lr_factor, micro_batch_rows, read_metrics, train


def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SENTENCES * 40))
    return path


def tiny_cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output=str(out), seq_len=32, batch_size=2, rank=4, alpha=8,
                compute_dtype="float32", max_steps=6, eval_every=3, save_every=3, warmup_steps=2, lr=3e-3,
                keep_checkpoints=5)
    base.update(kw)
    return TrainConfig(**base)


def train_losses(path):
    return [r["loss"] for r in read_metrics(path / "metrics.jsonl") if "loss" in r]


def test_training_lowers_loss_and_writes_the_run_folder(tiny_llama, tmp_path):
    cfg = tiny_cfg(tiny_llama, text_file(tmp_path), tmp_path / "run", max_steps=12, eval_every=6, save_every=6)
    summary = train(cfg, progress=False)
    run = tmp_path / "run"
    assert (run / "run.yaml").is_file() and (run / "loss.png").stat().st_size > 1000
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for r in steps:
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["lr"] > 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006", "step-000012"]


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "paged_adamw"])
def test_kill_and_resume_reproduces_the_uninterrupted_curve(tiny_llama, tmp_path, optim, monkeypatch):
    data = text_file(tmp_path)
    if optim == "adamw8bit":  # bitsandbytes keeps 32-bit state for tensors < 4096 elements: make it 8-bit here
        import functools

        from quant._bnb import bitsandbytes as bnb

        monkeypatch.setattr(bnb.optim, "AdamW8bit", functools.partial(bnb.optim.AdamW8bit, min_8bit_size=16))
    full = tmp_path / "full"
    train(tiny_cfg(tiny_llama, data, full, optim=optim, dropout=0.1), progress=False)
    # the "killed" run: dies right after writing its step-3 checkpoint, then is resumed
    part = tmp_path / "part"
    import qtune.train as qt

    real_save = qt.save_checkpoint

    def save_then_die(folder, *a, **k):
        real_save(folder, *a, **k)
        raise _Killed

    monkeypatch.setattr(qt, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(tiny_cfg(tiny_llama, data, part, optim=optim, dropout=0.1), progress=False)
    monkeypatch.setattr(qt, "save_checkpoint", real_save)
    with open(part / "metrics.jsonl", "a") as f:  # a line the killed run wrote after its checkpoint
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    cfg = TrainConfig.from_dict({**tiny_cfg(tiny_llama, data, part, optim=optim, dropout=0.1).to_dict()})
    train(cfg, resume=True, progress=False)
    a, b = train_losses(full), train_losses(part)
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-5)


class _Killed(BaseException):
    pass


def test_output_folder_is_not_overwritten_by_accident(tiny_llama, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(QtuneError, match="--overwrite"):
        train(tiny_cfg(tiny_llama, text_file(tmp_path), out), progress=False)
    assert (out / "precious.txt").read_text() == "x"


def test_nan_loss_stops_and_names_the_step(tiny_llama, tmp_path, monkeypatch):
    import qtune.train as qt

    real = qt.causal_lm_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, n = real(*a, **k)
        return (loss * float("nan") if calls["n"] > 5 else loss), n

    monkeypatch.setattr(qt, "causal_lm_loss", poisoned)
    with pytest.raises(QtuneError, match=r"step \d+.*checkpoint"):
        train(tiny_cfg(tiny_llama, text_file(tmp_path), tmp_path / "run", eval_every=0), progress=False)


def test_data_order_is_a_pure_function_of_position():
    rows = [micro_batch_rows(i, 10, 3, seed=7) for i in range(8)]
    again = [micro_batch_rows(i, 10, 3, seed=7) for i in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(rows, again))
    seen = torch.cat(rows)[:10]  # the first epoch is a permutation of all rows
    assert sorted(seen.tolist()) == list(range(10))


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 20, 5, "cosine") for s in range(20)]
    assert f[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert all(a >= b for a, b in zip(f[5:], f[6:])) and f[-1] >= 0.1
    assert lr_factor(10, 20, 0, "constant") == 1.0


def test_memory_meter_measures_the_run_when_heap_from_before_it_is_freed():
    """Heap from before the run that is freed during it (garbage collected after the baseline) sank every reading
    below zero, and the meter then reported the process's peak RSS as the run's: a 1 MiB tiny model metered at
    463-540 MiB in the test process (tests/test_architectures.py's plan test). The baseline follows the heap down,
    and the meter reads only the run's own allocation."""
    import pytest

    from qtune.memory import MemoryMeter, heap_in_use_bytes
    if heap_in_use_bytes() == 0:
        pytest.skip("not glibc: the CPU meter reports the process's peak RSS there")
    before_run = [torch.ones(64 * 2**20, dtype=torch.uint8)]
    meter = MemoryMeter(torch.device("cpu"))
    before_run.clear()  # freed during the run, as a garbage collection frees an earlier run's model
    meter.sample()
    mine = torch.ones(16 * 2**20, dtype=torch.uint8)
    meter.sample()
    assert 16 * 2**20 <= meter.peak_bytes() < 24 * 2**20, meter.peak_bytes() / 2**20
    del mine


def test_memory_meter_samples_the_first_steps_and_every_50th():
    """Each CPU sample costs ~0.25 ms (tools/profile_step.py --time-only), so layers/linears/loss
    chunks are sampled on steps 1-3 and every 50th; the others are not, and peak_bytes still reads once."""
    from qtune.memory import MemoryMeter

    meter = MemoryMeter(torch.device("cpu"))
    active = []
    for step in range(1, 101):
        meter.begin_step(step)
        active.append(meter.active)
    assert [k + 1 for k, a in enumerate(active) if a] == [1, 2, 3, 50, 100]
    meter.begin_step(4)
    big = torch.ones(64 * 2**20, dtype=torch.uint8)
    meter.sample()  # not sampled on step 4
    assert meter.peak < 32 * 2**20
    assert meter.peak_bytes() >= 64 * 2**20  # the step-end read always samples
    del big
