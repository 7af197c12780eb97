"""The CPU kernels against numpy: one-row (decode) and several-row (prefill) products with dense fp32/fp16
weights and Q8_0/Q4_0 blocks decoded from their raw bytes."""
import re

import numpy as np
import pytest

from tinygrad import Tensor, dtypes
from tinyllama2 import ops
from tinyllama2.ops import cpu as cpu_kernels
from tinyllama2.devices import resolve_device
from tinyllama2.layers import Linear
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


def np_q8_0_activations(x: np.ndarray) -> np.ndarray:
  """x rounded as llama.cpp's quantize_row_q8_0 does before a Q8_0/Q4_0 dot product: per block of 32,
  d = amax / 127 and q = round-to-even(x * (1 / d)), in float32; returns q * d in float64."""
  b = x.reshape(-1, 32).astype(np.float32)
  d = np.abs(b).max(-1) / np.float32(127)
  inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
  return (np.rint(b * inv[:, None]).astype(np.float64) * d.astype(np.float64)[:, None]).reshape(x.shape)


def _matvec_q8_0(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
  """x [..., K] (one row) against Q8_0 blocks: packed int8 [N, K/32, 32], scale fp16 [N, K/32] → float32 [N]."""
  return cpu_kernels.matvec_blocks("q8_0", x, [(packed, scale)])


def _matvec_q4_0(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
  """x [..., K] (one row) against Q4_0 blocks: packed uint8 [N, K/32, 16], scale fp16 [N, K/32] → float32 [N]."""
  return cpu_kernels.matvec_blocks("q4_0", x, [(packed, scale)])


@pytest.mark.parametrize("mode,kernel,dequant", [("int8", _matvec_q8_0, _np_dequant_q8_0),
                                                 ("int4", _matvec_q4_0, _np_dequant_q4_0)])
def test_block_matvec_matches_numpy_with_x_quantized_to_q8_0(mode, kernel, dequant):
  x, w = _x_w(24, 320, seed=1)
  x[:32] = 0   # a block of zeros (scale 0)
  q = QuantLinear.from_float(Tensor(w, device=DEV), mode)
  w_np = dequant(q.packed.numpy(), q.scale.numpy())
  assert np.abs(w_np - w).max() < (0.05 if mode == "int8" else 0.4)   # really a quantization of w
  x_q = np_q8_0_activations(x)
  assert 0 < np.abs(x_q - x).max() < 0.02   # x really is rounded, and only slightly
  got = kernel(Tensor(x, device=DEV), q.packed, q.scale).numpy()
  np.testing.assert_allclose(got, w_np @ x_q, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode,dequant", [("int8", _np_dequant_q8_0), ("int4", _np_dequant_q4_0)])
def test_fused_block_kernels_for_qkv_and_swiglu(mode, dequant):
  """q, k and v (three block layers) in one kernel, and gate/up/SwiGLU in one, x rounded to Q8_0 once."""
  x, _ = _x_w(1, 256, seed=4)
  layers = [QuantLinear.from_float(Tensor(_x_w(n, 256, seed=5 + n)[1], device=DEV), mode) for n in (48, 16, 16)]
  deq = [dequant(q.packed.numpy(), q.scale.numpy()) for q in layers]
  x_q, xt = np_q8_0_activations(x), Tensor(x, device=DEV)
  qkv = cpu_kernels.matvec_blocks(layers[0].block_kind, xt, [(q.packed, q.scale) for q in layers]).numpy()
  np.testing.assert_allclose(qkv, np.concatenate(deq) @ x_q, rtol=1e-5, atol=1e-4)
  gate, up = layers[0], QuantLinear.from_float(Tensor(_x_w(48, 256, seed=9)[1], device=DEV), mode)
  h = cpu_kernels.matvec_blocks_swiglu(gate.block_kind, xt, (gate.packed, gate.scale), (up.packed, up.scale)).numpy()
  g = deq[0] @ x_q
  np.testing.assert_allclose(h, g / (1 + np.exp(-g)) * (dequant(up.packed.numpy(), up.scale.numpy()) @ x_q),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_layers_use_the_kernels_for_one_and_several_rows_and_match_numpy(mode):
  x, w = _x_w(16, 64, seed=2)
  layer = Linear(Tensor(w, device=DEV).contiguous().realize()) if mode is None \
    else QuantLinear.from_float(Tensor(w, device=DEV), mode)
  w_np = w.astype(np.float64) if mode is None else \
    (_np_dequant_q8_0 if mode == "int8" else _np_dequant_q4_0)(layer.packed.numpy(), layer.scale.numpy())
  one = Tensor(x, device=DEV).reshape(1, 1, 64)
  xs = np.stack([x, -x, 2 * x])
  three = Tensor(xs, device=DEV).reshape(3, 1, 64)
  assert ops.route(one, [layer])[:2] == ("row", cpu_kernels) and ops.route(three, [layer])[:2] == ("rows", cpu_kernels)
  y1, y3 = layer(one).numpy(), layer(three).numpy()
  assert y1.shape == (1, 1, 16) and y3.shape == (3, 1, 16)
  np.testing.assert_allclose(y1[0, 0], w_np @ (x if mode is None else np_q8_0_activations(x)), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(y3[:, 0], xs.astype(np.float64) @ w_np.T, rtol=1e-5, atol=1e-4)


# rows of x: a multiple of the 4-row tile and not; weight rows: a multiple of 3 and not; K with tails of 8
@pytest.mark.parametrize("m,n,k", [(8, 12, 64), (7, 13, 64), (2, 5, 37), (9, 1, 8), (5, 4, 3)])
@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_dense_matmul_matches_numpy(m, n, k, dtype):
  rng = np.random.default_rng(m * 100 + n)
  x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
  w_t = Tensor(w, device=DEV).cast(dtype).contiguous().realize()
  got = cpu_kernels.matmul(Tensor(x, device=DEV), w_t).numpy()
  np.testing.assert_allclose(got, x.astype(np.float64) @ w_t.float().numpy().astype(np.float64).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,kind,dequant", [("int8", "q8_0", _np_dequant_q8_0), ("int4", "q4_0", _np_dequant_q4_0)])
def test_block_matmul_matches_numpy_dequantize_then_matmul(mode, kind, dequant):
  rng = np.random.default_rng(6)
  x, w = rng.standard_normal((2, 3, 96)).astype(np.float32), rng.standard_normal((11, 96)).astype(np.float32)
  q = QuantLinear.from_float(Tensor(w, device=DEV), mode)
  got = cpu_kernels.matmul(Tensor(x, device=DEV), q.packed, q.scale, kind).numpy()
  assert got.shape == (2, 3, 11)
  np.testing.assert_allclose(got, x.astype(np.float64) @ dequant(q.packed.numpy(), q.scale.numpy()).T, rtol=1e-5, atol=1e-4)


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


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_several_row_swiglu_kernel_matches_numpy(dtype):
  rng = np.random.default_rng(7)
  x = rng.standard_normal((6, 40)).astype(np.float32)   # a 4-row tile and 2 single rows; 10 = 3 + 3 + 3 + 1 outputs
  gate, up = (Tensor(rng.standard_normal((10, 40)).astype(np.float32), device=DEV).cast(dtype).contiguous().realize()
              for _ in range(2))
  g, u = (x.astype(np.float64) @ w.float().numpy().astype(np.float64).T for w in (gate, up))
  got = cpu_kernels.matmul_swiglu(Tensor(x, device=DEV), gate, up).numpy()
  np.testing.assert_allclose(got, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-5)


def test_silu_mul_kernel_matches_numpy_over_the_whole_exp_range():
  rng = np.random.default_rng(8)
  g = np.concatenate([np.linspace(-120, 120, 37), rng.standard_normal(74) * 6]).astype(np.float32).reshape(3, 37)
  u = rng.standard_normal((3, 37)).astype(np.float32)   # 37 = 4 vectors of 8 and a tail of 5 per row
  got = cpu_kernels.silu_mul(Tensor(g, device=DEV), Tensor(u, device=DEV)).numpy()
  g64 = g.astype(np.float64)
  np.testing.assert_allclose(got, g64 / (1 + np.exp(-g64)) * u, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("mode,dequant", [("int8", _np_dequant_q8_0), ("int4", _np_dequant_q4_0)])
def test_quantized_feed_forward_of_several_rows_matches_numpy(mode, dequant):
  from tinyllama2.config import ModelArgs
  from tinyllama2.model import FeedForward
  rng = np.random.default_rng(9)
  ff = FeedForward(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=8, hidden_dim=96),
                   lambda n_in, n_out: Linear.empty(n_in, n_out, dtypes.float32, DEV))
  for name in ("w1", "w2", "w3"):
    w = rng.standard_normal(getattr(ff, name).weight.shape).astype(np.float32)
    setattr(ff, name, QuantLinear.from_float(Tensor(w, device=DEV), mode))
  x = rng.standard_normal((1, 5, 64)).astype(np.float32)
  w1, w2, w3 = (dequant(q.packed.numpy(), q.scale.numpy()) for q in (ff.w1, ff.w2, ff.w3))
  g, u = x[0].astype(np.float64) @ w1.T, x[0].astype(np.float64) @ w3.T
  np.testing.assert_allclose(ff(Tensor(x, device=DEV)).numpy()[0], (g / (1 + np.exp(-g)) * u) @ w2.T, rtol=1e-5, atol=1e-4)


def _np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, bias: np.ndarray) -> np.ndarray:
  """Causal attention in float64: query t of q [B, T, H, D] sees keys 0..start+t of k, v [B, KV, L, D]."""
  B, T, H, D = q.shape
  out = np.zeros(q.shape)
  for b in range(B):
    for t in range(T):
      for h in range(H):
        kv = h // (H // k.shape[1])
        keys, vals = k[b, kv, :start + t + 1], v[b, kv, :start + t + 1]
        s = keys @ q[b, t, h] / np.sqrt(D) + bias[b, :start + t + 1]
        p = np.exp(s - s.max())
        out[b, t, h] = p @ vals / p.sum()
  return out


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
@pytest.mark.parametrize("head_dim", [16, 6])   # 8-wide dot products, and the scalar ones
def test_attention_kernel_matches_numpy_at_symbolic_positions(dtype, head_dim):
  from tinygrad import TinyJit, Variable
  rng = np.random.default_rng(8)
  B, T, H, KV, L = 2, 3, 4, 2, 16
  q = rng.standard_normal((B, T, H, head_dim)).astype(np.float32)
  k_t, v_t = (Tensor(rng.standard_normal((B, KV, L, head_dim)).astype(np.float32), device=DEV).cast(dtype).contiguous().realize()
              for _ in range(2))
  k, v = (t.float().numpy().astype(np.float64) for t in (k_t, v_t))
  bias = np.zeros((B, L), dtype=np.float32)
  bias[1, :2] = -30.0   # row 1 hides its first two positions (finite: the float64 reference keeps every digit)
  bias_t = Tensor(bias, device=DEV).realize()
  pos = Variable("start_pos", 0, L - T)

  @TinyJit
  def step(qt: Tensor, new_k: Tensor, p: Variable) -> Tensor:
    k_t[:, :, p:p + T].assign(new_k)   # as in the model: the cache is updated, then read
    return cpu_kernels.attention(qt, k_t, v_t, p, bias_t).realize()

  for start in (2, 5, 0, 13, 7):   # keys past start + t hold random values: reading them would show
    new_k = rng.standard_normal((B, KV, T, head_dim)).astype(np.float32)
    k[:, :, start:start + T] = new_k.astype(np.float16 if dtype == dtypes.float16 else np.float32)
    got = step(Tensor(q * (start + 1), device=DEV), Tensor(new_k, device=DEV).cast(dtype), pos.bind(start)).numpy()
    np.testing.assert_allclose(got, _np_attention(q.astype(np.float64) * (start + 1), k, v, start, bias), rtol=1e-4, atol=1e-5)
  got = cpu_kernels.attention(Tensor(q, device=DEV), k_t, v_t, 4).numpy()   # a plain int position, no bias
  np.testing.assert_allclose(got, _np_attention(q.astype(np.float64), k, v, 4, np.zeros((B, L))), rtol=1e-4, atol=1e-5)


def test_kernels_call_nothing_outside_themselves(monkeypatch):
  """tinygrad's ELF loader links an external call (say, libm's expf) with an unchecked 32-bit displacement: the
  kernel then crashes once the process has mapped a few GB. Every kernel must load with no library at all."""
  from tinygrad.runtime.support.compiler_cpu import ClangCompiler
  from tinygrad.runtime.support.elf import elf_loader
  sources, original = [], cpu_kernels.kernel_source
  monkeypatch.setattr(cpu_kernels, "kernel_source", lambda src: sources.append(original(src)) or sources[-1])
  rng = np.random.default_rng(9)
  w = Tensor(rng.standard_normal((12, 64)).astype(np.float32), device=DEV).realize()
  one, rows = Tensor(rng.standard_normal(64).astype(np.float32), device=DEV), Tensor(rng.standard_normal((5, 64)).astype(np.float32), device=DEV)
  cache = Tensor.zeros(1, 2, 8, 16, device=DEV).contiguous().realize()
  for mode in ("int8", "int4"):
    q = QuantLinear.from_float(w, mode)
    q(one.reshape(1, 64)), q(rows)
  cpu_kernels.matvec(one, w), cpu_kernels.matvec_swiglu(one, w, w), cpu_kernels.matmul_swiglu(rows, w, w)
  cpu_kernels.silu_mul(rows, rows)   # exp of 8 lanes at once
  cpu_kernels.attention(Tensor.zeros(1, 2, 4, 16, device=DEV), cache, cache, 3)
  norm = (Tensor.ones(64, device=DEV).contiguous().realize(), 1e-5)   # RMSNorm takes a square root
  cpu_kernels.matvec_concat(one, [w], norm=norm, residual=Tensor.zeros(12, device=DEV)), cpu_kernels.matvec_swiglu(one, w, w, norm)
  table = Tensor.ones(8, 8, device=DEV).contiguous().realize()
  cpu_kernels.decode_attention(Tensor.zeros(64, device=DEV), cache, cache, table, table, 3, Tensor([3], dtype=dtypes.int32, device=DEV), 2)
  assert len(sources) >= 10
  compiler = ClangCompiler(["x86_64" if cpu_kernels.cpu_threads.supported() else "arm64", "native"])
  for src in sources:
    params = ", ".join(["float* data0"] + [f"void* data{i}" for i in range(1, 10)])   # {0} is the float32 output
    name = re.search(r"leaq (\w+)\(", src)   # a threaded kernel takes its own address by its name
    body = src.format(*[f"data{i}" for i in range(10)])
    obj = compiler.compile(f"void {name.group(1) if name else 'kernel'}({params}) {{\n{body}\n}}")
    elf_loader(obj)   # raises on a relocation against an undefined symbol


def _np_rmsnorm_f32(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
  """RMSNorm as the kernels compute it, in float32 (x * (1 / sqrt(mean(x^2) + eps)) * w)."""
  inv = np.float32(1) / np.sqrt(np.float32((x.astype(np.float64) ** 2).mean()) + np.float32(eps))
  return x * inv * w.astype(np.float32)


@pytest.mark.parametrize("kind", ["f32", "f16", "int8", "int4"])
def test_rmsnorm_and_residual_fuse_into_the_one_row_products(kind):
  """norm_ kernels normalize x themselves (the norm weight read as the model stores it), _res kernels add the
  residual: the same numbers as numpy's RMSNorm, product and sum."""
  rng = np.random.default_rng(11)
  K, eps = 96, 1e-5
  x, res = rng.standard_normal(K).astype(np.float32) * 3, rng.standard_normal(8).astype(np.float32)
  ws = [rng.standard_normal((n, K)).astype(np.float32) for n in (8, 8, 8)]
  half = kind == "f16"
  norm_w = Tensor((1 + 0.5 * rng.standard_normal(K)).astype(np.float32), device=DEV).cast(dtypes.float16 if half else dtypes.float32).realize()
  x_n = _np_rmsnorm_f32(x, norm_w.float().numpy(), eps)
  xt, norm = Tensor(x, device=DEV), (norm_w, eps)
  if kind in ("f32", "f16"):
    wt = [Tensor(w, device=DEV).cast(dtypes.float16 if half else dtypes.float32).contiguous().realize() for w in ws]
    w64, x_used = [w.float().numpy().astype(np.float64) for w in wt], x_n.astype(np.float64)
    qkv = cpu_kernels.matvec_concat(xt, wt, norm=norm)
    h = cpu_kernels.matvec_swiglu(xt, wt[1], wt[2], norm=norm)
    one = cpu_kernels.matvec_concat(Tensor(x_n, device=DEV), wt[:1], residual=Tensor(res, device=DEV))
  else:
    layers = [QuantLinear.from_float(Tensor(w, device=DEV), kind) for w in ws]
    dequant = _np_dequant_q8_0 if kind == "int8" else _np_dequant_q4_0
    w64, x_used = [dequant(q.packed.numpy(), q.scale.numpy()) for q in layers], np_q8_0_activations(x_n)
    blocks = [(q.packed, q.scale) for q in layers]
    qkv = cpu_kernels.matvec_blocks(layers[0].block_kind, xt, blocks, norm=norm)
    h = cpu_kernels.matvec_blocks_swiglu(layers[0].block_kind, xt, blocks[1], blocks[2], norm=norm)
    one = cpu_kernels.matvec_blocks(layers[0].block_kind, Tensor(x_n, device=DEV), blocks[:1], residual=Tensor(res, device=DEV))
  np.testing.assert_allclose(qkv.numpy(), np.concatenate(w64) @ x_used, rtol=1e-5, atol=1e-4)
  g, u = w64[1] @ x_used, w64[2] @ x_used
  np.testing.assert_allclose(h.numpy(), g / (1 + np.exp(-g)) * u, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(one.numpy(), res + w64[0] @ x_used, rtol=1e-5, atol=1e-4)


def _np_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
  """Rotate interleaved pairs of x [heads, D] by angles with cos/sin [D/2] (complex multiplication)."""
  z = (x[:, 0::2] + 1j * x[:, 1::2]) * (cos + 1j * sin)
  return np.stack([z.real, z.imag], -1).reshape(x.shape)


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
@pytest.mark.parametrize("head_dim", [16, 6])
def test_decode_attention_rotates_writes_the_cache_and_attends(dtype, head_dim):
  """One kernel per layer and token: RoPE of q and k at the position in a buffer, k and v into the cache at that
  row (and no other), attention over rows 0..position (GQA: 4 query heads over 2 kv heads)."""
  rng = np.random.default_rng(12)
  H, KV, L, D = 4, 2, 12, head_dim
  angles = np.outer(np.arange(L), 1.0 / 10000 ** (np.arange(0, D, 2) / D))
  cos_t, sin_t = (Tensor(f(angles).astype(np.float32), device=DEV).realize() for f in (np.cos, np.sin))
  history = [rng.standard_normal((KV, L, D)).astype(np.float32) for _ in range(2)]
  k_t, v_t = (Tensor(h[None], device=DEV).cast(dtype).contiguous().realize() for h in history)
  as_cache = np.float16 if dtype == dtypes.float16 else np.float32
  k_np, v_np = (h.astype(as_cache).astype(np.float64) for h in history)
  for pos in (5, 0, 11):
    qkv = rng.standard_normal((H + 2 * KV) * D).astype(np.float32)
    got = cpu_kernels.decode_attention(Tensor(qkv, device=DEV), k_t, v_t, cos_t, sin_t, pos,
                                       Tensor([pos], dtype=dtypes.int32, device=DEV), H).numpy()
    c, s = np.cos(angles[pos]), np.sin(angles[pos])
    q = _np_rope(qkv[:H * D].reshape(H, D).astype(np.float64), c, s)
    k_np[:, pos] = _np_rope(qkv[H * D:(H + KV) * D].reshape(KV, D).astype(np.float64), c, s).astype(as_cache)
    v_np[:, pos] = qkv[(H + KV) * D:].reshape(KV, D).astype(as_cache)
    np.testing.assert_allclose(k_t.float().numpy()[0], k_np, rtol=1e-6, atol=1e-6)   # row pos written, the rest kept
    np.testing.assert_allclose(v_t.float().numpy()[0], v_np, rtol=1e-6, atol=1e-6)
    want = _np_attention(q[None, None], k_np[None], v_np[None], pos, np.zeros((1, L)))
    np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,mode", [(dtypes.float32, None), (dtypes.float16, "int4")])   # dense; blocks + fp16 cache
def test_fused_decode_step_matches_the_layer_by_layer_graph(dtype, mode):
  """decode_step through the fused kernels gives the logits and the KV cache of tinygrad's layer-by-layer graph for
  the same model; the step decoding runs (the batched step, here of one row) takes 5 kernels per layer + 2 (the
  embedding row; norm + head)."""
  from conftest import decode_steps_fused_and_layer_by_layer
  from tinyllama2.config import ModelArgs
  args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=160)
  fused, generic = decode_steps_fused_and_layer_by_layer(args, dtype, mode, DEV)
  np.testing.assert_allclose(fused[0], generic[0], rtol=1e-4, atol=1e-4)
  for a, b in zip(fused[1], generic[1]): np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
  assert np.abs(fused[0]).max() > 1   # real logits, not zeros
  assert fused[2] == 5 * 2 + 2 < generic[2]
