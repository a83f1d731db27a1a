"""Quantized weights that live off the compute device and are brought in for each use.

    --offload disk   the packed codes and scales stay in a safetensors file (qtune's quantized cache or
                     a bnb-4bit checkpoint); every dequantization reads them (the OS page cache keeps
                     hot files fast) into a transient buffer that is freed with the dequantized copy.
                     Process memory holds one or two layers' quantized weights, not the model's.
    --offload cpu    the quantized weights stay in (pinned) host memory and are copied to the GPU for
                     each use. On a CPU-only machine the compute device is the host: nothing moves.

A StreamedWeight stands where a QuantizedWeight would (QuantLinear.qweight): `dequantize`,
`state_tensors`, `quant_type`, `compute_dtype`, `shape`. A Prefetcher shared by a model's weights
loads the weight after the one in use on a background thread, in the direction of the last two
uses (forward: layer order; backward: reverse), so reading overlaps compute.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from quant.formats import QuantizedWeight


class _Files:
    """Reads single tensors out of safetensors files with plain positioned reads.

    Not safe_open: it memory-maps the file, and every page a read touches then counts in the
    process's resident set until the kernel reclaims it, so a streamed model would still show its
    full size in RSS. A positioned read goes through the page cache (shared, reclaimable, not
    resident in the process) into a buffer that is freed with the tensor. The safetensors layout is
    an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
    the data."""

    DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "F16": torch.float16,
              "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool, "I16": torch.int16}

    def __init__(self):
        self._headers: dict[str, tuple[int, dict, int]] = {}  # path -> (data start, header, fd)
        self._lock = threading.Lock()

    def _header(self, path: str):
        with self._lock:
            entry = self._headers.get(path)
            if entry is None:
                fd = os.open(path, os.O_RDONLY)
                n = int.from_bytes(os.pread(fd, 8, 0), "little")
                header = json.loads(os.pread(fd, n, 8))
                entry = self._headers[path] = (8 + n, header, fd)
        return entry

    def get(self, path: str, key: str) -> torch.Tensor:
        start, header, fd = self._header(path)
        info = header[key]
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):  # os.preadv fills the tensor's own memory: no intermediate copy
            got = os.preadv(fd, [view[done:]], start + begin + done)
            if got <= 0:
                raise OSError(f"{path}: unexpected end of file reading {key}")
            done += got
        return buf.view(self.DTYPES[info["dtype"]]).reshape(info["shape"])


FILES = _Files()


class Prefetcher:
    """Loads the next weight (in the current direction of use) while the current one is used."""

    def __init__(self, enabled: bool = True):
        self.weights: list[StreamedWeight] = []
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qtune-prefetch") if enabled else None
        self._pending: dict[int, Future] = {}
        self._last = -1
        self._direction = 1
        self._lock = threading.Lock()
        self.loads = 0  # weights read from their home (for tests and measurements)

    def register(self, weight: "StreamedWeight") -> None:
        weight.index = len(self.weights)
        self.weights.append(weight)

    def fetch(self, weight: "StreamedWeight") -> QuantizedWeight:
        i = weight.index
        with self._lock:
            if i != self._last and self._last >= 0:
                self._direction = 1 if i > self._last else -1
            self._last = i
            future = self._pending.pop(i, None)
            for stale in [k for k in self._pending if abs(k - i) > 2]:  # direction changed: drop them
                self._pending.pop(stale).cancel()
            nxt = i + self._direction
            if self.enabled and 0 <= nxt < len(self.weights) and nxt not in self._pending:
                self._pending[nxt] = self._pool.submit(self.weights[nxt].load)
        return future.result() if future is not None else weight.load()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class StreamedWeight:
    """A quantized weight whose tensors are read from `home` (a file, or host memory) at each use."""

    def __init__(self, prefix: str, meta: QuantizedWeight, path: str | None = None,
                 host: QuantizedWeight | None = None, device: torch.device | str = "cpu",
                 prefetcher: Prefetcher | None = None):
        self.prefix = prefix                   # e.g. "model.layers.0.self_attn.q_proj."
        self.path, self.host = path, host      # exactly one of them is set
        self.keys = list(meta.state_tensors(prefix)) if path is not None else []
        self.quant_type, self.compute_dtype = meta.quant_type, meta.compute_dtype
        self._shape, self._blocksize = meta.shape, meta.blocksize
        self.target = torch.device(device)
        self.prefetcher = prefetcher
        self.index = -1
        if prefetcher is not None:
            prefetcher.register(self)

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def device(self) -> torch.device:
        return self.target

    @property
    def packed(self) -> torch.Tensor:
        """The packed codes (read for the asking: code that only wants a device should use .device)."""
        return self.load().packed

    @property
    def state(self):
        return self.load().state

    def load(self) -> QuantizedWeight:
        """The weight on the compute device, freshly read from its home (a transient copy)."""
        if self.prefetcher is not None:
            self.prefetcher.loads += 1
        if self.path is not None:
            tensors = {k: FILES.get(self.path, k) for k in self.keys}
            qw = QuantizedWeight.from_state_tensors(tensors, self.prefix)
        else:
            qw = QuantizedWeight.from_state_tensors(
                {k: v.to(self.target, non_blocking=True) if v.device != self.target else v
                 for k, v in self.host.state_tensors(self.prefix).items()}, self.prefix)
        qw.set_compute_dtype(self.compute_dtype)
        return qw.to_(self.target) if qw.device != self.target else qw

    @property
    def blocksize(self) -> int:
        return self._blocksize

    def resident(self) -> QuantizedWeight:
        """The weight read once (through the prefetcher), for a caller that dequantizes it more than once."""
        return self.prefetcher.fetch(self) if self.prefetcher is not None else self.load()

    def dequantize(self, dtype: torch.dtype | None = None, row_scale: torch.Tensor | None = None,
                   scales: torch.Tensor | None = None) -> torch.Tensor:
        return self.resident().dequantize(dtype, row_scale, scales)

    def block_scales(self) -> torch.Tensor:
        return self.resident().block_scales()

    def set_compute_dtype(self, dtype) -> None:
        if dtype is not None:
            self.compute_dtype = dtype

    def to_(self, device) -> "StreamedWeight":
        """Moving the model moves where the weight is brought to, not its home."""
        self.target = torch.device(device)
        return self

    def nbytes(self) -> int:
        return 0  # none of it is resident

    def state_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return self.load().state_tensors(prefix)


def stream_quantized_linears(model: torch.nn.Module, mode: str, files: dict[str, str] | None = None,
                             prefetch: bool = True) -> Prefetcher:
    """Replace every QuantLinear's weight by a StreamedWeight (mode 'disk': read from files[name], the
    safetensors file holding that module's quantized tensors; mode 'cpu': kept in host memory,
    pinned when CUDA is available). Returns the shared Prefetcher."""
    from quant.linear import QuantLinear

    if mode not in ("disk", "cpu"):
        raise ValueError(f"offload mode must be 'disk' or 'cpu', not {mode!r}")
    prefetcher = Prefetcher(enabled=prefetch)
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear) or module.qweight is None:
            continue
        qw = module.qweight
        if isinstance(qw, StreamedWeight):
            continue
        if mode == "disk":
            module.qweight = StreamedWeight(name + ".weight.", qw, path=str(Path(files[name])), device=qw.device,
                                            prefetcher=prefetcher)
        else:
            if torch.cuda.is_available():
                qw = QuantizedWeight.from_state_tensors({k: v.pin_memory() for k, v in qw.state_tensors("").items()})
            module.qweight = StreamedWeight("", qw, host=qw, device=module.qweight.device, prefetcher=prefetcher)
    return prefetcher
