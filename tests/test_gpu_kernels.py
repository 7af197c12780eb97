"""The one-row GPU kernels (gpu_kernels.py) against numpy, on DEV when it is a GPU, else on OpenCL (PoCL)."""
import os

import numpy as np
import pytest
from tinygrad import Tensor, dtypes

from tinyllama2.ops import gpu as gpu_kernels
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


@pytest.mark.parametrize("N,K", [(96, 512)])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_matvec(N, K, mode):
  dev, rng = _device(), np.random.default_rng(K)
  x, w = rng.standard_normal(K).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32)
  q = QuantLinear.from_float(Tensor(w, device=dev), mode)
  kernel = lambda x, packed, scale: gpu_kernels.matvec_blocks("q8_0" if mode == "int8" else "q4_0", x, [(packed, scale)])
  y = kernel(Tensor(x, device=dev).reshape(1, 1, K), q.packed, q.scale)
  assert y is not None
  np.testing.assert_allclose(y.numpy().reshape(N), _np_dequant(q).astype(np.float64) @ x, rtol=1e-5, atol=1e-4)


def test_shapes_that_do_not_split_fall_back():
  dev = _device()
  w = Tensor.ones(8, 36, device=dev)   # 36 floats: no 16-byte loads across 4+ threads
  assert gpu_kernels.matvec(Tensor.ones(1, 1, 36, device=dev), w) is None


def test_schedule_divides_the_shape():
  s = gpu_kernels.MatvecSchedule(threads=32, rows=4, rows_per_thread=2)
  # 288/8 = 36 loads per row: 36 threads (a divisor near 32), then one row per group; 30 rows: 2 per thread
  assert [o.arg for o in s.opts(30, 288, 8)] == [8, 36, 2]
  assert [o.op.name for o in s.opts(30, 288, 8)] == ["UNROLL", "GROUP", "UPCAST"]
  # 11008/8 = 1376 = 32 x 43: 32 threads; 344 Q8_0 blocks = 8 x 43: 43 threads rather than 8
  assert [o.arg for o in s.opts(4096, 11008, 8)] == [8, 32, 4, 2]
  assert s.opts(4096, 344, 1)[1].arg == 43


def test_concat_reads_each_rows_own_weight():
  dev, rng = _device(), np.random.default_rng(3)
  K = 256
  ws = [rng.standard_normal((n, K)).astype(np.float32) for n in (64, 16, 16)]
  x = rng.standard_normal(K).astype(np.float32)
  y = gpu_kernels.matvec_concat(Tensor(x, device=dev).reshape(1, 1, K), [Tensor(w, device=dev) for w in ws])
  np.testing.assert_allclose(y.numpy().reshape(-1), np.concatenate(ws) @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_decode_attention_at_symbolic_positions(dtype):
  """Each step writes its key and value at `pos` (as the model does, which binds the position in the graph), then
  attends over positions 0..pos with GQA heads: one compiled graph for every position."""
  from tinygrad import TinyJit, Variable
  dev, rng = _device(), np.random.default_rng(7)
  H, KV, D, max_len = 8, 2, 32, 24
  npd = np.float16 if dtype == dtypes.float16 else np.float32
  k, v = np.zeros((1, KV, max_len, D), npd), np.zeros((1, KV, max_len, D), npd)
  ck, cv = Tensor(k, device=dev).contiguous().realize(), Tensor(v, device=dev).contiguous().realize()
  pos_var = Variable("start_pos", 0, max_len - 1)

  def step(q: Tensor, k_new: Tensor, v_new: Tensor, pos) -> Tensor:
    ck[:, :, pos:pos + 1].assign(k_new)
    cv[:, :, pos:pos + 1].assign(v_new)
    return gpu_kernels.attention(q, ck, cv, pos).realize()
  jit = TinyJit(step)
  for pos in range(12):
    q = rng.standard_normal((1, 1, H, D)).astype(npd)
    k[:, :, pos], v[:, :, pos] = (rng.standard_normal((1, KV, D)).astype(npd) for _ in range(2))
    got = jit(*(Tensor(a, device=dev).realize() for a in (q, k[:, :, pos:pos + 1], v[:, :, pos:pos + 1])),
              pos_var.bind(pos)).numpy().reshape(H, D)
    kh = np.repeat(k[0, :, :pos + 1].astype(np.float64), H // KV, axis=0)   # query head h reads kv head h // 4
    vh = np.repeat(v[0, :, :pos + 1].astype(np.float64), H // KV, axis=0)
    s = np.einsum("hd,hsd->hs", q[0, 0].astype(np.float64), kh) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("hs,hsd->hd", p / p.sum(-1, keepdims=True), vh)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == dtypes.float16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, **tol, err_msg=f"position {pos}")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_block_kernels(mode):
  """q, k and v in one kernel; gate, up and SwiGLU in one kernel, on Q8_0/Q4_0 blocks."""
  dev, rng = _device(), np.random.default_rng(11)
  K = 512
  x = rng.standard_normal(K).astype(np.float32)
  layers = [QuantLinear.from_float(Tensor(rng.standard_normal((n, K)).astype(np.float32), device=dev), mode)
            for n in (64, 32, 32)]
  kind, xt = layers[0].block_kind, Tensor(x, device=dev).reshape(1, 1, K)
  deq = [_np_dequant(q).astype(np.float64) for q in layers]
  qkv = gpu_kernels.matvec_blocks(kind, xt, [(q.packed, q.scale) for q in layers])
  np.testing.assert_allclose(qkv.numpy().reshape(-1), np.concatenate(deq) @ x, rtol=1e-5, atol=1e-4)
  gate, up = (QuantLinear.from_float(Tensor(rng.standard_normal((96, K)).astype(np.float32), device=dev), mode)
              for _ in range(2))
  h = gpu_kernels.matvec_blocks_swiglu(kind, xt, (gate.packed, gate.scale), (up.packed, up.scale))
  g = _np_dequant(gate).astype(np.float64) @ x
  np.testing.assert_allclose(h.numpy().reshape(-1), g / (1 + np.exp(-g)) * (_np_dequant(up).astype(np.float64) @ x),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weights", ["f16", "int8", "int4"])   # f32 weights: the fused decode step test below
def test_norm_and_residual_fused_into_the_products(weights):
  """RMSNorm before (its sum of squares in the products' own loop) and a residual after: q/k/v-like stacked rows
  with norm and residual, gate/up/SwiGLU with norm, for the float32 activations of the fused decode step; against
  numpy in float64."""
  dev, rng = _device(), np.random.default_rng(5)
  K, eps = 512, 1e-5
  x, nw, res = rng.standard_normal(K), 1 + 0.5 * rng.standard_normal(K), rng.standard_normal(96)
  xt, norm = Tensor(x.astype(np.float32), device=dev).reshape(1, 1, K), (Tensor(nw.astype(np.float32), device=dev), eps)
  xn = x / np.sqrt((x ** 2).mean() + eps) * nw
  mats = [rng.standard_normal((n, K)).astype(np.float32) for n in (64, 32, 96, 96)]
  residual = Tensor(res.astype(np.float32), device=dev)
  if weights == "f16":
    ref = [m.astype(np.float16).astype(np.float64) for m in mats]
    ws = [Tensor(m.astype(np.float16), device=dev) for m in mats]
    rows = gpu_kernels.matvec_concat(xt, ws[:2], norm=norm, residual=residual)
    gated = gpu_kernels.matvec_swiglu(xt, *ws[2:], norm=norm)
  else:
    qs = [QuantLinear.from_float(Tensor(m, device=dev), weights) for m in mats]
    ref = [_np_dequant(q).astype(np.float64) for q in qs]
    rows = gpu_kernels.matvec_blocks(qs[0].block_kind, xt, [(q.packed, q.scale) for q in qs[:2]], norm=norm, residual=residual)
    gated = gpu_kernels.matvec_blocks_swiglu(qs[0].block_kind, xt, *[(q.packed, q.scale) for q in qs[2:]], norm=norm)
  g = ref[2] @ xn
  tol = dict(rtol=1e-4, atol=1e-3)   # float32 sums of 512 products of size ~1-25
  np.testing.assert_allclose(rows.numpy().reshape(-1), np.concatenate(ref[:2]) @ xn + res, **tol)
  np.testing.assert_allclose(gated.numpy().reshape(-1), g / (1 + np.exp(-g)) * (ref[3] @ xn), **tol)


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_decode_attention_rotates_attends_and_writes_the_cache(dtype):
  """gpu_kernels.decode_attention at positions 0..9 of one compiled graph: RoPE of q and the new k (numpy's
  rotation of interleaved pairs), GQA attention over the cache and the new row, and exactly that row written
  into the k and v caches (the new key rotated, rounded to the cache dtype)."""
  from tinygrad import TinyJit, Variable
  from tinyllama2.rope import rope_tables
  dev, rng = _device(), np.random.default_rng(9)
  H, KV, D, max_len = 8, 2, 32, 24
  npd = np.float16 if dtype == dtypes.float16 else np.float32
  cos, sin = rope_tables(D, 10000.0, None, max_len, max_len)
  cos_t, sin_t = Tensor(cos, device=dev).realize(), Tensor(sin, device=dev).realize()
  ck, cv = (Tensor(np.zeros((1, KV, max_len, D), npd), device=dev).contiguous().realize() for _ in range(2))
  pos_var = Variable("start_pos", 0, max_len - 1)
  def step(qkv: Tensor, pos) -> Tensor:
    position = Tensor.full((1,), pos, dtype=dtypes.int32, device=dev).contiguous()
    return gpu_kernels.decode_attention(qkv, ck, cv, cos_t, sin_t, pos, position, H).realize()
  jit = TinyJit(step)
  def rope(a: np.ndarray, p: int) -> np.ndarray:
    out = np.empty_like(a)
    out[..., 0::2] = a[..., 0::2] * cos[p] - a[..., 1::2] * sin[p]
    out[..., 1::2] = a[..., 0::2] * sin[p] + a[..., 1::2] * cos[p]
    return out
  keys, values = np.zeros((KV, max_len, D)), np.zeros((KV, max_len, D))
  for pos in range(10):
    qkv = rng.standard_normal((H + 2 * KV) * D).astype(npd)
    got = jit(Tensor(qkv, device=dev).realize(), pos_var.bind(pos)).numpy().reshape(H, D)
    q = rope(qkv[:H * D].astype(np.float64).reshape(H, D), pos)
    keys[:, pos] = rope(qkv[H * D:(H + KV) * D].astype(np.float64).reshape(KV, D), pos).astype(npd)
    values[:, pos] = qkv[(H + KV) * D:].reshape(KV, D)
    kh, vh = np.repeat(keys[:, :pos + 1], H // KV, 0), np.repeat(values[:, :pos + 1], H // KV, 0)
    scores = np.einsum("hd,hsd->hs", q, kh) / np.sqrt(D)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("hs,hsd->hd", p / p.sum(-1, keepdims=True), vh)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == dtypes.float16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, **tol, err_msg=f"position {pos}")
    np.testing.assert_allclose(ck.numpy()[0].astype(np.float64), keys, rtol=1e-3, atol=1e-6, err_msg=f"k cache at {pos}")
    np.testing.assert_array_equal(cv.numpy()[0].astype(np.float64), values, err_msg=f"v cache at {pos}")


@pytest.mark.parametrize("dtype,mode", [(dtypes.float32, None), (dtypes.float16, "int8")])   # int4: kernel tests above
def test_fused_decode_step_matches_the_layer_by_layer_graph(dtype, mode):
  """decode_step through the fused GPU kernels (6 per layer + 3: norm + q/k/v, RoPE + attention scores, softmax +
  values + cache write, wo + residual, norm + gate/up/SwiGLU, w2 + residual) gives the logits and the KV cache of
  tinygrad's layer-by-layer graph for the same model."""
  from conftest import decode_steps_fused_and_layer_by_layer
  from tinyllama2 import ModelArgs
  args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=96, hidden_dim=512)
  fused, generic = decode_steps_fused_and_layer_by_layer(args, dtype, mode, _device())
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == dtypes.float16 else dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(fused[0], generic[0], **tol)
  for a, b in zip(fused[1], generic[1]): np.testing.assert_allclose(a, b, **tol)
  assert np.abs(fused[0]).max() > 1   # real logits, not zeros
  assert fused[2] == 6 * 2 + 3 < generic[2], (fused[2], generic[2])


def test_decode_falls_back_to_the_generic_graph_when_the_fused_kernels_fail(monkeypatch):
  """A device whose compiler rejects our kernels still decodes (with a warning naming the error), through tinygrad's
  graph, with the logits that graph gives."""
  from tinyllama2 import ModelArgs, Transformer
  from tinyllama2.decoder import Decoder
  dev = _device()
  args = ModelArgs(dim=256, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=96, hidden_dim=512)
  def decode(fused: bool) -> tuple[np.ndarray, Decoder]:
    m = Transformer(args, max_seq_len=16, dtype=dtypes.float32, device=dev)
    m.init_random(seed=1, std=0.2)
    dec = Decoder(m, fused=fused)
    dec.prefill([3, 17, 42], all_logits=True)
    return np.concatenate([dec.decode_logits(tok, 3 + i).numpy() for i, tok in enumerate([5, 9])]), dec
  want, _ = decode(fused=False)
  def failing_build(*args, **kwargs): raise RuntimeError("simulated compile error")
  monkeypatch.setattr(gpu_kernels, "decode_attention", failing_build)
  with pytest.warns(UserWarning, match="simulated compile error"):
    got, dec = decode(fused=True)
  assert not dec.fused
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
