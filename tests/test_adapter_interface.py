"""The adapter interface (qtune.adapters.base.Adapter) is all that training and export ask of a method:
a method written only against it (here a test-only IA3-style vector, y = l ⊙ (x·Wᵀ) + b, whose ΔW
depends on W₀, with an extra loss term and an after-step hook) trains through train_step, gets its
extra loss and its hook called, and exports merged into the fp16 model with the adapter's logits."""

from __future__ import annotations

import torch
from torch import nn

from conftest import SENTENCES
from qtune.adapters import ADAPTER_LAYERS
from qtune.adapters.base import Adapter, base_weight
from qtune.config import TrainConfig
from qtune.export import export_merged, load_run
from qtune.train import read_metrics, train

PENALTY = 0.5


class VectorScale(Adapter):
    """y = l ⊙ (x·Wᵀ) + b (the bias unscaled), l ∈ R^out starting at 1; ΔW = (l − 1)[:, None] ⊙ W₀."""

    hook_calls: list = []

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.scale_vector = nn.Parameter(torch.ones(base_layer.out_features))

    def forward(self, x):
        bias = self.base_layer.bias
        y = self.base_layer(x) if bias is None else self.base_layer(x) - bias
        y = y * self.scale_vector.to(x.dtype)
        return y if bias is None else y + bias

    def delta_weight(self, base_weight):
        return (self.scale_vector.detach().float() - 1)[:, None] * base_weight.float()

    def extra_loss(self):
        return PENALTY * (self.scale_vector - 1).square().sum()

    def after_optimizer_step(self, step):
        VectorScale.hook_calls.append(step)


def test_a_method_written_against_the_interface_trains_and_exports(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(ADAPTER_LAYERS, "qlora", VectorScale)
    VectorScale.hook_calls.clear()
    data = tmp_path / "c.txt"
    data.write_text("\n".join(SENTENCES * 40))
    cfg = TrainConfig(model=str(tiny_llama), data=str(data), output=str(tmp_path / "run"), seq_len=32, batch_size=2,
                      rank=4, compute_dtype="float32", max_steps=3, eval_every=0, save_every=3, lr=5e-2,
                      warmup_steps=0)
    train(cfg, progress=False)
    layers = 7 * 2  # every linear of the tiny model's 2 layers
    assert VectorScale.hook_calls == [s for s in (1, 2, 3) for _ in range(layers)]
    _, model, *_ = load_run(tmp_path / "run", progress=False, compute_dtype="float32")
    adapters = [m for m in model.modules() if isinstance(m, VectorScale)]
    assert len(adapters) == layers and any((a.scale_vector - 1).abs().max() > 1e-3 for a in adapters)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)

    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
    out = export_merged(tmp_path / "run", tmp_path / "merged", progress=False)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # fp16 weights
    w0 = base_weight(adapters[0].base_layer)
    torch.testing.assert_close(adapters[0].merged_weight(w0), adapters[0].scale_vector.detach()[:, None] * w0)


def test_train_step_adds_the_extra_loss_to_the_loss_and_its_gradient(tiny_llama, tmp_path, monkeypatch):
    """train_step's loss is the mean token loss plus the adapters' extra terms, and the update follows
    the gradient of that sum (SGD, so the gradient can be read back from the step)."""
    from qtune.engine import causal_lm_loss
    from qtune.model import build_model
    from qtune.train import train_step

    monkeypatch.setitem(ADAPTER_LAYERS, "qlora", VectorScale)
    cfg = TrainConfig(model=str(tiny_llama), data="x", output=str(tmp_path / "r"), seq_len=16, batch_size=2,
                      compute_dtype="float32")
    model, *_ = build_model(cfg, tmp_path / "r", progress=False)
    model.train()
    adapters = [m for m in model.modules() if isinstance(m, VectorScale)]
    with torch.no_grad():
        for a in adapters:
            a.scale_vector.uniform_(0.9, 1.1)
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids), "labels": ids.clone()}
    params = [a.scale_vector for a in adapters]
    loss, n = causal_lm_loss(model, ids, batch["segment_ids"], batch["labels"])
    want = loss / n + sum(a.extra_loss() for a in adapters)
    want_grads = torch.autograd.grad(want, params)
    before = [p.detach().clone() for p in params]
    lr = 1e-3
    optimizer = torch.optim.SGD(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    result = train_step(model, optimizer, scheduler, [batch])
    assert abs(result["loss"] - want.item()) < 1e-5 * want.item()
    for p, b, g in zip(params, before, want_grads):
        torch.testing.assert_close((b - p.detach()) / lr, g, atol=1e-3, rtol=1e-3)
