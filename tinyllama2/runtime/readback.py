"""Reading a step's output (the logits) back to the host.

tinygrad 0.14 internals used: `Tensor.uop` (its `op`, `src`, `is_realized`, `buffer`), `Ops.RESHAPE`/`Ops.BUFFER`,
`Tensor._buffer()` and `Buffer.as_memoryview(force_zero_copy=True)`.
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.uop.ops import Ops


def to_numpy(t: Tensor) -> np.ndarray:
  """A realized tensor's values as a new numpy array. Host-memory devices (the CPU) are read in place after a
  synchronize: Tensor.numpy() schedules a copy program for every call, which on the CPU costs about as much as
  decoding a small model's token (~2 ms for stories15M's logits)."""
  if t.dtype != dtypes.float32 or not isinstance(t.device, str) or t.device.split(":")[0] != "CPU": return t.numpy()
  base = t.uop.src[0] if t.uop.op is Ops.RESHAPE else t.uop   # a reshape keeps the buffer's order
  whole = base.op is Ops.BUFFER and base.is_realized and base.buffer.size == t.numel()
  buf = base.buffer if whole else t._buffer()
  return np.frombuffer(buf.as_memoryview(force_zero_copy=True), dtype=np.float32).reshape(t.shape).copy()
