"""CPU kernels that share their rows with helper threads: results against numpy, helpers really join,
and one thread and two threads agree (each in a fresh process, since the thread count is fixed at first use)."""
import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinygrad import Tensor, TinyJit, dtypes
from tinyllama2.ops import cpu as cpu_kernels
from tinyllama2.runtime import cpu_threads
from tinyllama2.devices import resolve_device
from tinyllama2.quantize import QuantLinear
from test_cpu_kernels import np_q8_0_activations

DEV = resolve_device(None)
pytestmark = pytest.mark.skipif(not (cpu_kernels.available(DEV) and cpu_threads.supported()),
                                reason="helper threads need tinygrad's clang CPU backend on x86-64")


def _x_w(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.standard_normal(k).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)


def test_rows_are_split_into_chunks_of_at_least_16_kb():
  assert cpu_kernels._rows_per_chunk(4096, 4096 * 4, 2) == 128           # 32 chunks for two threads
  assert cpu_kernels._rows_per_chunk(300, 288 * 4, 2) == 15              # 16 KB / 1152 B rows
  assert cpu_kernels._rows_per_chunk(3, 8, 4) == 2048                    # a tiny matrix is one chunk


@pytest.mark.skipif(cpu_threads.config.threads < 2, reason="this machine has one core: no helper threads")
def test_every_kernel_kind_with_helpers_matches_numpy_call_after_call():
  x, w = _x_w(1000, 288, seed=3)
  _, w2 = _x_w(1000, 288, seed=4)
  wt, w2t = Tensor(w, device=DEV).realize(), Tensor(w2, device=DEV).realize()
  wh = wt.cast(dtypes.float16).contiguous().realize()
  q8, q4 = QuantLinear.from_float(wt, "int8"), QuantLinear.from_float(wt, "int4")
  qkv = [wt[:500].contiguous().realize(), wt[500:800].contiguous().realize(), wt[800:].contiguous().realize()]

  big = Tensor.ones(8192, 288, device=DEV).contiguous().realize()   # ~1 ms: the host thread is waiting, and helps, by its end
  row_scale = np.array([1.0, -2.0, 0.5, 3.0, 1.5], dtype=np.float32)
  rows_of = Tensor(row_scale, device=DEV).reshape(5, 1)

  @TinyJit
  def step(xt: Tensor) -> list[Tensor]:
    rows = xt.reshape(1, 288) * rows_of   # five rows: the prefill kernels
    return [t.realize() for t in (cpu_kernels.matvec(xt, wt), cpu_kernels.matvec(xt, wh), cpu_kernels.matvec_concat(xt, qkv),
                                  cpu_kernels.matvec_swiglu(xt, wt, w2t), q8(xt.reshape(1, 288)), q4(xt.reshape(1, 288)),
                                  cpu_kernels.matmul(rows, wh), q4(rows), cpu_kernels.matvec(xt, big))]

  x64, w2_64 = x.astype(np.float64), w2.astype(np.float64)
  g, g_half = w.astype(np.float64) @ x64, wh.float().numpy().astype(np.float64) @ x64
  q8_w, q4_w = (q.dequantize(dtypes.float32).numpy().astype(np.float64) for q in (q8, q4))
  pool = cpu_threads.pool(DEV)
  assert pool is not None and len(pool.helpers) + pool.host_helps == cpu_threads.config.threads - 1
  for i in range(12):   # a captured graph replayed: helpers join kernels that follow each other closely
    xi = Tensor(x * (i + 1), device=DEV).reshape(1, 288).realize()
    outs = [o.numpy().reshape(-1) for o in step(xi)]
    np.testing.assert_allclose(outs[0], g * (i + 1), rtol=1e-4, atol=1e-3 * (i + 1))
    np.testing.assert_allclose(outs[1], g_half * (i + 1), rtol=1e-4, atol=1e-3 * (i + 1))
    np.testing.assert_allclose(outs[2], g * (i + 1), rtol=1e-4, atol=1e-3 * (i + 1))
    gi = g * (i + 1)
    np.testing.assert_allclose(outs[3], gi / (1 + np.exp(-gi)) * (w2_64 @ x64) * (i + 1), rtol=1e-4, atol=1e-2 * (i + 1))
    for deq, out in ((q8_w, outs[4]), (q4_w, outs[5])):   # one row: x is rounded to Q8_0 blocks first
      np.testing.assert_allclose(out, deq @ np_q8_0_activations(x * (i + 1)), rtol=1e-4, atol=1e-3 * (i + 1))
    for deq, out in ((g_half, outs[6]), (q4_w @ x64, outs[7])):
      np.testing.assert_allclose(out.reshape(5, 1000), np.outer(row_scale, deq) * (i + 1), rtol=1e-4, atol=3e-3 * (i + 1))
    np.testing.assert_allclose(outs[8], np.full(8192, x64.sum() * (i + 1)), rtol=1e-4, atol=1e-3 * (i + 1))


@pytest.mark.skipif(cpu_threads.config.threads < 2, reason="this machine has one core: no helper threads")
def test_a_waiting_host_thread_computes_a_posted_kernel():
  """Helper participation without depending on the OS scheduling a thread in time: a kernel's call is posted again
  by hand (its output zeroed) and the test's own thread, waiting for a queue signal as the host does, must work on
  it. On two cores the waiting host thread is the only helper, so it takes every chunk."""
  x, w = _x_w(3000, 64, seed=8)
  pool = cpu_threads.pool(DEV)
  word = lambda i: ctypes.c_uint64.from_address(pool.address + 8 * i)
  y = cpu_kernels.matvec(Tensor(x, device=DEV), Tensor(w, device=DEV).realize()).realize()
  y.numpy()   # finished: its call (function and buffers) stays in the mailbox
  while word(cpu_threads.STATE).value: pass   # the kernel releases the mailbox before the queue signals
  out = word(cpu_threads.ARGS).value
  ctypes.memset(out, 0, 3000 * 4)
  joined, seq = pool.kernels_joined(), word(cpu_threads.SEQ).value + 1
  word(cpu_threads.STATE).value, word(cpu_threads.NEXT).value, word(cpu_threads.DONE).value = 1, 0, 0
  word(cpu_threads.CLAIM).value = seq << 8
  word(cpu_threads.SEQ).value = seq   # posted, as a kernel's own thread posts itself
  signal = ctypes.c_uint64(0)   # never reached: the wait returns after its time limit
  assert cpu_threads._helper_library().tl_wait_helping(pool.address, ctypes.addressof(signal), 1, 0, 50_000_000) == 0
  word(cpu_threads.CLAIM).value |= cpu_threads.CLOSED
  while word(cpu_threads.DONE).value < (word(cpu_threads.CLAIM).value & (cpu_threads.CLOSED - 1)): pass
  word(cpu_threads.STATE).value = 0
  assert pool.kernels_joined() > joined, "the waiting thread did not work on the posted kernel"
  got = np.ctypeslib.as_array((ctypes.c_float * 3000).from_address(out))
  np.testing.assert_allclose(got, w.astype(np.float64) @ x.astype(np.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(cpu_threads.config.threads < 2, reason="this machine has one core: no helper threads")
def test_a_kernel_that_finds_the_mailbox_taken_does_all_its_rows_alone():
  """tinygrad may run a kernel synchronously while its queue worker runs another: the second must neither post
  over the first nor take its chunks."""
  x, w = _x_w(3000, 64, seed=6)
  pool = cpu_threads.pool(DEV)
  state = ctypes.c_uint64.from_address(pool.address + 8 * cpu_threads.STATE)
  next_chunk = ctypes.c_uint64.from_address(pool.address + 8 * cpu_threads.NEXT)
  wt = Tensor(w, device=DEV).realize()
  cpu_kernels.matvec(Tensor(x, device=DEV), wt).numpy()   # compiled and run once normally, and finished (realize()
  # may return while tinygrad's queue worker still runs it, which then releases the mailbox poked below)
  state.value, next_chunk.value = 1, 5   # as if another kernel were running
  try:
    y = cpu_kernels.matvec(Tensor(-x, device=DEV), wt).numpy()
    assert (state.value, next_chunk.value) == (1, 5), "the kernel touched the mailbox of the running one"
  finally: state.value = 0
  np.testing.assert_allclose(y, w.astype(np.float64) @ -x.astype(np.float64), rtol=1e-4, atol=1e-4)


_ONE_PROCESS = """
import json, sys
import numpy as np
from tinyllama2.ops import cpu as cpu_kernels   # first: it turns tinygrad's HCQ2 queue on for the CPU
from tinyllama2.runtime import cpu_threads
from tinygrad import Tensor
cpu_threads.set_threads(int(sys.argv[1]))
rng = np.random.default_rng(5)
x, w = rng.standard_normal(256).astype(np.float32), rng.standard_normal((700, 256)).astype(np.float32)
y = cpu_kernels.matvec(Tensor(x, device="CPU"), Tensor(w, device="CPU").realize()).numpy()
pool = cpu_threads.pool("CPU")
print(json.dumps({"threads": cpu_threads.config.threads, "own_threads": None if pool is None else len(pool.helpers),
                  "host_helps": pool is not None and pool.host_helps, "err": float(np.abs(y - w.astype(np.float64) @ x).max())}))
"""


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_two_and_three_threads_in_fresh_processes(threads):
  """n threads per kernel: tinygrad's queue worker, the host thread while it waits, and n - 2 threads of their own."""
  run = subprocess.run([sys.executable, "-c", _ONE_PROCESS, str(threads)], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k not in ("HCQ2", "DEV")})
  assert run.returncode == 0, run.stderr[-2000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  assert got == {"threads": threads, "own_threads": None if threads == 1 else threads - 2, "host_helps": threads > 1,
                 "err": pytest.approx(0, abs=1e-3)}


def test_thread_count_is_checked():
  with pytest.raises(ValueError, match="at least 1"): cpu_threads.set_threads(0)
  cpu_threads.pool(DEV)   # started: changing the count now would leave compiled kernels behind
  other = 1 if cpu_threads.config.threads != 1 else 2
  with pytest.raises(RuntimeError, match="before loading a model"): cpu_threads.set_threads(other)
