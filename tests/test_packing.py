"""Packed examples never see each other: a row packed with examples a, b and c gives each of them the
per-token losses, and their sum the gradients, that a, b and c have each alone in a row (fp32, 1e-5).

On tiny random models of every architecture qtune trains (tests/test_architectures.py's families and
knobs: sliding windows shorter than an example, Gemma-3's local and global layers with two RoPE bases,
Phi-3's fused projections and partial rotary), on qtune's own compiled block ("fused") and on
transformers' forward ("generic", forced with QTUNE_GENERIC=1 for the fused families), in training mode
with gradient checkpointing, as `qtune train` runs them; QDoRA and QRoSA on the fused path too. The rows
come from qtune.data.pack_examples: per-example packing for the packed row, packing "none" for the rows
alone. The rotary embedding is checked to receive positions that restart at each example. Under
"contaminated" packing (the old behaviour) the second example's losses do change: the test can fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtune.adapters import adapter_layers
from qtune.adapters.rosa import RoSALinear
from qtune.data import IGNORE_INDEX, Example, pack_examples
from qtune.engine import engine_of
from qtune.engine.attention import segment_positions
from qtune.engine.block import GENERIC_ENV
from qtune.errors import QtuneError
from qtune.model import build_model
from test_architectures import ARCHS, FUSED, run_config, tiny  # noqa: F401  (tiny: the module's fixture)

SEQ = 32
LENGTHS = (7, 12, 9)  # b is longer than the sliding windows (8); 28 tokens + 4 of padding in the packed row
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one thread is fastest (conftest.one_thread)."""


def examples(vocab: int) -> list[Example]:
    """a, b, c: random tokens; each example's first two tokens unlabelled (a prompt), the rest learned."""
    g = torch.Generator().manual_seed(5)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return out


def perturb_(model) -> None:
    """Non-zero adapters (LoRA's B starts at 0), so that their gradients all flow; RoSA gets a support."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in adapter_layers(model).values():
            if isinstance(m, RoSALinear):
                n = m.out_features * m.in_features
                m.set_support(torch.randperm(n, generator=g)[: n // 20].sort().values)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def per_token(model, blocks):
    """(per-position next-token losses (rows, t-1), gradients of their sum, positions the rotary saw)."""
    engine = engine_of(model)
    seen = []
    rotary = model.model.rotary_emb
    hook = rotary.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone()),
        with_kwargs=True)
    model.zero_grad(set_to_none=True)
    try:
        logits = engine.logits(blocks.input_ids, blocks.segment_ids).float()
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), blocks.labels[:, 1:], ignore_index=IGNORE_INDEX,
                                 reduction="none")
        total, count = engine.loss(blocks.input_ids, blocks.segment_ids, blocks.labels)  # the training loss
        total.backward()
    finally:
        hook.remove()
    assert count == int((blocks.labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total.detach(), losses.sum().detach(), rtol=1e-5, atol=1e-5)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses.detach(), grads, seen


def check_packed_equals_alone(model, vocab: int, packing: str = "per-example") -> float:
    """The packed row's per-token losses against each example's own row; returns the largest difference."""
    exs = examples(vocab)
    # the packed row, then two rows of padding only: the same (3, SEQ) shape as the rows alone, one compiled graph
    packed = pack_examples(exs + [Example([0] * SEQ, [IGNORE_INDEX] * SEQ)] * 2, SEQ, pad_id=0, packing=packing)
    packed.segment_ids[1:] = 0
    alone = pack_examples(exs, SEQ, pad_id=0, packing="none")
    assert len(packed) == len(alone) == 3
    model.train()
    packed_losses, packed_grads, packed_seen = per_token(model, packed)
    alone_losses, alone_grads, _ = per_token(model, alone)

    if packing == "per-example":  # the rotary embedding saw per-example positions (0.. for each example)
        want = segment_positions(packed.segment_ids)
        assert want[0, :sum(LENGTHS)].tolist() == [j for n in LENGTHS for j in range(n)]
        assert any(torch.equal(s.expand_as(want), want) for s in packed_seen), packed_seen

    worst, start = 0.0, 0
    for k, n in enumerate(LENGTHS):
        got = packed_losses[0, start:start + n - 1]  # position p predicts token p + 1 of the same example
        expected = alone_losses[k, :n - 1]
        worst = max(worst, (got - expected).abs().max().item())
        start += n
    assert (packed_losses[0, start - 1:] == 0).all()  # nothing across to the padding
    assert packed_losses.sum() > 0
    if packing != "per-example":
        return worst
    assert worst <= TOL, f"per-token losses differ by {worst:.2e}"
    for name, g in packed_grads.items():
        ref = alone_grads[name]
        scale = max(ref.abs().max().item(), 1e-12)
        err = (g - ref).abs().max().item() / scale
        assert err <= TOL, f"{name}: gradient differs by {err:.2e} of its largest entry"
    assert any(g.abs().max() > 0 for g in packed_grads.values())
    return worst


def build(folder, monkeypatch, generic: bool, **kw):
    if generic:
        monkeypatch.setenv(GENERIC_ENV, "1")
    else:
        monkeypatch.delenv(GENERIC_ENV, raising=False)
    model, tok, *_ = build_model(run_config(folder, seq_len=SEQ, batch_size=1, **kw), progress=False)
    perturb_(model)
    return model, model.get_input_embeddings().weight.shape[0]


# compiling one tiny model's layers (forward and backward) takes ~27 s on this CPU: the fast suite compiles
# one Llama; the other families and methods compile in the slow suite, and run the same block eagerly here
PATHS = ([(arch, "fused-eager") for arch in ARCHS if arch in FUSED] + [(arch, "generic") for arch in ARCHS]
         + [("llama", "fused")]
         + [pytest.param(arch, "fused", marks=pytest.mark.slow) for arch in ARCHS if arch in FUSED - {"llama"}])


@pytest.mark.parametrize("arch,path", PATHS)
def test_packed_row_equals_each_example_alone(arch, path, tiny, monkeypatch, request):
    """fused: each layer one compiled graph, as `qtune train` runs them on the CPU; fused-eager: the same
    block with compilation off (the eager fused nodes); generic: transformers' forward."""
    if path == "fused":
        request.getfixturevalue("compiled")
    model, vocab = build(tiny(arch), monkeypatch, generic=path == "generic")
    engine = engine_of(model)
    assert (engine.unsupported is None) == path.startswith("fused"), engine.unsupported
    check_packed_equals_alone(model, vocab)
    report = engine.execution_report(1)
    assert report["layers"]["compiled"] == (model.config.num_hidden_layers if path == "fused" else 0), report


METHOD_CASES = ([(arch, method, "fused-eager") for arch in ("llama", "gemma3_text") for method in ("qdora", "qrosa")]
                + [pytest.param(arch, method, "fused", marks=pytest.mark.slow)
                   for arch in ("llama", "gemma3_text") for method in ("qdora", "qrosa")])


@pytest.mark.parametrize("arch,method,path", METHOD_CASES)
def test_qdora_and_qrosa_packed_rows_equal_each_example_alone(arch, method, path, tiny, monkeypatch, request):
    if path == "fused":
        request.getfixturevalue("compiled")
    model, vocab = build(tiny(arch), monkeypatch, generic=False, method=method)
    assert engine_of(model).unsupported is None
    check_packed_equals_alone(model, vocab)
    report = engine_of(model).execution_report(1)
    assert report["layers"]["compiled"] == (model.config.num_hidden_layers if path == "fused" else 0), report


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_contaminated_packing_lets_an_example_see_the_ones_before_it(path, tiny, monkeypatch):
    """The old behaviour, kept for benchmarks: b and c attend to what precedes them, so their losses move."""
    model, vocab = build(tiny("llama"), monkeypatch, generic=path == "generic", packing="contaminated")
    assert check_packed_equals_alone(model, vocab, packing="contaminated") > 1e-3


def test_generic_path_refuses_a_model_that_ignores_packed_positions(tiny, monkeypatch):
    """A forward that builds its own causal mask (here: position ids dropped, as an older model's forward
    would) attends across examples: refused by name at start, with --packing none as the way out."""
    from qtune import architectures
    from qtune.architectures import decoder

    model, _ = build(tiny("olmo2"), monkeypatch, generic=True, packing="none")
    inner = decoder(model)
    original = inner.forward
    monkeypatch.setattr(inner, "forward", lambda *a, position_ids=None, **kw: original(*a, **kw))
    with pytest.raises(QtuneError, match="--packing none"):
        architectures.check_packing(model, engine_of(model))
    monkeypatch.setattr(inner, "forward", original)
    architectures.check_packing(model, engine_of(model))  # the model itself passes


def test_a_run_from_before_packing_resumes_as_it_was_trained(tmp_path):
    """run.yaml without `packing`: the run attended across its packed examples, and its resume keeps that;
    a different --packing on --resume is refused by name, as any changed flag."""
    import yaml

    from qtune.config import TrainConfig
    from qtune.train import resume_config

    values = TrainConfig(output=str(tmp_path), compute_dtype="float32").to_dict()
    del values["packing"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    assert resume_config(tmp_path, {}).packing == "contaminated"
    with pytest.raises(QtuneError, match="packing"):
        resume_config(tmp_path, {"packing": "per-example"})
    values["packing"] = "per-example"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    assert resume_config(tmp_path, {}).packing == "per-example"
