"""The one-row GPU kernels (gpu_kernels.py) against numpy, on DEV when it is a GPU, else on OpenCL (PoCL)."""
import os

import numpy as np
import pytest
from tinygrad import Tensor, dtypes

from tinyllama2 import gpu_kernels
from tinyllama2.quantize import QuantLinear


def _device() -> str:
  for dev in (os.environ.get("DEV", ""), "CL"):
    if dev and gpu_kernels.available(dev): return dev
  pytest.skip("no device with local memory (a GPU, or OpenCL: install pocl-opencl-icd)")


def _np_dequant(q: QuantLinear) -> np.ndarray:
  """Q8_0/Q4_0 blocks to float32 with numpy: value = scale * q (Q4_0: low nibbles first, minus 8)."""
  packed, scale = q.packed.numpy(), q.scale.numpy().astype(np.float32)
  vals = packed.astype(np.float32) if q.mode == "int8" else \
    np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float32) - 8
  return (vals * scale[..., None]).reshape(packed.shape[0], -1)


SHAPES = [(96, 512), (40, 256), (30, 288)]   # 30x288: a row count the default rows-per-group does not divide


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_matvec_and_swiglu(N, K, dtype):
  dev, rng = _device(), np.random.default_rng(N + K)
  x, w, u = rng.standard_normal(K), rng.standard_normal((N, K)), rng.standard_normal((N, K))
  cast = lambda a: a.astype(np.float16 if dtype == dtypes.float16 else np.float32)
  xt = Tensor(cast(x), device=dev).reshape(1, 1, K)
  wt, ut = Tensor(cast(w), device=dev), Tensor(cast(u), device=dev)
  xr, wr, ur = (cast(a).astype(np.float64) for a in (x, w, u))
  tol = dict(rtol=1e-2, atol=1e-2) if dtype == dtypes.float16 else dict(rtol=1e-5, atol=1e-4)
  y = gpu_kernels.matvec(xt, wt)
  assert y is not None and y.shape == (1, 1, N) and y.dtype == dtype
  np.testing.assert_allclose(y.numpy().reshape(N), wr @ xr, **tol)
  g = wr @ xr
  h = gpu_kernels.matvec_swiglu(xt, wt, ut)
  np.testing.assert_allclose(h.numpy().reshape(N), g / (1 + np.exp(-g)) * (ur @ xr), **tol)


@pytest.mark.parametrize("N,K", [(96, 512), (64, 1024)])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_matvec(N, K, mode):
  dev, rng = _device(), np.random.default_rng(K)
  x, w = rng.standard_normal(K).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32)
  q = QuantLinear.from_float(Tensor(w, device=dev), mode)
  kernel = gpu_kernels.matvec_q8_0 if mode == "int8" else gpu_kernels.matvec_q4_0
  y = kernel(Tensor(x, device=dev).reshape(1, 1, K), q.packed, q.scale)
  assert y is not None
  np.testing.assert_allclose(y.numpy().reshape(N), _np_dequant(q).astype(np.float64) @ x, rtol=1e-5, atol=1e-4)


def test_shapes_that_do_not_split_fall_back():
  dev = _device()
  w = Tensor.ones(8, 36, device=dev)   # 36 floats: no 16-byte loads across 4+ threads
  assert gpu_kernels.matvec(Tensor.ones(1, 1, 36, device=dev), w) is None


def test_schedule_divides_the_shape():
  s = gpu_kernels.MatvecSchedule(threads=32, rows=4, rows_per_thread=2)
  opts = s.opts(30, 288, 8)   # 288/8 = 36 loads per row: 4 threads; 30 rows: 2 per thread, 1 per group (15 odd)
  assert [o.arg for o in opts] == [8, 4, 2]
