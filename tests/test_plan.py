"""qtune plan: byte counts checked by hand on a small config, the JSON contract, and the CLI."""

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtune.cli import main
from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.plan import plan_memory, quantized_linear_bytes, suggestions


def test_nf4_bytes_by_hand():
    # 4096 x 4096: 8,388,608 packed bytes; 262,144 blocks of 64 -> 262,144 uint8 scales;
    # 1,024 nested fp32 scales + offset; code maps (16 + 256 fp32) and the JSON blob
    n = 4096 * 4096
    assert quantized_linear_bytes(n, 4) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + (16 * 4 + 256 * 4 + 200)
    assert 4.12 < quantized_linear_bytes(n, 4) * 8 / n < 4.14
    assert quantized_linear_bytes(n, 4, double_quant=False) == n // 2 + 4 * (n // 64) + 16 * 4 + 256 * 4 + 200
    assert quantized_linear_bytes(n, 16, compute_bytes=2) == 2 * n


def test_plan_of_a_small_config_by_hand(tiny_llama):
    cfg = TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, batch_size=2, seq_len=32)
    config = json.loads((tiny_llama / "config.json").read_text())
    h, i, L, V = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in) per layer
    p = plan_memory(cfg)
    base = L * sum(quantized_linear_bytes(o * n, 4) for o, n in shapes) + 2 * (V * h + V * h + (2 * L + 1) * h)
    assert p.base_weights == base  # untied: embedding + lm_head + norms in bf16
    trainable = L * sum(4 * (o + n) for o, n in shapes)
    assert p.trainable_params == trainable
    assert (p.adapter_params, p.adapter_grads, p.optimizer_states) == (4 * trainable, 4 * trainable, 8 * trainable)
    assert p.total_bytes == p.persistent + max(p.loss_phase, p.backward_phase)
    dora = plan_memory(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, method="qdora"))
    assert dora.trainable_params - plan_memory(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4)).trainable_params == \
        L * sum(o for o, _ in shapes)
    bits16 = plan_memory(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, bits=16))
    assert bits16.base_weights > p.base_weights and bits16.dequant_buffers == 0


def test_dora_plan_counts_its_kept_products_and_its_stash(tiny_llama, monkeypatch):
    """DoRA keeps each adapter's (tokens × out) product for the magnitude's gradient; with the stash
    (default, under checkpointing, eager layers: here --no-compile) down_proj's lives from the forward
    on, beside the layer inputs. Compiled layers (the CPU default) keep it too (as its product u), and
    each of the layer's 7 adapters' down-projection h = x·Aᵀ (b·t·r) from the forward, and its q, k, v
    and attention output (DoRA's q/k/v/o as their products u: the same bytes)."""
    config = json.loads((tiny_llama / "config.json").read_text())
    h, i, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    b, t, c = 2, 32, 2
    monkeypatch.setenv("QTUNE_COMPILE", "1")  # as in a user's run (the suite runs eagerly)
    compiled = plan_memory(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, batch_size=b, seq_len=t, method="qdora"))
    qkv = h + 2 * kv + h  # and, with --keep-qkv (default), each layer's q, k, v and o_proj's u
    assert compiled.layer_inputs == L * b * t * (2 * h + 7 * 4 + qkv) * c
    lean = plan_memory(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, batch_size=b, seq_len=t, method="qdora",
                                   keep_qkv=False))  # the older flag: only the attention's part of --recompute
    assert lean.layer_inputs == L * b * t * (2 * h + 7 * 4) * c
    # the layer in backward has its q, k, v, o among the kept ones, not twice
    assert compiled.activations - lean.activations == (L - 1) * b * t * qkv * c
    assert any(t.startswith("--recompute full: ") for t in suggestions(
        TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, batch_size=b, seq_len=t, method="qdora"), 2**40))
    assert not any("dora" in t for t in suggestions(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4,
                                                                batch_size=b, seq_len=t, method="qdora"), 2**40))
    base = dict(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, batch_size=b, seq_len=t, compile=False)
    lora = plan_memory(TrainConfig(**base))
    on = plan_memory(TrainConfig(**base, method="qdora"))
    off = plan_memory(TrainConfig(**base, method="qdora", recompute="full"))
    outs = h + 2 * kv + h + 2 * i + h  # q, k, v, o, gate, up, down
    assert off.layer_inputs == lora.layer_inputs == L * b * t * h * c
    assert off.activations - lora.activations == b * t * c * outs
    assert on.layer_inputs == 2 * off.layer_inputs
    assert on.activations - lora.activations == L * b * t * h * c + b * t * c * (outs - h)
    tips = suggestions(TrainConfig(**base, method="qdora"), 2**40)
    assert any(t.startswith("--recompute full: ") for t in tips)
    assert not any("dora" in t for t in suggestions(TrainConfig(**base), 2**40))
    plain = dict(base, gradient_checkpointing=False)  # no recomputation, so nothing is stashed
    assert plan_memory(TrainConfig(**plain, method="qdora")) == plan_memory(TrainConfig(**plain, method="qdora",
                                                                                         recompute="full"))


def test_plan_counts_the_attention_masks(tiny_llama):
    """qtune's block: one additive (b, 1, t, t) mask per distinct window plus the boolean one it is made from,
    alive through both phases of the step (Gemma-2 alternates a sliding and a global window: two masks)."""
    b, t = 3, 512
    base = dict(compute_dtype="bfloat16", rank=4, batch_size=b, seq_len=t)
    p = plan_memory(TrainConfig(model=str(tiny_llama), **base))
    assert p.masks == b * t * t * (2 + 1) and p.to_json()["attention_mask_bytes"] == p.masks
    gemma = plan_memory(TrainConfig(model="examples/configs/gemma-2-9b.json", **base))
    assert gemma.masks == b * t * t * (2 * 2 + 1)
    longer = plan_memory(TrainConfig(model=str(tiny_llama), **{**base, "seq_len": 2 * t}))
    assert longer.masks == 4 * p.masks
    assert p.loss_phase - p.layer_inputs - p.logits == p.masks  # counted in the peak


def test_checkpointing_and_8bit_optimizer_lower_the_plan(tiny_llama):
    base = dict(model=str(tiny_llama), rank=32, batch_size=4, seq_len=1024)  # long enough for sdpa either way
    on, off = plan_memory(TrainConfig(**base)), plan_memory(TrainConfig(**base, gradient_checkpointing=False))
    assert off.activations > on.activations
    eight = plan_memory(TrainConfig(**base, optim="adamw8bit"))
    assert eight.optimizer_states < on.optimizer_states


def test_plan_json_contract_and_fit(tiny_llama):
    res = CliRunner().invoke(main, ["plan", "--model", str(tiny_llama), "--json", "--device-memory", "0.001"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out["breakdown"]) == {"base_weights", "adapter_params", "adapter_grads", "optimizer_states",
                                     "activations", "logits", "dequant_buffers"}
    assert out["fits"] is False and out["total_bytes"] > 0 and out["overhead_bytes"] >= 0
    res = CliRunner().invoke(main, ["plan", "--model", str(tiny_llama), "--device-memory", "0.001"])
    assert "does NOT fit" in res.output and "to fit, try" in res.output


def test_plan_of_shipped_configs_runs_offline():
    res = CliRunner().invoke(main, ["plan", "--model", "examples/configs/llama-1-65b.json", "--rank", "64",
                                    "--batch-size", "1", "--seq-len", "512", "--device", "cuda", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert 30 * 2**30 < out["breakdown"]["base_weights"] < 36 * 2**30  # 65B x ~0.52 byte (NF4 + DQ) + fp16 embeddings
    assert math.isclose(out["trainable_params"], 799_539_200)


def test_training_warns_before_loading_when_the_plan_does_not_fit(tiny_llama, tmp_path, monkeypatch):
    import pytest

    import qtune.train as qt

    monkeypatch.setattr(qt, "device_memory_bytes", lambda device: 1024)
    monkeypatch.setattr(qt, "build_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("loading started")))
    with pytest.warns(UserWarning, match=r"qtune plan predicts .* GiB .* run out of memory"):
        with pytest.raises(RuntimeError, match="loading started"):
            qt.train(TrainConfig(model=str(tiny_llama), output=str(tmp_path / "run")), progress=False)


def test_offload_disk_plans_two_linears_of_the_base(tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    h, i, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    per_linear = [quantized_linear_bytes(o * n, 4) for o, n in [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]]
    on = plan_memory(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4))
    disk = plan_memory(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, offload="disk"))
    assert disk.base_weights == on.base_weights - L * sum(per_linear) + 2 * max(per_linear)
    assert plan_memory(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, offload="cpu")).base_weights == on.base_weights  # CPU: host = device
    assert plan_memory(TrainConfig(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, offload="cpu"), "cuda").base_weights == disk.base_weights


def test_max_memory_refuses_before_loading_counting_the_loaded_libraries(tiny_llama, tmp_path, monkeypatch):
    """On CPU --max-memory bounds RSS: plan + overhead + what the process already holds must fit."""
    import pytest

    import qtune.train as qt
    from qtune.errors import QtuneError

    cfg = TrainConfig(model=str(tiny_llama), output=str(tmp_path / "run"))
    plan = plan_memory(cfg)
    need = plan.total_bytes + plan.overhead_bytes
    monkeypatch.setattr(qt, "build_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("loading started")))
    monkeypatch.setattr(qt, "current_rss_bytes", lambda: 2**30)  # the libraries: 1 GiB
    limit = (need + 2**30 - 4096) / 2**30  # the plan alone fits, plan + libraries does not
    with pytest.raises(QtuneError, match=r"predicts .* GiB .*\+ 1\.00 GiB of loaded libraries.*over --max-memory"):
        qt.train(TrainConfig(model=str(tiny_llama), output=str(tmp_path / "run"), max_memory=limit), progress=False)
    monkeypatch.setattr(qt, "configure_host_allocator", lambda *a, **k: None)  # keep this process's allocator as it is
    with pytest.raises(RuntimeError, match="loading started"):  # with room for both, loading starts
        qt.train(TrainConfig(model=str(tiny_llama), output=str(tmp_path / "run2"), max_memory=limit + 0.01),
                 progress=False)


def test_release_freed_memory_promptly_returns_freed_blocks_to_the_os():
    """After it, freed 6 MiB tensors leave RSS at once; by default glibc keeps them resident in its arena
    (once its dynamic mmap threshold has grown past them) when live blocks sit around the holes.
    In a subprocess: it changes the process's allocator."""
    import subprocess
    import sys

    import pytest

    from qtune.memory import heap_in_use_bytes
    if heap_in_use_bytes() == 0:
        pytest.skip("not glibc: release_freed_memory_promptly changes nothing there")
    code = """
import sys, torch
from qtune.memory import current_rss_bytes, release_freed_memory_promptly
if sys.argv[1] == "1":
    assert release_freed_memory_promptly()
for _ in range(3):  # grow glibc's dynamic mmap threshold past 6 MiB
    big = torch.ones(8 * 2**20, dtype=torch.uint8); del big
before = current_rss_bytes()
blocks = [torch.ones(6 * 2**20, dtype=torch.uint8) for _ in range(60)]
del blocks[::2]  # free every other block: holes between live blocks, which no trim of the top reaches
print((current_rss_bytes() - before) / 2**20 - 30 * 6)  # beyond the 30 live blocks
"""
    retained = {}
    for mode in ("0", "1"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        retained[mode] = float(res.stdout.split()[-1])
    assert retained["1"] < 30 and retained["0"] > 120, retained  # MiB still resident of the 180 MiB freed


def test_host_allocator_policy_follows_whether_rss_is_bounded(monkeypatch):
    """A CPU run keeps freed memory for the next step (fewer page faults) unless its RSS is bounded
    (--max-memory, --offload disk), where freed blocks go back to the OS; an accelerator's host
    allocator is left alone. The glibc settings are recorded, not applied (they would change this
    process's allocator)."""
    import torch

    import qtune.memory as qm

    calls = []
    monkeypatch.setattr(qm, "_mallopt", lambda *settings: calls.append(dict(settings)) or True)
    assert qm.configure_host_allocator(torch.device("cpu"), rss_bounded=False)
    assert calls[-1] == {qm.M_MMAP_THRESHOLD: 32 * 2**20, qm.M_TRIM_THRESHOLD: 256 * 2**20}
    assert qm.configure_host_allocator(torch.device("cpu"), rss_bounded=True)
    assert calls[-1] == {qm.M_MMAP_THRESHOLD: 4 * 2**20, qm.M_ARENA_MAX: 2}
    assert not qm.configure_host_allocator(torch.device("cuda"), rss_bounded=False) and len(calls) == 2


def test_train_chooses_the_allocator_policy_from_its_flags(monkeypatch, tmp_path, tiny_llama):
    import qtune.train as qt
    from qtune.config import TrainConfig

    seen = []
    monkeypatch.setattr(qt, "configure_host_allocator", lambda device, rss_bounded: seen.append(rss_bounded))
    monkeypatch.setattr(qt, "build_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("loading started")))
    for kw in ({}, {"max_memory": 64.0}, {"offload": "disk"}):
        try:
            qt.train(TrainConfig(model=str(tiny_llama), output=str(tmp_path / f"run{len(seen)}"), **kw), progress=False)
        except RuntimeError as e:
            assert "loading started" in str(e)
    assert seen == [False, False, True]  # --max-memory keeps freed blocks for reuse (qtune.train.returns_freed_memory)


def test_peak_rss_is_the_programs_own_not_its_parents():
    """`qtune train` started from a big process (pytest, Jupyter, a benchmark driver) reports its own
    peak RSS: ru_maxrss carries the parent's high-water mark across fork/vfork + exec on Linux, which
    once made a 1.8 GiB run read 2.6 GiB in the slow offload test."""
    import subprocess
    import sys

    import pytest

    from qtune.memory import peak_rss_bytes
    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM is Linux's")
    held = bytearray(768 * 2**20)  # touched: calloc'd pages are resident only once written
    held[::4096] = b"\x01" * len(held[::4096])
    assert peak_rss_bytes() > 700 * 2**20
    code = "import torch; from qtune.memory import peak_rss_bytes; print(peak_rss_bytes())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del held
    child = int(res.stdout.split()[-1])
    assert child < 600 * 2**20, child / 2**20  # torch imported: ~300 MiB of its own

def test_backward_peak_is_at_one_end_of_the_walk_back():
    from qtune.plan import backward_peak

    # 4 layers; saved activations 100 B (25 each), adapter gradients 40 B (10 each)
    walk = [25 * (l + 1) + 10 * (4 - l) for l in range(4)]  # at layer l: layers 0..l stored, l..3 gradients
    assert backward_peak(100, 40, 4) == max(walk) == 110
    assert backward_peak(8, 400, 4) == 402  # gradients dominate: the peak is at the first layer


def test_recompute_max_and_auto_in_the_plan(tiny_llama, monkeypatch):
    """--recompute max keeps gate/up's outputs: 2·intermediate per token and layer more than default, in the
    layer inputs kept from the forward. auto picks the most-keeping level whose plan fits --max-memory."""
    import qtune.memory
    import qtune.plan

    config = json.loads((tiny_llama / "config.json").read_text())
    i, L = config["intermediate_size"], config["num_hidden_layers"]
    b, t, c = 2, 32, 2
    monkeypatch.setenv("QTUNE_COMPILE", "1")  # the keeps are the compiled blocks' (the suite runs eagerly)
    cfg = dict(model=str(tiny_llama), compute_dtype="bfloat16", rank=4, batch_size=b, seq_len=t)
    plans = {level: plan_memory(TrainConfig(**cfg, recompute=level)) for level in ("max", "default", "full")}
    assert plans["max"].layer_inputs - plans["default"].layer_inputs == L * b * t * 2 * i * c
    assert plans["max"].kept > plans["default"].kept > plans["full"].kept >= 0
    assert plans["max"].recompute == "max"
    need = {k: p.total_bytes + p.overhead_bytes for k, p in plans.items()}
    assert need["max"] > need["default"] > need["full"]
    monkeypatch.setattr(qtune.memory, "current_rss_bytes", lambda: 0)  # the budget: --max-memory less the CPU margin
    monkeypatch.setattr(qtune.plan, "auto_cpu_headroom", lambda limit: 0)
    for level, budget in (("max", need["max"]), ("default", need["max"] - 1), ("full", need["default"] - 1)):
        auto = plan_memory(TrainConfig(**cfg, recompute="auto", max_memory=budget / 2**30))
        assert auto.recompute == level, (level, budget)
        assert auto.total_bytes == plans[level].total_bytes
    res = CliRunner().invoke(main, ["plan", "--model", str(tiny_llama), "--compute-dtype", "bfloat16", "--rank", "4",
                                    "--batch-size", str(b), "--seq-len", str(t), "--recompute", "auto"])
    assert res.exit_code == 0, res.output
    assert "(--recompute auto: weights)" in res.output  # no limit: 90% of this machine's memory holds the most


def _deep_config(tiny_llama, tmp_path, layers: int = 12) -> str:
    """The tiny Llama's config.json with more layers: with 2 the checkpoints save too little for the levels' plans
    to order as on a real model (none > weights > max), with 12 they do."""
    config = json.loads((tiny_llama / "config.json").read_text())
    config["num_hidden_layers"] = layers
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_recompute_weights_in_the_plan(tiny_llama, tmp_path, monkeypatch):
    """--recompute weights: max, plus every quantized linear's dequantized weight held in the compute dtype (the
    base grows by their numel × 2 bytes in bf16, and no dequantization buffer is needed). auto picks it when it
    fits; with --offload, or where nothing would be held (--bits 16), it skips it."""
    import qtune.memory
    import qtune.plan

    model = _deep_config(tiny_llama, tmp_path)
    config = json.loads(Path(model).read_text())
    h, i, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    numel = L * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o; k, v; gate, up, down
    monkeypatch.setenv("QTUNE_COMPILE", "1")
    cfg = dict(model=model, compute_dtype="bfloat16", rank=4, batch_size=2, seq_len=32)
    w, m = plan_memory(TrainConfig(**cfg, recompute="weights")), plan_memory(TrainConfig(**cfg, recompute="max"))
    assert w.dense == numel * 2 and m.dense == 0
    assert w.base_weights - m.base_weights == numel * 2
    assert w.dequant_buffers == 0 < m.dequant_buffers
    assert w.layer_inputs == m.layer_inputs and w.recompute == "weights"
    assert w.to_json()["dequantized_weights_bytes"] == numel * 2
    monkeypatch.setattr(qtune.memory, "current_rss_bytes", lambda: 2**20)  # what the process holds: part of the limit
    need = w.total_bytes + w.overhead_bytes
    # on the CPU --max-memory bounds RSS: the plan's bytes, what the process holds, and the margin for what steps add
    limit = (need + 2**20 + qtune.plan.AUTO_CPU_RSS_FIXED) / (1 - qtune.plan.AUTO_CPU_RSS_FRACTION)
    assert qtune.plan.auto_cpu_headroom(int(limit)) >= qtune.plan.AUTO_CPU_RSS_FIXED > 0
    full = plan_memory(TrainConfig(**cfg, recompute="auto", max_memory=(limit + 16) / 2**30))
    assert full.recompute == "weights" and full.held_layers == full.layers == L
    # just short of the whole base's copy: the most layers' copies that fit (--hold-layers, below)
    short = plan_memory(TrainConfig(**cfg, recompute="auto", max_memory=(limit - 64) / 2**30))
    assert short.recompute == "weights" and 0 < short.held_layers < L
    assert plan_memory(TrainConfig(**cfg, recompute="auto", max_memory=(need + 2**20 + 16) / 2**30)).recompute != "weights"
    assert plan_memory(TrainConfig(**cfg, recompute="auto", bits=16)).recompute == "max"  # nothing to hold
    res = CliRunner().invoke(main, ["plan", "--model", str(tiny_llama), "--compute-dtype", "bfloat16", "--rank", "4",
                                    "--recompute", "weights"])
    assert res.exit_code == 0 and "of which held" in res.output, res.output
    with pytest.raises(QtuneError, match="--recompute weights holds the dequantized base"):
        TrainConfig(**cfg, recompute="weights", offload="disk")


def test_hold_layers_in_the_plan_and_auto(tiny_llama, tmp_path, monkeypatch):
    """--recompute weights --hold-layers N: the first N layers' dequantized copies (N/L of the whole base's), with
    max's dequantization buffers for the layers that hold none. auto picks the largest N whose plan fits where the
    whole copy does not, and max where not even one layer's fits."""
    import qtune.memory
    import qtune.plan

    model = _deep_config(tiny_llama, tmp_path)
    L = json.loads(Path(model).read_text())["num_hidden_layers"]
    monkeypatch.setenv("QTUNE_COMPILE", "1")
    monkeypatch.setattr(qtune.memory, "current_rss_bytes", lambda: 0)
    monkeypatch.setattr(qtune.plan, "auto_cpu_headroom", lambda limit: 0)  # the budget is the plan's own bytes here
    cfg = dict(model=model, compute_dtype="bfloat16", rank=4, batch_size=2, seq_len=32)
    whole, m = plan_memory(TrainConfig(**cfg, recompute="weights")), plan_memory(TrainConfig(**cfg, recompute="max"))
    need = {}
    for n in range(1, L + 1):
        p = plan_memory(TrainConfig(**cfg, recompute="weights", hold_layers=n))
        assert p.held_layers == n and p.dense * L == whole.dense * n
        assert p.base_weights == m.base_weights + p.dense
        assert p.dequant_buffers == (0 if n == L else m.dequant_buffers)
        need[n] = p.total_bytes + p.overhead_bytes
    assert all(need[n] < need[n + 1] for n in range(1, L - 1)) and need[L] == whole.total_bytes + whole.overhead_bytes
    assert need[1] > m.total_bytes + m.overhead_bytes
    # a budget that fits N layers' copies and not N + 1's: auto holds N, the most that fit (the whole base's copy
    # where it fits: holding L - 1 layers' costs as much here, the last layer's dequantization buffers beside them)
    for budget in sorted({need[n] for n in need} | {need[n] - 1 for n in need if n > 1}):
        most = max(n for n in need if need[n] <= budget)
        p = plan_memory(TrainConfig(**cfg, recompute="auto", max_memory=budget / 2**30))
        assert (p.recompute, p.held_layers) == ("weights", most), (most, budget)
    below = plan_memory(TrainConfig(**cfg, recompute="auto", max_memory=(need[1] - 1) / 2**30))
    assert below.recompute == "max" and below.dense == 0
    res = CliRunner().invoke(main, ["plan", "--model", model, "--compute-dtype", "bfloat16", "--rank", "4",
                                    "--batch-size", "2", "--seq-len", "32", "--recompute", "weights", "--hold-layers", "5"])
    assert res.exit_code == 0 and f"of the first 5 of {L} layers" in res.output, res.output
    with pytest.raises(QtuneError, match="--hold-layers 5 applies to --recompute weights"):
        TrainConfig(**cfg, recompute="max", hold_layers=5)


def test_recompute_none_in_the_plan(tiny_llama, tmp_path, monkeypatch):
    """--recompute none: no checkpointing (every layer's saved internals, as --no-gradient-checkpointing plans them,
    whose compiled layers save their dequantized weights instead) and the dequantized base held as with weights. It is the most memory of the levels, auto picks it only where
    it fits, the plan says checkpointing is off, and a plan that does not fit suggests checkpointing again."""
    import qtune.memory
    import qtune.plan
    from qtune.plan import format_plan

    monkeypatch.setenv("QTUNE_COMPILE", "1")
    cfg = dict(model=_deep_config(tiny_llama, tmp_path), compute_dtype="bfloat16", rank=4, batch_size=2, seq_len=32)
    n, w = plan_memory(TrainConfig(**cfg, recompute="none")), plan_memory(TrainConfig(**cfg, recompute="weights"))
    off = plan_memory(TrainConfig(**cfg, gradient_checkpointing=False))
    assert n.recompute == "none" and off.recompute == "off (no checkpointing)"
    assert n.dense == w.dense > 0 and off.dense == 0 and n.dequant_buffers == off.dequant_buffers == 0
    # uncheckpointed compiled layers save their dequantized weights for dL/dx: the held base's bytes, as activations
    assert off.activations - n.activations == n.dense and n.activations > w.activations and n.kept == 0
    assert n.total_bytes > w.total_bytes
    monkeypatch.setattr(qtune.memory, "current_rss_bytes", lambda: 0)
    monkeypatch.setattr(qtune.plan, "auto_cpu_headroom", lambda limit: 0)
    # compiled layers: auto stops at weights however large the budget (none measured slower there)
    assert plan_memory(TrainConfig(**cfg, recompute="auto", max_memory=64.0)).recompute == "weights"
    monkeypatch.setenv("QTUNE_COMPILE", "0")  # eager layers (as on a GPU): none when it fits, else the next that does
    eager = {level: plan_memory(TrainConfig(**cfg, recompute=level)) for level in ("none", "max", "default")}
    need = {k: p.total_bytes + p.overhead_bytes for k, p in eager.items()}
    assert not eager["none"].compiled and eager["none"].dense == 0 and need["none"] > need["max"]
    for level, budget in (("none", need["none"]), ("max", need["none"] - 1)):
        assert plan_memory(TrainConfig(**cfg, recompute="auto", max_memory=budget / 2**30)).recompute == level
    text = format_plan(n, TrainConfig(**cfg, recompute="none"))
    assert "checkpointing off" in text and "of which held" in text, text
    assert any(s.startswith("--recompute default:") for s in suggestions(TrainConfig(**cfg, recompute="none"), 2**20))
