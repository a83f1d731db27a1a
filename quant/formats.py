"""Block-wise k-bit quantization of a weight matrix, in bitsandbytes' own byte layout.

4-bit (NF4 / FP4), as QLoRA (arXiv 2305.14314) defines it and bitsandbytes stores it:
- the weight (out, in) is flattened row-major and cut into blocks of 64 values;
- each block stores absmax = max |w| and, per value, the index of the nearest of 16 code values
  to w / absmax. NF4's code is the 16 quantiles of N(0, 1) scaled to [-1, 1] with an exact 0
  (NF4_CODE below); FP4 is a 1-2-1 sign/exponent/mantissa float code;
- two 4-bit indices share one byte, the FIRST value in the HIGH nibble:
      values [a, b, c, d] -> bytes [a << 4 | b, c << 4 | d]        packed shape (numel / 2, 1) uint8
- double quantization: the fp32 absmax values (numel / 64 of them) are quantized again, to 8 bits
  with bitsandbytes' dynamic code, in blocks of 256, after subtracting their mean (`offset`).
  Scale overhead falls from 32/64 = 0.5 to 8/64 + 32/(64*256) ≈ 0.127 bit per weight.
8-bit: bitsandbytes' block-wise dynamic quantization (blocks of 64, fp32 absmax, 256-value code).

We do not re-implement the kernels: quantize/dequantize call bitsandbytes.functional, which runs
on CPU and CUDA. What this module adds is a small container (QuantizedWeight) that keeps the
packed bytes together with bitsandbytes' QuantState and serialises both under the exact tensor
names transformers uses for bitsandbytes 4-bit checkpoints.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch

from quant._bnb import bnbF

BLOCKSIZE = 64
QUANT_TYPES = ("nf4", "fp4", "int8")

# The published NF4 table (QLoRA appendix E; bitsandbytes functional.get_4bit_type("nf4")).
# Kept here as documentation and for tests that decode our bytes independently of bitsandbytes.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# key of the packed JSON blob in bitsandbytes' / transformers' serialisation of our 8-bit format
_INT8_STATE_KEY = "quant_state.qtune__int8"


@dataclass
class QuantizedWeight:
    """A frozen weight matrix in k-bit form: the packed codes plus bitsandbytes' QuantState.

    packed: 4-bit → (numel / 2, 1) uint8, two codes per byte (high nibble first);
            8-bit → (out, in) uint8, one code per byte.
    state:  bitsandbytes.functional.QuantState (absmax — nested when double-quantized —, code,
            blocksize, and the original weight's shape and dtype).
    compute_dtype: what dequantize() returns by default (None: the original dtype).
    quant_type: "nf4" | "fp4" | "int8".
    """

    packed: torch.Tensor
    state: "bnbF.QuantState"
    quant_type: str
    compute_dtype: torch.dtype | None = None

    @property
    def shape(self) -> torch.Size:
        return self.state.shape

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def blocksize(self) -> int:
        return self.state.blocksize

    def resident(self) -> "QuantizedWeight":
        """Itself: it is in memory (a quant.offload.StreamedWeight reads its home here)."""
        return self

    def block_scales(self) -> torch.Tensor:
        """The fp32 block scales (absmax), (numel / blocksize,): under double quantization, decoded from
        their 8-bit nested form (+ offset). For a caller that dequantizes one weight more than once
        (dequantize(scales=...)), so the nested scales are decoded once."""
        state = self.state
        if state.nested:
            return bnbF.dequantize_blockwise(state.absmax, state.state2).add_(state.offset)
        return state.absmax.float()

    def dequantize(self, dtype: torch.dtype | None = None, row_scale: torch.Tensor | None = None,
                   scales: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: compute_dtype), dequantized straight into it.

        row_scale (out,) fp32: the weight's rows times it (diag(row_scale)·W), applied to the fp32
        block scales, so that each value is rounded to `dtype` once. Scaling a bf16 weight afterwards
        rounds twice, and a scale within 2⁻⁹ of 1 would round back to the unscaled weight. Needs
        blocks that do not straddle rows (can_scale_rows).
        scales: this weight's block_scales(), when the caller has them already (row_scale, if given,
        is applied on top)."""
        dtype = dtype or self.compute_dtype or self.state.dtype
        state = copy.copy(self.state)  # shallow: only the copy's fields change
        state.dtype = dtype
        if row_scale is not None and not can_scale_rows(self.shape, self.blocksize):
            raise ValueError(f"row_scale needs in_features ({self.shape[1]}) divisible by the block size "
                             f"({self.blocksize}); scale the dequantized weight instead")
        if row_scale is not None or scales is not None:
            absmax = self.block_scales() if scales is None else scales
            if row_scale is not None:  # (out, in / blocksize) scales, each row times its factor
                absmax = (absmax.view(self.shape[0], -1) * row_scale.float()[:, None]).view(-1)
            state.absmax = absmax
            state.state2, state.offset, state.nested = None, None, False
        if self.quant_type == "int8":
            return bnbF.dequantize_blockwise(self.packed, state)
        state.shape = torch.Size(decode_rows(self.shape, self.blocksize))
        return bnbF.dequantize_4bit(self.packed, state).view(self.shape)

    def dequantize_traced(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dequantize(dtype), bit for bit, through bitsandbytes' registered operators only
        (torch.ops.bitsandbytes.dequantize_blockwise / dequantize_4bit, which have fake kernels):
        torch.compile traces this into a graph, where dequantize()'s Python (QuantState copies,
        bitsandbytes.functional's checks) would break it. No row_scale / scales arguments."""
        dtype = dtype or self.compute_dtype or self.state.dtype
        state, ops = self.state, torch.ops.bitsandbytes
        if state.nested:
            nested = state.state2
            absmax = ops.dequantize_blockwise(state.absmax, nested.absmax, nested.code, nested.blocksize,
                                              torch.float32) + state.offset
        else:
            absmax = state.absmax.float()
        if self.quant_type == "int8":
            return ops.dequantize_blockwise(self.packed, absmax, state.code, state.blocksize, dtype)
        return ops.dequantize_4bit(self.packed, absmax, state.blocksize, self.quant_type,
                                   decode_rows(self.shape, state.blocksize), dtype).view(self.shape)

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """The dtype dequantize() returns by default: the matmul's (bf16 on CPU), so that no fp32
        copy of the weight is made on the hot path."""
        self.compute_dtype = dtype

    def to_(self, device) -> "QuantizedWeight":
        """Move to `device` in place (as nn.Module.to does for parameters); returns self."""
        self.packed = self.packed.to(device)
        self.state.to(device)  # bitsandbytes moves absmax, code and the nested state in place
        return self

    def nbytes(self) -> int:
        """Bytes held: packed codes + scales (+ nested scales and codes)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    # -- serialisation ----------------------------------------------------------------------
    def state_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under transformers' names for a bitsandbytes 4-bit Linear's weight:
        `{prefix}weight`, `{prefix}weight.absmax`, `.quant_map`, `.nested_absmax`,
        `.nested_quant_map`, `.quant_state.bitsandbytes__nf4` (a JSON blob as uint8)."""
        out = {f"{prefix}weight": self.packed}
        if self.quant_type == "int8":
            meta = {"blocksize": self.state.blocksize, "shape": list(self.state.shape),
                    "dtype": str(self.state.dtype).removeprefix("torch.")}
            out[f"{prefix}weight.absmax"] = self.state.absmax
            out[f"{prefix}weight.quant_map"] = self.state.code
            out[f"{prefix}weight.{_INT8_STATE_KEY}"] = _json_to_tensor(meta)
        else:
            for k, v in self.state.as_dict(packed=True).items():
                out[f"{prefix}weight.{k}"] = v
        return out

    @classmethod
    def from_state_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "",
                           device: str | torch.device = "cpu") -> "QuantizedWeight":
        """Inverse of state_tensors(); also reads bitsandbytes 4-bit checkpoints written by
        transformers (e.g. published "-bnb-4bit" models)."""
        packed = tensors[f"{prefix}weight"].to(device)
        parts = {k[len(prefix) + len("weight."):]: v for k, v in tensors.items()
                 if k.startswith(f"{prefix}weight.")}
        if _INT8_STATE_KEY in parts:
            meta = _tensor_to_json(parts[_INT8_STATE_KEY])
            state = bnbF.QuantState(absmax=parts["absmax"].to(device), code=parts["quant_map"].to(device),
                                    blocksize=meta["blocksize"], shape=torch.Size(meta["shape"]),
                                    dtype=getattr(torch, meta["dtype"]))
            return cls(packed, state, "int8")
        state = bnbF.QuantState.from_dict(parts, device=torch.device(device))
        return cls(packed, state, state.quant_type)


def is_quantized_checkpoint_key(key: str) -> bool:
    """True for the auxiliary tensors of a quantized weight (`...weight.absmax` etc.)."""
    return ".weight." in key


def decode_rows(shape, blocksize: int) -> list[int]:
    """The 2-D shape to hand bitsandbytes' 4-bit dequantize kernel for a weight of `shape`: rows
    made of whole quantization blocks. Its CPU kernel decodes a 2-D shape row by row, one row per
    thread, and restarts the blocks at each row, while the blocks run over the flat weight: a shape
    whose rows split a block decodes wrong (bitsandbytes 0.50: in_features % 64 of 16, 32 or 48),
    and one row of numel values ([1, numel], always right) runs on one thread. So: the weight's own
    (out, in) where in is a multiple of the block size; else rows of one block each where numel is;
    else the one flat row, which is slower: it decodes on one thread. Same values bit for bit
    (tests/test_quant.py)."""
    n = int(torch.Size(shape).numel())
    if len(shape) == 2 and shape[1] % blocksize == 0:
        return [int(shape[0]), int(shape[1])]
    if n % blocksize == 0:
        return [n // blocksize, blocksize]
    return [1, n]


def can_scale_rows(shape, blocksize: int) -> bool:
    """Whether each quantization block lies within one row of an (out, in) weight (the blocks run over
    the flat weight), so that a per-row scale can be folded into the block scales."""
    return len(shape) == 2 and shape[1] % blocksize == 0


def quantize(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Quantize a 2-D weight (out, in) block-wise (blocks of 64) with bitsandbytes.

    The input may be fp32, bf16 or fp16; codes and scales come out identical to
    bitsandbytes.nn.Linear4bit's (QLoRA: NF4 + double quantization).
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {QUANT_TYPES}")
    weight = weight.contiguous()
    if quant_type == "int8":
        packed, state = bnbF.quantize_blockwise(weight.float(), blocksize=BLOCKSIZE)
        state.shape = weight.shape
    else:
        packed, state = bnbF.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                           quant_type=quant_type, quant_storage=torch.uint8)
    qw = QuantizedWeight(packed, state, quant_type)
    qw.set_compute_dtype(compute_dtype)
    return qw


def _json_to_tensor(obj) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def _tensor_to_json(t: torch.Tensor):
    return json.loads(bytes(t.tolist()).decode())
