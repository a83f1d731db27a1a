"""A frozen linear layer whose weight is stored k-bit and dequantized just in time.

    y = x · D(Q(W))ᵀ + b

Forward dequantizes the packed weight into the activation dtype (bf16 on CPU and GPU), does one
GEMM and drops the dequantized copy. Backward needs only dL/dx = dL/dy · D(Q(W)), so it
dequantizes again: the autograd graph keeps a reference to the packed weight and nothing else —
no activation and no dequantized weight is saved for this layer (the weight is frozen, so x is
not needed for a weight gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.formats import QuantizedWeight, quantize


# Callables run while a dequantized weight is alive (forward and backward): a memory meter uses
# this to sample its peak (quant knows nothing of who listens).
MEMORY_PROBES: list = []


def _probe() -> None:
    for fn in MEMORY_PROBES:
        fn()


class _DequantLinearFn(torch.autograd.Function):
    """y = x D(W)ᵀ; saves only the QuantizedWeight reference (persistent anyway) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
        ctx.qweight = qweight
        w = qweight.dequantize(x.dtype)
        y = F.linear(x, w)
        _probe()
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # (..., out) @ (out, in) -> (..., in); the frozen weight gets no gradient
        w = ctx.qweight.dequantize(grad_out.dtype)
        grad_x = grad_out @ w
        _probe()
        return grad_x, None


def dequant_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · D(qweight)ᵀ (+ bias), differentiable w.r.t. x only."""
    y = _DequantLinearFn.apply(x, qweight)
    return y if bias is None else y + bias.to(y.dtype)


class QuantLinear(nn.Module):
    """Drop-in frozen replacement for nn.Linear with a k-bit weight.

    State-dict keys are those transformers writes for bitsandbytes' Linear4bit (`weight` = packed
    uint8, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
    `weight.quant_state.bitsandbytes__nf4`), so a model of QuantLinear layers saves to — and loads
    from — a checkpoint that transformers opens as a bitsandbytes 4-bit model.
    Unlike bitsandbytes' Linear4bit it never repacks its weight for CPU inference (that path
    asserts out_features % 32 == 0 on AVX512-bf16 CPUs), so eval and generate work on any shape.
    """

    def __init__(self, in_features: int, out_features: int, qweight: QuantizedWeight | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = qweight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "QuantLinear":
        qw = quantize(linear.weight.data, quant_type, double_quant, compute_dtype)
        bias = None if linear.bias is None else linear.bias.data.to(compute_dtype)
        return cls(linear.in_features, linear.out_features, qw, bias)

    @property
    def weight(self) -> torch.Tensor:
        """The packed codes (uint8), so that code asking `layer.weight.device` gets an answer."""
        return self.qweight.packed

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and hasattr(self.qweight, "dequantize_traced"):
            # inside a compiled graph: plain differentiable ops (autograd of the graph gives dL/dx)
            return F.linear(x, self.qweight.dequantize_traced(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return dequant_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        qt = self.qweight.quant_type if self.qweight is not None else "empty"
        return f"in_features={self.in_features}, out_features={self.out_features}, {qt}, bias={self.bias is not None}"

    # --- as frozen parameters (for sharding, e.g. FSDP2's fully_shard) ------------------------------------
    def as_parameters(self) -> None:
        """Register the packed codes and the block scales (the bulk of the weight) as frozen parameters,
        `qweight_packed` and `qweight_absmax`, so that a sharding wrapper can split and gather them. The rest
        of the quantization state (codes, the nested scales of the scales) stays in the QuantizedWeight.
        bind_parameters() then points the QuantizedWeight at whatever tensors the module holds now."""
        self.qweight_packed = nn.Parameter(self.qweight.packed, requires_grad=False)
        self.qweight_absmax = nn.Parameter(self.qweight.state.absmax, requires_grad=False)

    def quantized_parameters(self) -> list[torch.Tensor]:
        return [self._parameters[n] for n in ("qweight_packed", "qweight_absmax") if n in self._parameters]

    def bind_parameters(self) -> None:
        """After as_parameters(): the QuantizedWeight reads the module's current `qweight_packed` and
        `qweight_absmax` (a wrapper swaps sharded and gathered tensors in and out of the module)."""
        self.qweight.packed = self._parameters["qweight_packed"]
        self.qweight.state.absmax = self._parameters["qweight_absmax"]

    # nn.Module.to()/cuda() move parameters through _apply; the quantized weight is no parameter
    # (it must never be cast to a float dtype), so move it here, device only.
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.qweight is not None:
            self.qweight.to_(fn(torch.empty(0, device=self.qweight.device)).device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.qweight.state_tensors(prefix))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if prefix + "weight" in mine:
            dtype = self.qweight.compute_dtype if self.qweight is not None else None
            self.qweight = QuantizedWeight.from_state_tensors(mine, prefix)
            self.qweight.set_compute_dtype(dtype)
        elif strict:
            missing_keys.append(prefix + "weight")
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
