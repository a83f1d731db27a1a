"""RoSALinear, select_sparse_mask and the gradient accumulation (qtune/adapters/rosa.py) against
naive dense references written from the paper (arXiv 2401.04679)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qtune.adapters.rosa import RoSALinear
from qtune.engine import linear as engine_linear
from qtune.adapters.rosa_mask import (accumulate_weight_grad_squares, mmap_accumulators,
                                 select_sparse_mask)
from qtune.loader import QuantSpec, load_model
from quant import QuantLinear
import conftest
from conftest import TOL, dense_weight

IN, OUT, RANK, SCALE, DENSITY = 64, 96, 4, 2.0, 0.05
FP32 = TOL[torch.float32]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """conftest's one_thread for every test here."""


def make_base(kind: str, bias: bool = True, seed: int = 0) -> nn.Module:
    return conftest.make_base(kind, IN, OUT, bias, seed)



def random_support(density: float = DENSITY, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(OUT * IN, generator=g)[: math.ceil(density * OUT * IN)].sort().values


def randomize_(layer: RoSALinear, seed: int = 1) -> RoSALinear:
    """Non-zero A, B and sparse values, so every gradient and every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.sparse_values):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return layer


def run(layer, x, form: str):
    """The reference forward (the module's own) or the engine's eager fused node."""
    return layer(x) if form == "reference" else engine_linear.eager(layer, x)


def naive_rosa(x, weight, bias, A, B, indices, values, scale):
    """y = x Wᵀ + b + s·(x Aᵀ)Bᵀ + x Sᵀ with S written out densely."""
    S = torch.zeros(OUT * IN).index_put((indices,), values).view(OUT, IN)
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, A), B) + F.linear(x, S)


@pytest.mark.parametrize("kind", ["quant", "dense"])
@pytest.mark.parametrize("support", [None, "random"])
def test_equals_base_at_init(kind, support):
    base = make_base(kind, bias=True)
    layer = RoSALinear(base, RANK, SCALE, indices=None if support is None else random_support())
    assert layer.nnz == (0 if support is None else math.ceil(DENSITY * OUT * IN))
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(layer(x), base(x), **FP32)


@pytest.mark.parametrize("form", ["reference", "fused"])
@pytest.mark.parametrize("kind, dtype", [("quant", torch.float32), ("dense", torch.float32),
                                         ("quant", torch.bfloat16)])  # nn.Linear(fp32) takes no bf16 input
def test_matches_naive_reference_forward_and_grads(kind, dtype, form):
    base = make_base(kind)
    layer = RoSALinear(base, RANK, SCALE)
    layer.set_support(random_support())  # as the lead does: empty at construction, then the mask
    randomize_(layer)
    x = torch.randn(3, 5, IN, requires_grad=True)
    y = run(layer, x.to(dtype), form)
    assert y.dtype == dtype and layer.sparse_values.dtype == torch.float32
    params = [layer.lora_A, layer.lora_B, layer.sparse_values]
    A, B, v = (p.detach().clone().requires_grad_(True) for p in params)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = naive_rosa(x_ref, dense_weight(base), base.bias, A, B, layer.sparse_indices, v, SCALE)
    tol = TOL[dtype]
    torch.testing.assert_close(y.float(), y_ref, **tol)

    grad_out = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, params + [x], grad_out.to(dtype))
    want = torch.autograd.grad(y_ref, [A, B, v, x_ref], grad_out)
    for name, g, w in zip(["A", "B", "sparse_values", "x"], got, want):
        assert g.abs().max() > 0, f"gradient of {name} is zero: the test would prove nothing"
        # a bf16 sum over tokens errs in proportion to its terms, not its (cancelled) result: scale atol
        atol = tol["atol"] * (1 if dtype == torch.float32 else w.abs().max().item())
        torch.testing.assert_close(g.float(), w, atol=atol, rtol=tol["rtol"], msg=lambda s: f"grad of {name}: {s}")


@pytest.mark.parametrize("kind, dtype", [("quant", torch.float32), ("dense", torch.float32),
                                         ("quant", torch.bfloat16)])
def test_matches_naive_reference_with_the_compiled_layouts(kind, dtype, compiled):
    """The same check with compiling on, as in a user's run: the eager node's SDDMM layouts come from
    the compiled transpose-cast, which equals eager .T.contiguous().float() bit for bit."""
    from qtune.engine.ops import tokens_last as _tokens_last

    for t in (torch.randn(3, 5, IN).to(dtype), torch.randn(2, 7, OUT).to(dtype)):
        want = t.reshape(-1, t.shape[-1]).T.contiguous().float()
        got = _tokens_last(t, t.shape[-1])
        assert got.is_contiguous() and got.dtype == torch.float32 and torch.equal(got, want)
    test_matches_naive_reference_forward_and_grads(kind, dtype, "fused")


def test_parameters_and_buffers_scale_with_nnz():
    def nbytes(layer):
        tensors = list(layer.named_parameters()) + list(layer.named_buffers())
        mine = [t for n, t in tensors if not n.startswith("base_layer")]
        return sum(t.numel() * t.element_size() for t in mine)

    empty = nbytes(RoSALinear(make_base("quant"), RANK, SCALE))
    sizes = {d: RoSALinear(make_base("quant"), RANK, SCALE, indices=random_support(d)) for d in (0.01, 0.1)}
    per_nnz = {d: (nbytes(layer) - empty) / layer.nnz for d, layer in sizes.items()}  # the row pointers are in `empty`
    # values fp32 (4) + indices int64 (8) + the int32 CSR columns (4)
    assert per_nnz[0.01] == per_nnz[0.1] == 16
    assert sizes[0.1].nnz > 9 * sizes[0.01].nnz


def test_select_sparse_mask_picks_the_largest_entries():
    torch.manual_seed(0)
    scores = torch.randn(OUT, IN).square()
    for density in (0.0, 0.003, 0.05, 0.5, 1.0):
        k = math.ceil(density * OUT * IN)
        want = torch.sort(scores.flatten(), descending=True, stable=True).indices[:k].sort().values
        got = select_sparse_mask(scores, density)
        assert got.dtype == torch.int64 and got.numel() == k
        assert torch.equal(got, want)


def test_select_sparse_mask_breaks_ties_by_lowest_index():
    scores = torch.zeros(4, 5)
    scores[3, 4], scores[0, 1] = 2.0, 1.0  # two clear winners, then 18 tied zeros
    got = select_sparse_mask(scores, 0.2)  # 4 entries: the two winners + the two lowest tied indices
    assert got.tolist() == [0, 1, 2, 19]
    assert torch.equal(got, select_sparse_mask(scores.clone(), 0.2))


# --- gradient accumulation on a real (tiny) quantized model ---------------------------------------

LAYER = "model.layers.0.mlp.down_proj"
WRAPPED = "model.layers.1.self_attn.q_proj"


def make_batches(vocab: int, n: int = 2):
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (2, 12), generator=g)
        batches.append({"input_ids": ids, "segment_ids": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def reference_grad_square(folder, name: str, batch: dict) -> torch.Tensor:
    """(dL/dW)² by plain autograd: the one linear becomes an nn.Linear holding D(Q(W)), requires_grad."""
    model = load_model(folder, QuantSpec(4), torch.float32, progress=False).eval()
    model.requires_grad_(False)
    q = model.get_submodule(name)
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(q.dequantized_weight(torch.float32))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, lin)
    model(**batch).loss.backward()
    return lin.weight.grad.square()


@pytest.fixture(scope="module")
def quantized_model(tiny_llama):
    model = load_model(tiny_llama, QuantSpec(4), torch.float32, progress=False)
    parent, _, child = WRAPPED.rpartition(".")  # one target already wrapped by an adapter (hooks go on .base_layer)
    setattr(model.get_submodule(parent), child, RoSALinear(model.get_submodule(WRAPPED), RANK, SCALE))
    return model


@pytest.fixture(scope="module")
def references(tiny_llama, quantized_model):
    batches = make_batches(quantized_model.config.vocab_size)
    return batches, {n: [reference_grad_square(tiny_llama, n, b) for b in batches] for n in (LAYER, WRAPPED)}


def shapes_of(model, names):
    return {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in names}


def test_accumulated_grad_squares_equal_dense_autograd(quantized_model, references):
    model, (batches, want) = quantized_model, references
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    acc = {n: torch.zeros(s) for n, s in shapes_of(model, [LAYER, WRAPPED]).items()}
    accumulate_weight_grad_squares(model, [LAYER, WRAPPED], batches[:1], acc)
    for n in acc:
        assert want[n][0].max() > 0
        torch.testing.assert_close(acc[n], want[n][0], **FP32)

    accumulate_weight_grad_squares(model, [LAYER, WRAPPED], batches[1:], acc)  # adds the second batch's
    for n in acc:
        torch.testing.assert_close(acc[n], want[n][0] + want[n][1], **FP32)

    # everything is as it was: mode, requires_grad flags, no .grad written, no hook left behind
    assert not model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags[f"{WRAPPED}.lora_A"] and all(p.grad is None for p in model.parameters())
    assert not getattr(model, "_require_grads_hooks", None)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("reentrant", [False, True])
def test_accumulation_under_gradient_checkpointing(tiny_llama, references, reentrant):
    """Recomputation runs the layers' forward (and hooks) twice; each batch must still count once."""
    batches, want = references
    model = load_model(tiny_llama, QuantSpec(4), torch.float32, progress=False).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    acc = {LAYER: torch.zeros(shapes_of(model, [LAYER])[LAYER])}
    accumulate_weight_grad_squares(model, [LAYER], batches, acc)
    torch.testing.assert_close(acc[LAYER], want[LAYER][0] + want[LAYER][1], **FP32)


def test_accumulates_into_memory_mapped_files(quantized_model, references, tmp_path):
    model, (batches, want) = quantized_model, references
    shapes = shapes_of(model, [LAYER, WRAPPED])
    acc = mmap_accumulators(shapes, tmp_path / "grads")
    assert all(a.abs().max() == 0 for a in acc.values())
    accumulate_weight_grad_squares(model, list(shapes), batches, acc)
    for n, (out_f, in_f) in shapes.items():
        torch.testing.assert_close(acc[n], want[n][0] + want[n][1], **FP32)
        path = tmp_path / "grads" / f"{n}.f32"
        assert path.stat().st_size == out_f * in_f * 4
        on_disk = torch.from_file(str(path), size=out_f * in_f, dtype=torch.float32).view(out_f, in_f)
        torch.testing.assert_close(on_disk, acc[n], atol=0, rtol=0)
    assert torch.equal(mmap_accumulators(shapes, tmp_path / "grads")[LAYER], torch.zeros(shapes[LAYER]))  # fresh zeros


def test_mask_from_accumulated_squares_sets_the_support(quantized_model, references):
    """The flow the lead wires: accumulate, select per matrix, set the support (before the optimizer)."""
    model, (batches, _) = quantized_model, references
    acc = {WRAPPED: torch.zeros(shapes_of(model, [WRAPPED])[WRAPPED])}
    accumulate_weight_grad_squares(model, [WRAPPED], batches, acc)
    layer = model.get_submodule(WRAPPED)
    layer.set_support(select_sparse_mask(acc[WRAPPED], 0.01))
    try:
        assert layer.nnz == math.ceil(0.01 * acc[WRAPPED].numel())
        chosen = acc[WRAPPED].flatten()[layer.sparse_indices]
        assert chosen.min() >= acc[WRAPPED].flatten().topk(layer.nnz).values.min()
    finally:
        layer.set_support(torch.zeros(0, dtype=torch.int64))


# --- merge -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["quant", "dense"])
def test_merged_weight_and_merged_equals_unmerged(kind):
    base = make_base(kind)
    layer = randomize_(RoSALinear(base, RANK, SCALE, indices=random_support()))
    W = dense_weight(base)
    S = torch.zeros(OUT * IN).index_put((layer.sparse_indices,), layer.sparse_values.detach()).view(OUT, IN)
    merged = layer.merged_weight(W)
    torch.testing.assert_close(merged, W + SCALE * layer.lora_B.detach() @ layer.lora_A.detach() + S, **FP32)

    x = torch.randn(4, 3, IN)
    unmerged = layer(x)
    torch.testing.assert_close(F.linear(x, merged, base.bias), unmerged, **FP32)  # merged ≈ unmerged

    # a fresh RoSA layer on the merged weight is the same function and merges to the same weight again
    merged_base = nn.Linear(IN, OUT).requires_grad_(False)
    with torch.no_grad():
        merged_base.weight.copy_(merged), merged_base.bias.copy_(base.bias)
    fresh = RoSALinear(merged_base, RANK, SCALE, indices=layer.sparse_indices)
    torch.testing.assert_close(fresh(x), unmerged, **FP32)
    torch.testing.assert_close(fresh.merged_weight(merged), merged, **FP32)


def test_state_dict_round_trip_restores_support_and_values():
    """sparse_indices is a persistent buffer: loading a saved state adopts its support, then its values."""
    src = randomize_(RoSALinear(make_base("quant"), RANK, SCALE, indices=random_support()))
    dst = RoSALinear(make_base("quant"), RANK, SCALE)  # empty support, as built before mask selection
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if not k.startswith("base_layer")}, strict=False)
    assert torch.equal(dst.sparse_indices, src.sparse_indices)
    x = torch.randn(5, IN)
    torch.testing.assert_close(dst(x), src(x), **FP32)
    values = dst.sparse_values  # the same support again (a resume): the parameter an optimizer holds stays
    dst.load_state_dict({"sparse_indices": src.sparse_indices, "sparse_values": src.sparse_values * 2}, strict=False)
    assert dst.sparse_values is values and torch.equal(values, src.sparse_values.detach() * 2)


def test_set_support_rejects_unsorted_or_out_of_range_indices():
    layer = RoSALinear(make_base("dense"), RANK, SCALE)
    for bad in ([3, 1], [1, 1], [OUT * IN], [-1]):
        with pytest.raises(ValueError):
            layer.set_support(torch.tensor(bad))


def test_dropout_only_on_the_low_rank_path():
    base = make_base("quant")
    with_dropout = randomize_(RoSALinear(base, RANK, SCALE, dropout=0.5, indices=random_support()))
    without = randomize_(RoSALinear(base, RANK, SCALE, indices=random_support()))
    x = torch.randn(IN)
    torch.testing.assert_close(with_dropout.eval()(x), without(x), **FP32)
    with torch.no_grad():
        with_dropout.lora_B.zero_(), without.lora_B.zero_()
    torch.testing.assert_close(with_dropout.train()(x), without(x), **FP32)  # x Sᵀ sees the clean x


class _FixedMask(nn.Module):
    """A dropout stand-in with a known mask, so a naive reference can use the same one."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("kind", ["quant", "dense"])
def test_fused_node_with_dropout_trains_s_on_the_clean_input(kind):
    """In the fused node (x·(W + S)ᵀ), dropout reaches only the low-rank path: dL/dS reads x, not x_d."""
    base = make_base(kind)
    layer = randomize_(RoSALinear(base, RANK, SCALE, indices=random_support()))
    mask = (torch.rand(IN, generator=torch.Generator().manual_seed(3)) > 0.5).float() * 2.0
    layer.dropout = _FixedMask(mask)
    x = torch.randn(3, 5, IN, requires_grad=True)
    params = [layer.lora_A, layer.lora_B, layer.sparse_values]
    A, B, v = (p.detach().clone().requires_grad_(True) for p in params)
    x_ref = x.detach().clone().requires_grad_(True)
    S = torch.zeros(OUT * IN).index_put((layer.sparse_indices,), v).view(OUT, IN)
    y_ref = F.linear(x_ref, dense_weight(base), base.bias) + SCALE * F.linear(F.linear(x_ref * mask, A), B) \
        + F.linear(x_ref, S)
    y = engine_linear.eager(layer, x)
    torch.testing.assert_close(y, y_ref, **FP32)
    grad_out = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, params + [x], grad_out)
    want = torch.autograd.grad(y_ref, [A, B, v, x_ref], grad_out)
    for name, g, w in zip(["A", "B", "sparse_values", "x"], got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, **FP32, msg=lambda s: f"grad of {name}: {s}")


def _out_by_in_tensors(layer, x) -> int:
    """How many (out, in)-sized tensors a forward + backward of `layer` creates: op outputs of that
    size whose storage is none of the op's inputs' (views and in-place ops create nothing)."""
    created = [0]

    class _Creations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.layout == torch.strided}
            for t in tree_leaves(out):
                if (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() == OUT * IN
                        and t.untyped_storage().data_ptr() not in inputs):
                    created[0] += 1
            return out

    with _Creations():
        engine_linear.eager(layer, x).sum().backward()
    return created[0]


def test_fused_node_forms_no_dense_tensor_beyond_the_base_weight():
    """S is folded into the dequantized weight that the GEMM forms anyway: a RoSA layer creates no more
    (out, in) tensors than a LoRA layer on the same base (none of them a dense S)."""
    from qtune.adapters.lora import LoRALinear

    base = make_base("quant")
    x = torch.randn(2, 4, IN, dtype=torch.bfloat16, requires_grad=True)  # 8 tokens: no activation is out·in
    rosa = randomize_(RoSALinear(base, RANK, SCALE, indices=random_support()))
    lora = LoRALinear(base, RANK, SCALE)
    n_lora, n_rosa = _out_by_in_tensors(lora, x), _out_by_in_tensors(rosa, x)
    assert n_lora >= 2 and n_rosa == n_lora  # the dequantized weight, forward and backward
    assert rosa.sparse_values.grad.abs().max() > 0
