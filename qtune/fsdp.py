"""--distributed fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) per decoder layer over the quantized base
and the adapters, so that each rank holds 1/N of both between uses.

- The quantized weights become frozen parameters: each QuantLinear's packed codes (uint8) and block scales
  (the 8-bit double-quantized absmax, or fp32) are registered as `qweight_packed` / `qweight_absmax`, which
  FSDP2 shards along dim 0 and all-gathers byte for byte (FSDP2 gathers mixed dtypes as bytes). The small
  rest of the quantization state (the 16- and 256-value codes, the nested scales of the scales, the offset)
  stays replicated. The QuantizedWeight reads the gathered tensors at each forward of its layer
  (`QuantLinear.bind_parameters`), and its autograd node keeps them for backward, where FSDP2 gathers them
  again (the unsharded parameter is the same tensor object from step to step; its storage is freed and
  refilled).
- qtune's engine runs the layers itself (qtune.engine.block.decoder_block on each layer's modules), so each
  layer gets a small wrapper module (`ShardedBlock`) whose forward is that call: FSDP2's hooks then unshard
  before the layer's forward and its backward (recomputation included) and reshard after, and reduce-scatter
  the adapters' gradients. FSDP2 averages them over the ranks (gloo has no pre-scaled sum), so qtune.train
  multiplies each rank's loss, already divided by the global count of labelled tokens, by N (Dist.grad_scale). The wrappers live in one `ShardedStack`, FSDP2's root, which the engine calls.
- The layers compile as in one process (qtune.engine.compiled): FSDP2 keeps one gathered parameter tensor per
  weight from step to step, so the graphs' inputs keep their identity and shapes (tests/test_distributed.py).
- The embeddings, final norm and head are replicated (frozen, not quantized).
- Checkpoints hold full tensors: the adapters' and the optimizer state's shards are gathered on save and
  re-split on load, so a run resumes under another number of processes (qtune.train checks the batch).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qtune.errors import QtuneError
from quant import QuantLinear

FSDP_METHODS = ("qlora", "qpissa", "qdora", "qrosa")  # the methods qtune's block runs (qtune.model.FUSED_METHODS)


def check_supported(cfg) -> None:
    """Refuse, by name and before loading, what fsdp cannot shard."""
    if cfg.offload != "none":
        raise QtuneError(f"--distributed fsdp shards the quantized base across the processes, and --offload "
                         f"{cfg.offload} streams it from host memory or disk instead: the two do not combine. Use "
                         "--offload none with fsdp, or --distributed ddp with --offload.")
    if cfg.method not in FSDP_METHODS:
        raise QtuneError(f"--distributed fsdp runs qtune's decoder block, which has {', '.join(FSDP_METHODS)}; "
                         f"--method {cfg.method} runs its reference forward. Use --distributed ddp for {cfg.method}.")
    if cfg.bits == 16:
        raise QtuneError("--distributed fsdp shards the quantized base, and --bits 16 has none. Use --bits 4 or 8, "
                         "or --distributed ddp.")
    if cfg.recompute == "weights":
        raise QtuneError("--recompute weights holds every layer's dequantized base on each process, which undoes what "
                         "--distributed fsdp shards. Use --recompute max (or auto) with fsdp, or --distributed ddp.")


class ShardedBlock(nn.Module):
    """One decoder layer as FSDP2's unit: forward = qtune's block on that layer."""

    def __init__(self, index: int, layer: nn.Module):
        super().__init__()
        self.index, self.layer = index, layer
        self.quantized = [m for m in layer.modules() if isinstance(m, QuantLinear)]

    def forward(self, h, cos, sin, mask, run):
        for m in self.quantized:  # the gathered codes and scales, for this forward and its backward
            m.bind_parameters()
        return run(self.index, self.layer, h, cos, sin, mask)


class ShardedStack(nn.Module):
    """The decoder layers' wrappers; FSDP2's root (the engine calls it instead of its loop)."""

    def __init__(self, layers):
        super().__init__()
        self.blocks = nn.ModuleList(ShardedBlock(i, layer) for i, layer in enumerate(layers))

    def forward(self, h, rotations, masks, run):
        for i, block in enumerate(self.blocks):
            cos, sin = rotations[i]
            h = block(h, cos, sin, masks[i], run)
        return h


def shard_model(model: nn.Module, d, device: torch.device) -> None:
    """fully_shard each decoder layer (codes, scales, adapters) and attach the stack to the model's engine.

    The model comes in host memory, whole (each rank loaded or read the quantized base there); FSDP2 moves
    each layer to `device` as it shards it, so a GPU holds its 1/N of the base plus one layer at a time,
    never the whole base; then the rest (embeddings, norms, head) follows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    engine = model.qtune_engine
    if engine.unsupported is not None:
        raise QtuneError(f"--distributed fsdp runs qtune's decoder block, and this model runs transformers' forward "
                         f"({engine.unsupported}). Use --distributed ddp for it.")
    if engine.policy.keep_weights:  # --recompute auto chose weights or none for one process: held copies would undo
        from qtune.engine.linear import drop_dense_weights  # the shards (none stays uncheckpointed, without them)

        level = "max" if engine.policy.level == "weights" else engine.policy.level
        engine.policy = dataclasses.replace(engine.policy, keep_weights=False, held_layers=0, level=level)
        drop_dense_weights(model)
    mesh = init_device_mesh(device.type, (d.world,))
    layers = list(model.model.layers)
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, QuantLinear):
                m.as_parameters()
    stack = ShardedStack(layers)
    for block in stack.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(stack, mesh=mesh, reshard_after_forward=True)
    for block in stack.blocks:
        for m in block.quantized:  # at rest: the shards (the whole tensors they were cut from are freed)
            m.bind_parameters()
    model.to(device)  # what is not sharded (the shards are there already)
    engine.stack = stack


def base_bytes_on_rank(model: nn.Module) -> int:
    """Bytes of the quantized linears' codes and block scales this process holds between uses: its shards
    under fsdp, the whole tensors otherwise (the replicated rest of the quantization state is not counted)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            tensors = m.quantized_parameters() or [m.qweight.packed, m.qweight.state.absmax]
            for t in tensors:
                local = t.to_local() if hasattr(t, "to_local") else t
                total += local.numel() * local.element_size()
    return total


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole (gathered from the shards: every rank calls it, in the same order)."""
    from qtune.adapters import adapter_state_dict

    return {k: _full(v).detach().cpu() for k, v in sorted(adapter_state_dict(model).items())}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with each sharded state tensor gathered whole (collective)."""
    state = optimizer.state_dict()
    return {"param_groups": state["param_groups"],
            "state": {i: {k: _full(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in sorted(s.items())}
                      for i, s in sorted(state["state"].items())}}


@torch.no_grad()
def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, adapter: dict, optim_state: dict) -> None:
    """The inverse of full_adapter_state / full_optimizer_state: whole tensors split into this rank's shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from qtune.adapters import load_adapter_state_dict

    def shard_like(p, full):
        if isinstance(p, DTensor):
            return distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements).to_local()
        return full

    load_adapter_state_dict(model, adapter, copy=lambda p, full: (p.to_local() if isinstance(p, DTensor) else p)
                            .copy_(shard_like(p, full)))
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    state = {"param_groups": optim_state["param_groups"], "state": {}}
    for i, s in optim_state["state"].items():
        p = ordered[int(i)]
        state["state"][i] = {k: (DTensor.from_local(shard_like(p, v), p.device_mesh, p.placements,
                                                    shape=p.shape, stride=p.stride())
                                 if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v)
                             for k, v in s.items()}
    optimizer.load_state_dict(state)
