"""quant/: NF4 / FP4 / 8-bit block-wise weights and the just-in-time dequantizing linear.

Each test compares against a reference that does not go through quant's own code path:
- a naive decoder written here from the published NF4 table and the documented byte layout
  (SPEC "NF4 and k-bit quantization"; QLoRA arXiv 2305.14314, appendix E);
- bitsandbytes' own module path (bnb.nn.Params4bit / Linear4bit);
- F.linear with the dequantized fp32 weight.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from quant import QuantizedWeight, QuantLinear, quantize
from quant._bnb import bitsandbytes as bnb
from conftest import TOL

# The published NF4 table (QLoRA appendix E; bitsandbytes get_4bit_type("nf4")), typed in here on
# purpose: the reference decoder must not read its code values from the module under test.
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# (256, 128): 512 blocks of 64 -> two nested blocks of 256 absmax values.
# (86, 43): 3698 values, not a multiple of 64 (a partial last block) nor of 2 per row.
# (300, 96): 450 blocks (a partial nested block); in_features % 64 == 32. bitsandbytes 0.50's CPU
#   4-bit dequantize kernel decodes a 2-D shape row by row and gets every in_features with
#   in % 16 == 0 and in % 64 != 0 wrong (≈ 0.25 relative error instead of 0.09); QuantizedWeight
#   decodes such a weight as rows of one block each (quant.formats.decode_rows), and this shape
#   guards that. (256, 128) decodes as its own rows, (86, 43) as one flat row.
SHAPES_4BIT = [(256, 128), (86, 43), (300, 96)]
SHAPES_INT8 = [(256, 128), (86, 43), (300, 96)]


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Bytes -> 4-bit codes, high nibble first: [ab, cd] -> [a, b, c, d]; a trailing pad dropped."""
    b = packed.flatten().long()
    return torch.stack([b >> 4, b & 0x0F], dim=1).flatten()[:numel]


def _per_value(per_block: torch.Tensor, blocksize: int, numel: int) -> torch.Tensor:
    """One entry per block -> one entry per value of the flattened tensor."""
    return per_block.repeat_interleave(blocksize)[:numel]


def naive_dequantize_4bit(tensors: dict[str, torch.Tensor], code: torch.Tensor) -> torch.Tensor:
    """Decode transformers'/bitsandbytes' serialised 4-bit weight with plain indexing.

    Layout (SPEC): the weight is flattened row-major, cut into blocks of 64; each byte holds two
    codes, the first value in the high nibble. Double quantization: absmax of block b =
    nested_code[absmax_q[b]] * nested_absmax[b // 256] + offset.
    """
    meta = json.loads(bytes(tensors["weight.quant_state.bitsandbytes__" + _qtype(tensors)].tolist()).decode())
    shape = torch.Size(meta["shape"])
    numel, blocksize = shape.numel(), meta["blocksize"]
    assert blocksize == 64
    if "weight.nested_absmax" in tensors:
        # bitsandbytes' dynamic 8-bit map (nested_quant_map) is used only for the 256 nested code values
        q = tensors["weight.absmax"].long()
        nested = _per_value(tensors["weight.nested_absmax"], meta["nested_blocksize"], q.numel())
        absmax = tensors["weight.nested_quant_map"][q] * nested + torch.tensor(meta["nested_offset"], dtype=torch.float32)
    else:
        absmax = tensors["weight.absmax"]
    codes = _unpack_nibbles(tensors["weight"], numel)
    return (code[codes] * _per_value(absmax, blocksize, numel)).reshape(shape)


def naive_dequantize_int8(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """8-bit block-wise: one code byte per value, value = quant_map[byte] * absmax[block of 64]."""
    q = tensors["weight"]
    numel = q.numel()
    return (tensors["weight.quant_map"][q.flatten().long()] * _per_value(tensors["weight.absmax"], 64, numel)).reshape(q.shape)


def _qtype(tensors) -> str:
    (key,) = [k for k in tensors if k.startswith("weight.quant_state.bitsandbytes__")]
    return key.rsplit("__", 1)[1]


def _gaussian(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _rel_err(w_hat: torch.Tensor, w: torch.Tensor) -> float:
    return ((w_hat - w).norm() / w.norm()).item()


# --- the bit layout, decoded independently -----------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES_4BIT)
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_decode_with_published_table(shape, double_quant):
    w = _gaussian(shape)
    qw = quantize(w, "nf4", double_quant=double_quant)
    tensors = qw.state_tensors()
    assert ("weight.nested_absmax" in tensors) == double_quant
    assert torch.equal(tensors["weight.quant_map"], NF4_TABLE)  # we store the published table
    expected = naive_dequantize_4bit(tensors, NF4_TABLE)
    torch.testing.assert_close(qw.dequantize(torch.float32), expected, atol=1e-6, rtol=0)


def test_nf4_codes_are_the_nearest_table_value():
    """The encoder side, from the definition: code = argmin |w / absmax - NF4[i]|, absmax = max |w| per block."""
    w = _gaussian((256, 96), seed=1)
    qw = quantize(w, "nf4", double_quant=False)
    blocks = w.flatten().view(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    torch.testing.assert_close(qw.state.absmax, absmax, atol=0, rtol=0)
    nearest = ((blocks / absmax[:, None]).flatten()[:, None] - NF4_TABLE).abs().argmin(dim=1)
    codes = _unpack_nibbles(qw.packed, w.numel())
    assert (codes == nearest).float().mean().item() > 0.999  # exact ties may go either way


@pytest.mark.parametrize("shape", SHAPES_4BIT)
@pytest.mark.parametrize("double_quant", [True, False])
def test_fp4_bytes_decode(shape, double_quant):
    w = _gaussian(shape, seed=2)
    qw = quantize(w, "fp4", double_quant=double_quant)
    tensors = qw.state_tensors()
    # FP4's 16 code values are read from the stored quant_map (not typed in here): only the layout
    # (blocks, nibble order, double quantization) is checked independently for fp4.
    fp4_code = tensors["weight.quant_map"]
    assert fp4_code.numel() == 16 and fp4_code.abs().max() == 1.0
    expected = naive_dequantize_4bit(tensors, fp4_code)
    torch.testing.assert_close(qw.dequantize(torch.float32), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES_INT8)
def test_int8_blockwise_decode(shape):
    w = _gaussian(shape, seed=3)
    qw = quantize(w, "int8")
    tensors = qw.state_tensors()
    assert tensors["weight"].dtype == torch.uint8 and tensors["weight"].shape == w.shape
    assert tensors["weight.absmax"].numel() == -(-w.numel() // 64)
    torch.testing.assert_close(qw.dequantize(torch.float32), naive_dequantize_int8(tensors), atol=1e-6, rtol=0)


# --- bitsandbytes parity -----------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bytes_and_scales_equal_bitsandbytes_params4bit(quant_type, double_quant):
    w = _gaussian((256, 96), seed=4)
    # bitsandbytes' own module path; on CPU in bnb 0.50 `.to("cpu")` (or `._quantize("cpu")`) quantizes.
    p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant_type,
                          compress_statistics=double_quant, blocksize=64).to("cpu")
    assert p.bnb_quantized
    ref = p.quant_state
    ours = quantize(w, quant_type, double_quant=double_quant)
    assert torch.equal(ours.packed, p.data)
    assert torch.equal(ours.state.absmax, ref.absmax)
    assert torch.equal(ours.state.code, ref.code)
    if double_quant:
        assert torch.equal(ours.state.state2.absmax, ref.state2.absmax)
        assert torch.equal(ours.state.state2.code, ref.state2.code)
        assert ours.state.offset.item() == ref.offset.item()


def test_from_state_tensors_reads_bitsandbytes_linear4bit_state_dict():
    w, b = _gaussian((96, 128), seed=5), _gaussian((96,), seed=6)
    lin = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    lin.bias = nn.Parameter(b.clone(), requires_grad=False)
    lin = lin.to("cpu")  # quantizes
    sd = lin.state_dict()
    qw = QuantizedWeight.from_state_tensors(sd)
    assert qw.quant_type == "nf4" and qw.shape == (96, 128)
    expected = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    torch.testing.assert_close(qw.dequantize(torch.float32), expected, atol=0, rtol=0)
    torch.testing.assert_close(qw.dequantize(torch.float32), quantize(w).dequantize(torch.float32), atol=0, rtol=0)

    # the whole state dict loads into a QuantLinear, which then computes what Linear4bit computes
    ql = QuantLinear(128, 96, None, torch.empty(96))
    ql.load_state_dict(sd)
    ql.qweight.set_compute_dtype(torch.float32)
    x = _gaussian((3, 128), seed=7)
    lin.train()  # train mode: skips bnb's CPU eval repack path (see SPEC, out_features % 32)
    torch.testing.assert_close(ql(x), lin(x), **TOL[torch.float32])


# --- accuracy and size -------------------------------------------------------------------------

def test_reconstruction_error_on_gaussian_weights():
    w = _gaussian((1024, 1024), seed=8)
    nf4 = _rel_err(quantize(w, "nf4").dequantize(torch.float32), w)
    fp4 = _rel_err(quantize(w, "fp4").dequantize(torch.float32), w)
    int8 = _rel_err(quantize(w, "int8").dequantize(torch.float32), w)
    assert 0.07 < nf4 < 0.11, nf4  # SPEC: ≈ 0.092 on this machine
    assert fp4 > nf4, (fp4, nf4)  # NF4 is information-theoretically better for normal weights
    assert int8 < 0.02, int8


def test_nf4_double_quant_bits_per_param():
    w = _gaussian((4096, 4096), seed=9, dtype=torch.bfloat16)
    bits = quantize(w, "nf4", double_quant=True).nbytes() * 8 / w.numel()
    assert 4.12 <= bits <= 4.14, bits  # QLoRA: 4 + 8/64 + 32/(64*256) ≈ 4.127


# --- QuantLinear ---------------------------------------------------------------------------------

def _quant_linear(in_f, out_f, bias: bool, compute_dtype, seed=10, quant_type="nf4", double_quant=True):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_gaussian((out_f, in_f), seed=seed) * 0.05)
        if bias:
            lin.bias.copy_(_gaussian((out_f,), seed=seed + 1))
    return QuantLinear.from_linear(lin, quant_type, double_quant, compute_dtype), lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_quant_linear_forward_backward_equal_dequantized_matmul(dtype, bias):
    out_f, in_f = 192, 256
    ql, lin = _quant_linear(in_f, out_f, bias, dtype)
    w = ql.dequantized_weight(torch.float32)  # (out, in) fp32 reference weight
    b = None if lin.bias is None else lin.bias.detach()
    x = _gaussian((2, 3, in_f), seed=12).to(dtype).requires_grad_()
    x_ref = x.detach().float().requires_grad_()

    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ql(x)
    y_ref = F.linear(x_ref, w, b)
    assert y.dtype == dtype
    # only the packed weight is kept for backward: nothing the size of D(W) is saved
    assert all(n < out_f * in_f for n in saved), saved

    g = _gaussian(y.shape, seed=13)
    y.backward(g.to(dtype))
    y_ref.backward(g)
    if dtype == torch.float32:
        # without bias the same GEMM runs: bit-identical; with bias F.linear fuses it (addmm) while
        # QuantLinear adds it after the GEMM, a different rounding order: fp32 TOL
        tol = TOL[dtype] if bias else dict(atol=0, rtol=0)
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)
    else:
        torch.testing.assert_close(y.float(), y_ref, **TOL[dtype])
        torch.testing.assert_close(x.grad.float(), x_ref.grad, **TOL[dtype])
    # the frozen weight: not a parameter, never a gradient
    assert all(not p.requires_grad and p.grad is None for p in ql.parameters())
    assert ql.weight.grad is None and not ql.weight.requires_grad


def test_quant_linear_out_features_not_multiple_of_32_in_eval():
    """bnb's Linear4bit repacks for an AVX512-bf16 path in eval+no_grad and asserts out % 32 == 0
    (breaks 11008-wide layers); ours must not care about the shape."""
    for dtype in (torch.float32, torch.bfloat16):
        ql, _ = _quant_linear(43, 86, True, dtype, seed=14)
        ql.eval()
        x = _gaussian((8, 43), seed=15).to(dtype)
        with torch.no_grad():
            y = ql(x)
        y_ref = F.linear(x.float(), ql.dequantized_weight(torch.float32), ql.bias.float())
        torch.testing.assert_close(y.float(), y_ref, **TOL[dtype])


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)])
def test_state_dict_round_trip(quant_type, double_quant):
    ql, _ = _quant_linear(128, 64, True, torch.float32, seed=16, quant_type=quant_type, double_quant=double_quant)
    sd = ql.state_dict()
    fresh = QuantLinear(128, 64, None, torch.empty(64))
    fresh.load_state_dict(sd)
    assert fresh.qweight.quant_type == quant_type
    sd2 = fresh.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    x = _gaussian((4, 128), seed=17)
    fresh.qweight.set_compute_dtype(torch.float32)
    torch.testing.assert_close(fresh(x), ql(x), atol=0, rtol=0)


@pytest.mark.parametrize("double_quant", [True, False])
def test_module_to_dtype_keeps_quantized_storage(double_quant):
    ql, _ = _quant_linear(128, 64, True, torch.float32, seed=18, double_quant=double_quant)
    before = {k: (v.dtype, v.clone()) for k, v in ql.qweight.state_tensors().items()}
    model = nn.Sequential(ql, nn.Linear(64, 8)).to(torch.bfloat16)
    after = model[0].qweight.state_tensors()
    assert model[1].weight.dtype == torch.bfloat16 and model[0].bias.dtype == torch.bfloat16
    assert after.keys() == before.keys()
    for k, (dtype, value) in before.items():
        assert after[k].dtype == dtype, k  # uint8 codes, fp32 (or uint8 nested) scales: untouched
        assert torch.equal(after[k], value), k
    model.half()
    assert model[0].qweight.packed.dtype == torch.uint8


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(64))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="unknown quant_type"):
        quantize(torch.randn(64, 64), "nf3")
    assert set(quant.QUANT_TYPES) >= {"nf4", "fp4", "int8"}


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)])
def test_dequantize_with_row_scale_is_the_scaled_fp32_weight_rounded_once(quant_type, double_quant):
    """dequantize(dtype, row_scale=c) = round_dtype(diag(c)·D(W)), c folded into the fp32 block scales:
    DoRA's magnitude scale rides on the dequantization (qtune.adapters.dora)."""
    torch.manual_seed(0)
    qw = quantize(torch.randn(48, 128), quant_type, double_quant)
    c = 1 + 0.1 * torch.randn(48)
    exact = qw.dequantize(torch.float32) * c[:, None]
    torch.testing.assert_close(qw.dequantize(torch.float32, row_scale=c), exact, rtol=1e-6, atol=1e-7)
    bf16 = qw.dequantize(torch.bfloat16, row_scale=c)
    assert bf16.dtype == torch.bfloat16
    # one rounding: each value is the bf16 nearest to the exact product (half an ulp: 2^-8 relative at most)
    assert ((bf16.float() - exact).abs() <= exact.abs() * 2.0 ** -8).all()
    torch.testing.assert_close(bf16, exact.to(torch.bfloat16), atol=0, rtol=2.0 ** -7)


def test_a_row_scale_near_one_still_moves_a_bf16_weight():
    """Scaling the bf16 weight afterwards rounds twice, and a scale within 2^-9 of 1 rounds back to
    the unscaled weight; folded into the block scales it moves the values whose exact product
    crosses a rounding boundary: a shift of 2^-10 against a spacing of 2^-7..2^-8, 10–25% of them."""
    torch.manual_seed(0)
    qw = quantize(torch.randn(64, 128), "nf4", True)
    c = torch.full((64,), 1 + 2.0 ** -10)
    plain = qw.dequantize(torch.bfloat16)
    assert torch.equal((plain * c[:, None]).to(torch.bfloat16), plain)  # scaled afterwards: nothing moves
    moved = (qw.dequantize(torch.bfloat16, row_scale=c) != plain).float().mean()
    assert 0.05 < moved < 0.5


def test_row_scale_needs_blocks_within_rows():
    qw = quantize(torch.randn(8, 96), "nf4", True)  # 96 % 64: blocks straddle rows
    assert not quant.formats.can_scale_rows(qw.shape, qw.blocksize)
    with pytest.raises(ValueError, match="divisible by the block size"):
        qw.dequantize(torch.float32, row_scale=torch.ones(8))
    assert quant.formats.can_scale_rows(quantize(torch.randn(8, 128)).shape, 64)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)])
def test_block_scales_are_the_blocks_absmax_and_dequantize_takes_them(quant_type, double_quant):
    """block_scales() = each 64-value block's max |w| (8-bit nested quantization: within its error), and
    dequantize(scales=block_scales()) equals dequantize() bit for bit, with and without a row scale:
    QDoRA's forward decodes the nested scales once for its two dequantizations."""
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    qw = quantize(w, quant_type, double_quant)
    scales = qw.block_scales()
    assert scales.dtype == torch.float32 and scales.shape == (w.numel() // 64,)
    torch.testing.assert_close(scales, w.view(-1, 64).abs().amax(1), rtol=0.02 if double_quant else 1e-6, atol=0)
    c = 1 + 0.1 * torch.randn(48)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(qw.dequantize(dtype, scales=scales), qw.dequantize(dtype))
        assert torch.equal(qw.dequantize(dtype, row_scale=c, scales=scales), qw.dequantize(dtype, row_scale=c))
    # the scales really are what the dequantization uses: doubled scales, doubled weight
    torch.testing.assert_close(qw.dequantize(torch.float32, scales=2 * scales), 2 * qw.dequantize(torch.float32),
                               rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES_4BIT + [(1536, 576), (64, 80)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_4bit_decode_rows_match_the_flat_decode_bit_for_bit(shape, dtype):
    """decode_rows' 2-D shapes (rows of whole blocks, decoded one row per thread) give the values of
    the one flat row ([1, numel], the kernel's always-right form), bit for bit."""
    from quant.formats import decode_rows

    qw = quantize(_gaussian(shape, seed=5), "nf4", double_quant=True)
    rows = decode_rows(qw.shape, qw.blocksize)
    assert rows[0] * rows[1] == qw.shape.numel() and (rows[0] == 1 or rows[1] % qw.blocksize == 0)
    absmax = qw.block_scales()
    flat = torch.ops.bitsandbytes.dequantize_4bit(qw.packed, absmax, qw.blocksize, "nf4", [1, qw.shape.numel()], dtype)
    assert torch.equal(qw.dequantize(dtype), flat.view(qw.shape))
    assert torch.equal(qw.dequantize_traced(dtype), flat.view(qw.shape))
