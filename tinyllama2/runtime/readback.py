"""Moving a step's inputs and outputs between host and device without a tinygrad graph: reading the logits back,
writing the tokens and positions of a batched step into the buffer its captured graph reads.

tinygrad 0.14 internals used: `Tensor.uop` (its `op`, `src`, `is_realized`, `buffer`), `Ops.RESHAPE`/`Ops.BUFFER`,
`Tensor._buffer()`, `Buffer.as_memoryview(force_zero_copy=True)`, `Buffer.copyin` and `dtype._to_np_dtype`.
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


def write_in_place(t: Tensor, values: np.ndarray) -> None:
  """Overwrite a realized tensor's buffer with values (same size and dtype), so that a captured graph reading that
  buffer sees them on its next run: written straight into host memory on the CPU, copied in elsewhere. Cheaper
  than an assign, which would be a graph and a kernel of its own every step. The device must be idle (the previous
  step's output read back)."""
  from tinygrad.dtype import _to_np_dtype
  data = np.ascontiguousarray(values, dtype=_to_np_dtype(t.dtype)).reshape(-1)
  buf = t.uop.buffer
  if data.nbytes != buf.nbytes: raise ValueError(f"{data.nbytes} bytes do not fill a buffer of {buf.nbytes}")
  if isinstance(t.device, str) and t.device.split(":")[0] == "CPU":
    if (view := _host_views.get(id(buf))) is None or view[0] is not buf:   # the memory of a buffer does not move
      if len(_host_views) >= 64: _host_views.clear()   # (a few feed buffers per decoder; don't keep old ones alive)
      view = _host_views[id(buf)] = (buf, np.frombuffer(buf.as_memoryview(force_zero_copy=True), dtype=data.dtype))
    view[1][:] = data
  else: buf.copyin(memoryview(data).cast("B"))


_host_views: dict[int, tuple] = {}   # id(Buffer) -> (the Buffer, a numpy array over its host memory)
