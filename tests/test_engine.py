"""The engine: several sequences decoded in one step compute each row exactly as alone (kernels against their
single-row selves and numpy; steps against one-slot steps and tinygrad's layer-by-layer graph), requests are
batched, queued past the slots, cancelled, and sample from their own seeded streams."""
import threading

import numpy as np
import pytest
from tinygrad import Tensor, dtypes

from tinyllama2 import DEFAULT_MODEL, Llama
from tinyllama2.config import ModelArgs
from tinyllama2.decoder import Decoder, batch_sizes
from tinyllama2.devices import resolve_device
from tinyllama2.generate import GenerationConfig, Stopping
from tinyllama2.model import Transformer
from tinyllama2.ops import cpu
from tinyllama2.quantize import QuantLinear

DEV = resolve_device(None)
ON_CPU = cpu.available(DEV)
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=160)
cpu_only = pytest.mark.skipif(not ON_CPU, reason="the batched decode kernels are ops/cpu.py's (clang CPU backend)")


def _layer(kind: str, n: int, k: int, rng) -> object:
  w = Tensor(rng.standard_normal((n, k)).astype(np.float32), device=DEV).realize()
  if kind in ("q8_0", "q4_0"): return QuantLinear.from_float(w, "int8" if kind == "q8_0" else "int4")
  from tinyllama2.layers import Linear
  return Linear(w.cast(dtypes.float16).contiguous().realize() if kind == "f16" else w)


def _np_dequant(q: QuantLinear) -> np.ndarray:
  """Q8_0/Q4_0 blocks to float64 with numpy: value = scale * q (Q4_0: low nibbles first, minus 8)."""
  packed, scale = q.packed.numpy(), q.scale.numpy().astype(np.float64)
  vals = packed.astype(np.float64) if q.mode == "int8" else np.concatenate([packed & 15, packed >> 4], -1) - 8.0
  return (vals * scale[..., None]).reshape(packed.shape[0], -1)


@cpu_only
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("rows", [2, 5])
def test_batched_projections_equal_their_single_row_selves_and_numpy(kind, rows):
  """project / project_swiglu over a few rows (norm and residual fused) give, bit for bit, each row's single-row
  result, and the numpy product of the dequantized weights."""
  rng = np.random.default_rng(rows)
  K, N = 96, 40
  layer = _layer(kind, N, K, rng)
  w = layer.kernel_weights
  x = rng.standard_normal((rows, K)).astype(np.float32)
  norm = (Tensor(rng.standard_normal(K).astype(np.float32), device=DEV).realize(), 1e-5)
  res = rng.standard_normal((rows, 2 * N)).astype(np.float32)
  t = lambda a: Tensor(a, device=DEV)
  got = cpu.project(t(x), [w, w], norm=norm, residual=t(res)).numpy()
  alone = np.stack([cpu.project(t(x[r]), [w, w], norm=norm, residual=t(res[r])).numpy() for r in range(rows)])
  assert got.shape == (rows, 2 * N) and np.array_equal(got, alone)
  gated = cpu.project_swiglu(t(x), w, w, norm=norm).numpy()
  assert np.array_equal(gated, np.stack([cpu.project_swiglu(t(x[r]), w, w, norm=norm).numpy() for r in range(rows)]))
  dense = _np_dequant(layer) if kind in ("q8_0", "q4_0") else layer.weight.float().numpy().astype(np.float64)
  xn = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * norm[0].numpy()
  want = np.concatenate([xn @ dense.T] * 2, -1) + res
  tol = 5e-2 if kind in ("q8_0", "q4_0") else 1e-3   # Q8_0 kernels round x to int8 blocks, as llama.cpp does
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@cpu_only
@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_batched_attention_writes_each_rows_cache_row_and_equals_one_row_at_a_time(dtype):
  rng = np.random.default_rng(1)
  H, KV, D, S, slots = 4, 2, 16, 24, 4
  k0, v0 = (rng.standard_normal((slots, KV, S, D)).astype(np.float32) for _ in range(2))
  qkv = rng.standard_normal((3, (H + 2 * KV) * D)).astype(np.float32)
  cos, sin = (Tensor(rng.standard_normal((S, D // 2)).astype(np.float32), device=DEV).realize() for _ in range(2))
  positions, rows = [5, 0, 11], [2, 0, 3]
  cache = lambda a: Tensor(a, device=DEV).cast(dtype).contiguous().realize()
  k, v = cache(k0), cache(v0)
  feed = Tensor(np.array([[0, 0, 0], positions, rows], dtype=np.int32), device=DEV)
  got = cpu.decode_attention_rows(Tensor(qkv, device=DEV), k, v, cos, sin, feed, H).numpy()
  k1, v1 = cache(k0), cache(v0)
  for b, (pos, row) in enumerate(zip(positions, rows)):
    alone = cpu.decode_attention(Tensor(qkv[b], device=DEV), k1, v1, cos, sin, pos,
                                 Tensor([pos], dtype=dtypes.int32, device=DEV), H, first_row=row).numpy()
    assert np.array_equal(got[b], alone)
  assert np.array_equal(k.numpy(), k1.numpy()) and np.array_equal(v.numpy(), v1.numpy())
  assert np.array_equal(k.numpy()[1], cache(k0).numpy()[1])   # row 1 is no sequence's: untouched
  padded = Tensor(np.array([[0, 0], [3, 3], [1, -1]], dtype=np.int32), device=DEV)   # a padding row attends to nothing
  out = cpu.decode_attention_rows(Tensor(qkv[:2], device=DEV), k, v, cos, sin, padded, H).numpy()
  assert np.all(out[1] == 0) and np.abs(out[0]).sum() > 0


@cpu_only
def test_embedding_rows_read_the_tokens_rows():
  w = Tensor(np.random.default_rng(2).standard_normal((50, 24)).astype(np.float32), device=DEV).realize()
  feed = Tensor(np.array([[3, 49, 0], [0] * 3, [0] * 3], dtype=np.int32), device=DEV)
  assert np.array_equal(cpu.embedding_rows(w, feed).numpy(), w.numpy()[[3, 49, 0]])


def _model(seed: int) -> Transformer:
  m = Transformer(ARGS, max_seq_len=32, dtype=dtypes.float32, device=DEV)
  m.init_random(seed=seed, std=0.2)
  return m


def test_a_step_over_several_slots_equals_each_slot_alone_and_the_layer_by_layer_graph():
  """Three slots at different positions fed in one step_slots call for several steps: the logits of each equal, bit
  for bit, those of a one-slot decoder fed the same sequence alone, and (closely) tinygrad's own graph's. (The
  quantized kinds are held to their single rows kernel by kernel: test_batched_projections_...)"""
  m = _model(3)
  prompts = [[1, 5, 9, 20, 33], [1, 7], [1, 40, 41, 42, 43, 44, 45]]
  batched, alone, generic = Decoder(m, slots=4), Decoder(m, slots=1), Decoder(m, slots=1, fused=False)
  order = [2, 0, 3]   # the slots the prompts go to
  for p, slot in zip(prompts, order): batched.prefill(p, slot=slot)
  tokens = [[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]]
  got = [batched.step_slots([(slot, tokens[b][i], len(prompts[b]) + i) for b, slot in enumerate(order)])
         for i in range(4)]
  for b, p in enumerate(prompts):
    for dec in (alone, generic):
      dec.forget()
      dec.prefill(p)
    for i in range(4):
      want = alone.step(tokens[b][i], len(p) + i)
      if ON_CPU: assert np.array_equal(got[i][b], want)
      np.testing.assert_allclose(got[i][b], generic.step(tokens[b][i], len(p) + i), rtol=1e-4, atol=1e-4)
  assert batched.decode_steps == (4 if ON_CPU else 12)   # one compiled step for the three slots (CPU kernels)
  assert [batched.held[s] for s in order] == [p + t for p, t in zip(prompts, tokens)]


def test_batch_sizes_are_powers_of_two_up_to_the_slots():
  assert batch_sizes(1) == [1] and batch_sizes(4) == [1, 2, 4] and batch_sizes(6) == [1, 2, 4, 6]


@pytest.fixture(scope="module")
def llm() -> Llama:
  return Llama.from_pretrained(DEFAULT_MODEL, slots=3)


PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went", "One day, a little bird", "The sun"]


def test_more_requests_than_slots_queue_and_each_gets_its_tokens_alone(llm):
  """Five threads on three slots, greedy and seeded sampling mixed: each result equals the same request run alone,
  and the engine decoded several sequences per step."""
  kw = [dict(max_new_tokens=16), dict(max_new_tokens=12, do_sample=True, seed=5, temperature=0.9),
        dict(max_new_tokens=20), dict(max_new_tokens=9, do_sample=True, seed=6, top_p=0.9), dict(max_new_tokens=14)]
  alone = [llm.generate(p, **k).tokens for p, k in zip(PROMPTS, kw)]
  results: dict[int, list[int]] = {}
  steps_before = llm.decoder.decode_steps
  def run(i: int) -> None: results[i] = llm.generate(PROMPTS[i], **kw[i]).tokens
  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
  for t in threads: t.start()
  for t in threads: t.join()
  assert [results[i] for i in range(len(PROMPTS))] == alone
  if ON_CPU: assert llm.decoder.decode_steps - steps_before < sum(len(a) for a in alone) - len(alone)


def test_a_batch_of_prompts_equals_the_prompts_alone(llm):
  out = llm.generate(PROMPTS, max_new_tokens=10, do_sample=True, seed=11)
  assert [g.tokens for g in out] == [llm.generate(p, max_new_tokens=10, do_sample=True, seed=11).tokens for p in PROMPTS]


def test_breaking_out_of_a_stream_frees_its_slot(llm):
  streams = [llm.generate(p, max_new_tokens=200, stream=True) for p in PROMPTS[:3]]   # every slot busy
  pieces = [iter(s) for s in streams]
  for it in pieces: next(it)
  for it in pieces: it.close()   # as a `for` loop left by break does
  g = llm.generate(PROMPTS[3], max_new_tokens=5)   # gets a slot at once, though the streams had 200 tokens to go
  assert g.finish_reason == "length" and len(g.tokens) == 5
  assert max(len(h) for h in llm.decoder.held) < 100   # the streams stopped long before their 200 tokens


def test_cancel_stops_a_request_and_logits_run_beside_generations(llm):
  req = llm.engine.submit(llm.tokenizer.encode("Once upon a time", bos=True), GenerationConfig.of(max_new_tokens=100),
                          Stopping(set(), 100, llm.model.max_seq_len))
  first = next(req)
  ids = [1, 2, 3, 4]
  full = llm.logits(ids)           # while the request holds a slot
  assert full.shape == (4, llm.args.vocab_size)
  np.testing.assert_allclose(full[-1], Llama.from_pretrained(DEFAULT_MODEL).logits(ids)[-1], rtol=1e-4, atol=1e-4)
  req.cancel()
  assert first.token is not None and list(req) == []


def test_requests_return_the_errors_of_bad_input_at_once(llm):
  with pytest.raises(ValueError, match="longer than max_seq_len"):
    llm.engine.submit([1] * (llm.model.max_seq_len + 1), GenerationConfig.of(), Stopping(set(), 5, llm.model.max_seq_len))
  with pytest.raises(ValueError, match="slots must be a positive integer"): Llama.from_pretrained(DEFAULT_MODEL, slots=0)


def test_short_and_long_prefills_and_their_first_captured_call_equal_numpy(llm):
  """Prompts (or their unreused rest) under SHORT_PREFILL tokens are fed as decode steps, longer ones run in a padded
  graph captured on its first call: the logits after each equal the numpy reference forward pass, and a graph's
  first (capturing) call equals its replays."""
  import reference_numpy
  from tinyllama2.decoder import SHORT_PREFILL
  weights = {k: v.numpy() for k, v in llm.model.state_dict().items()}
  ids = llm.tokenizer.encode("Once upon a time there was a little girl named Lily who had a big red ball")
  assert len(ids) > SHORT_PREFILL + 4
  want = reference_numpy.forward(weights, llm.args, ids)
  with llm.engine.exclusive_slot() as (decoder, slot):
    decoder.forget(slot)
    for n in (SHORT_PREFILL - 1, SHORT_PREFILL, SHORT_PREFILL + 3, SHORT_PREFILL + 3):   # the last: a replay
      decoder.forget(slot)
      np.testing.assert_allclose(decoder.prefill(ids[:n], slot=slot), want[n - 1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(decoder.prefill(ids, slot=slot), want[-1], atol=1e-4, rtol=1e-4)   # a reused prefix
    assert decoder.held[slot] == ids
