"""The CPU decode kernels against numpy: dense fp32/fp16 and Q8_0/Q4_0 blocks decoded from their raw bytes."""
import numpy as np
import pytest

from tinygrad import Tensor, dtypes
from tinyllama2 import cpu_kernels
from tinyllama2.model import Linear, resolve_device
from tinyllama2.quantize import QuantLinear

DEV = resolve_device(None)
pytestmark = pytest.mark.skipif(not cpu_kernels.available(DEV),
                                reason="the CPU decode kernels exist for tinygrad's clang CPU backend only")


def _x_w(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.standard_normal(k).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("n,k", [(40, 288), (7, 172), (5, 37), (3, 8), (33, 5)])   # tails of 8 and of 1 element
@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_dense_matvec_matches_numpy(n, k, dtype):
  x, w = _x_w(n, k)
  w_t = Tensor(w, device=DEV).cast(dtype).contiguous().realize()
  w_used = w_t.float().numpy().astype(np.float64)           # the fp16-rounded weights when dtype is half
  got = cpu_kernels.matvec(Tensor(x, device=DEV).reshape(1, 1, k), w_t).numpy()
  np.testing.assert_allclose(got, w_used @ x.astype(np.float64), rtol=1e-5, atol=1e-5)


def _np_dequant_q8_0(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
  return (packed.astype(np.float64) * scale.astype(np.float64)[..., None]).reshape(packed.shape[0], -1)


def _np_dequant_q4_0(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """Byte j of a block holds value j in its low nibble and value j + 16 in its high nibble; w = (nibble - 8) * d."""
  vals = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float64) - 8
  return (vals * scale.astype(np.float64)[..., None]).reshape(packed.shape[0], -1)


@pytest.mark.parametrize("mode,kernel,dequant", [("int8", cpu_kernels.matvec_q8_0, _np_dequant_q8_0),
                                                 ("int4", cpu_kernels.matvec_q4_0, _np_dequant_q4_0)])
def test_block_matvec_matches_numpy_dequantize_then_matmul(mode, kernel, dequant):
  x, w = _x_w(24, 320, seed=1)
  q = QuantLinear.from_float(Tensor(w, device=DEV), mode)
  w_np = dequant(q.packed.numpy(), q.scale.numpy())
  assert np.abs(w_np - w).max() < (0.05 if mode == "int8" else 0.4)   # really a quantization of w
  got = kernel(Tensor(x, device=DEV), q.packed, q.scale).numpy()
  np.testing.assert_allclose(got, w_np @ x.astype(np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_layers_use_the_kernel_for_one_row_and_agree_with_the_generic_matmul(mode):
  x, w = _x_w(16, 64, seed=2)
  layer = Linear.wrap(Tensor(w, device=DEV).contiguous().realize()) if mode is None \
    else QuantLinear.from_float(Tensor(w, device=DEV), mode)
  one = Tensor(x, device=DEV).reshape(1, 1, 64)
  two = Tensor(np.stack([x, x]), device=DEV).reshape(2, 1, 64)               # two rows: the generic matmul
  assert cpu_kernels.usable(one, dtypes.float32 if mode is None else layer.packed.dtype, one.device)
  assert not cpu_kernels.usable(two, dtypes.float32, two.device)
  y1, y2 = layer(one).numpy(), layer(two).numpy()
  assert y1.shape == (1, 1, 16) and y2.shape == (2, 1, 16)
  np.testing.assert_allclose(y1[0, 0], y2[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_fused_qkv_and_swiglu_kernels_match_numpy(dtype):
  rng = np.random.default_rng(3)
  x = rng.standard_normal(100).astype(np.float32)
  ws = [Tensor(rng.standard_normal((n, 100)).astype(np.float32), device=DEV).cast(dtype).contiguous().realize()
        for n in (16, 8, 8)]
  w64 = [w.float().numpy().astype(np.float64) for w in ws]
  xt = Tensor(x, device=DEV)
  np.testing.assert_allclose(cpu_kernels.matvec_concat(xt, ws).numpy(), np.concatenate([w @ x for w in w64]),
                             rtol=1e-5, atol=1e-5)
  gate, up = w64[1] @ x, w64[2] @ x
  np.testing.assert_allclose(cpu_kernels.matvec_swiglu(xt, ws[1], ws[2]).numpy(), gate / (1 + np.exp(-gate)) * up,
                             rtol=1e-5, atol=1e-5)
