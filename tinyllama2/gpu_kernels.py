"""Decode kernels for GPUs: one-row matrix products written as tinygrad UOps with hand-chosen optimizations.

Decoding one token reads every weight once, so each projection should stream its weights at the memory
bandwidth. For x @ W.T with a single row x, tinygrad 0.14's heuristics give each thread whole output rows: the
32 threads of a warp walk 32 different rows, so no load is coalesced (~90 GB/s modelled on an H100 for a
4096×11008 fp16 matrix). Its matrix-vector heuristic (MV_*) would split rows across threads, but it only fires
when the reduction multiplies two plain loads, not the fp16→fp32 casts of a mixed-precision product; and a
`Tensor.contiguous(arg=opts)` hint is dropped by tinygrad 0.14 (tensor.py `replace_contig_with_store_after`
stores `u.src[0]`, losing `u.arg`).

So these kernels state the reduction plainly with `Tensor.custom_kernel` and attach the optimizations in their
KernelInfo: each thread loads 16 consecutive bytes of a row, `threads` threads of a work group share a row (a
warp reads 512 contiguous bytes), their partial sums meet in local memory, and every thread accumulates
`rows_per_thread` rows so x is loaded once for them. The dequantization of Q8_0/Q4_0 blocks happens in the
loop, so only the packed bytes are read. They compile on every backend with local memory (CUDA, NV, AMD,
Metal, OpenCL); the CPU has its own kernels (`cpu_kernels`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from tinygrad import Device, Tensor, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.dtype import DType
from tinygrad.helpers import TRAINING
from tinygrad.uop.ops import AxisType, KernelInfo, Ops, UOp

QBLOCK = 32          # values per Q8_0 / Q4_0 block
LOAD_BYTES = 16      # bytes each thread loads at once (one 128-bit load)


@dataclass(frozen=True)
class MatvecSchedule:
  """How the work of y = W x is laid out on a GPU (upper bounds; each is reduced until it divides the shape)."""
  threads: int = 32          # threads of a work group that share one row's reduction
  rows: int = 4              # rows per work group
  rows_per_thread: int = 2   # rows each thread accumulates, reusing its loads of x

  def opts(self, n_out: int, n_reduce: int, unroll: int) -> tuple[Opt, ...] | None:
    """tinygrad optimizations for an [n_out, n_reduce] product loading `unroll` elements at once; None when the
    shape does not split (then the caller keeps tinygrad's generic kernel)."""
    if n_reduce % unroll: return None
    threads = _largest_divisor(n_reduce // unroll, self.threads)
    per_thread = _largest_divisor(n_out, self.rows_per_thread)
    rows = _largest_divisor(n_out // per_thread, self.rows)
    if threads < 4: return None
    opts = [Opt(OptOps.UNROLL, 0, unroll), Opt(OptOps.GROUP, 0, threads)]
    if rows > 1: opts.append(Opt(OptOps.LOCAL, 0, rows))
    if per_thread > 1: opts.append(Opt(OptOps.UPCAST, 0, per_thread))
    return tuple(opts)


DEFAULT_SCHEDULE = MatvecSchedule()
_schedule = DEFAULT_SCHEDULE


def set_schedule(schedule: MatvecSchedule) -> MatvecSchedule:
  """Use `schedule` for kernels built from now on (bench/gpu_matvec.py compares schedules); returns the old one."""
  global _schedule
  old, _schedule = _schedule, schedule
  return old


def _largest_divisor(n: int, at_most: int) -> int:
  """The largest power of two ≤ at_most that divides n."""
  d = 1
  while d * 2 <= at_most and n % (d * 2) == 0: d *= 2
  return d


@functools.cache
def available(device: str) -> bool:
  """True for a device whose renderer has work groups with local memory (a GPU, or OpenCL); not the CPU."""
  if device.split(":")[0] in ("CPU", "PYTHON", "NULL", "DISK", "NPY"): return False
  try: renderer = Device[device].renderer
  except Exception: return False
  return bool(renderer.has_local and renderer.has_shared)


def usable(x: Tensor, weight: Tensor) -> bool:
  """Whether a projection of x (one row, concrete shapes, no gradient needed) on this device can use these."""
  rows = 1
  for s in x.shape[:-1]: rows *= s if isinstance(s, int) else 2
  return rows == 1 and not TRAINING and isinstance(weight.device, str) and all(isinstance(s, int) for s in weight.shape) \
    and weight.dtype in (dtypes.float32, dtypes.float16, dtypes.bfloat16, dtypes.int8, dtypes.uint8) \
    and available(weight.device)


def _launch(name: str, n_out: int, dtype: DType, inputs: list[Tensor], body, opts: tuple[Opt, ...]) -> Tensor:
  """A custom kernel computing y[i] for i < n_out: body(i, *input placeholders) gives its value (float32)."""
  def kernel(y: UOp, *params: UOp) -> UOp:
    i = UOp.range(n_out, 0)
    return y[i].store(body(i, *params).cast(dtype)).end(i).sink(arg=KernelInfo(name=name, opts_to_apply=opts))
  return Tensor.empty(n_out, dtype=dtype, device=inputs[0].device).custom_kernel(*inputs, fxn=kernel)[0]


def _row_dot(x: UOp, w: UOp, i: UOp, k: UOp) -> UOp:
  return (x[k].cast(dtypes.float) * w[i, k].cast(dtypes.float)).reduce(k, arg=Ops.ADD)


def _unroll(dtype: DType) -> int: return LOAD_BYTES // dtype.itemsize


def matvec(x: Tensor, weight: Tensor) -> Tensor | None:
  """x [..., K] (one row) @ weight.T for weight [N, K]: the row [..., N] in x's dtype, or None if it does not fit."""
  N, K = weight.shape
  if (opts := _schedule.opts(N, K, _unroll(weight.dtype))) is None: return None
  body = lambda i, xp, wp: _row_dot(xp, wp, i, UOp.range(K, 1, AxisType.REDUCE))
  y = _launch(f"gpu_matvec_{N}_{K}", N, x.dtype, [x.reshape(K), weight], body, opts)
  return y.reshape(*x.shape[:-1], N)


def matvec_swiglu(x: Tensor, gate: Tensor, up: Tensor) -> Tensor | None:
  """silu(x @ gate.T) * (x @ up.T) for one row x in one kernel that reads both matrices once."""
  N, K = gate.shape
  if (opts := _schedule.opts(N, K, _unroll(gate.dtype))) is None: return None
  def body(i: UOp, xp: UOp, gp: UOp, up_: UOp) -> UOp:
    k = UOp.range(K, 1, AxisType.REDUCE)   # one range for both sums: the optimizations apply to both
    g, u = _row_dot(xp, gp, i, k), _row_dot(xp, up_, i, k)
    return g * (1.0 / (1.0 + (g * -1.4426950408889634).exp2())) * u
  y = _launch(f"gpu_matvec_swiglu_{N}_{K}", N, x.dtype, [x.reshape(K), gate, up], body, opts)
  return y.reshape(*x.shape[:-1], N)


def _as_words(packed: UOp) -> UOp:
  """The kernel parameter of packed bytes [N, ...] seen as int32 words [N, bytes per row / 4]: the code then loads
  whole words (four at once after unrolling) where byte loads are one instruction per byte. (Tensor.bitcast would
  copy the weights in a kernel of its own on every call.)"""
  N, row_bytes = packed.shape[0], math.prod(packed.shape[1:])
  return UOp.placeholder((N, row_bytes // 4), dtypes.int32, slot=packed.base.arg.slot)


def _blocks_opts(n_out: int, n_blocks: int, words_per_block: int) -> tuple[Opt, ...] | None:
  """Optimizations for a reduction over (block, word of the block, byte of the word): the bytes and up to four words
  (16 bytes) are unrolled into one load, threads of a work group take consecutive blocks."""
  unroll_words = _largest_divisor(words_per_block, LOAD_BYTES // 4)
  opts = _schedule.opts(n_out, n_blocks, 1)
  if opts is None: return None
  return (Opt(OptOps.UNROLL, 2, 4), Opt(OptOps.UNROLL, 1, unroll_words)) + opts[1:]


def _block_ranges(n_blocks: int, words_per_block: int) -> tuple[UOp, UOp, UOp]:
  return (UOp.range(n_blocks, 1, AxisType.REDUCE), UOp.range(words_per_block, 2, AxisType.REDUCE),
          UOp.range(4, 3, AxisType.REDUCE))


def _byte(words: UOp, row: UOp, word: UOp, byte: UOp) -> UOp:
  """Byte `byte` (0..255) of word `word` of row `row` of packed bytes read as little-endian int32 words."""
  return (words[row, word] >> (byte * 8)) & 255


def matvec_q8_0(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor | None:
  """One row x @ dequant(W).T for Q8_0 blocks: packed int8 [N, K/32, 32], scale fp16 [N, K/32]."""
  N, nb, _ = packed.shape
  K, wpb = nb * QBLOCK, QBLOCK // 4
  if (opts := _blocks_opts(N, nb, wpb)) is None: return None
  def body(i: UOp, xp: UOp, qp: UOp, sp: UOp) -> UOp:
    b, w, c = _block_ranges(nb, wpb)
    v = _byte(_as_words(qp), i, b * wpb + w, c)
    q = v - ((v >> 7) << 8)   # two's complement
    term = xp[b * QBLOCK + w * 4 + c].cast(dtypes.float) * q.cast(dtypes.float) * sp[i, b].cast(dtypes.float)
    return term.reduce(b, w, c, arg=Ops.ADD)
  y = _launch(f"gpu_matvec_q8_0_{N}_{K}", N, x.dtype, [x.reshape(K), packed, scale], body, opts)
  return y.reshape(*x.shape[:-1], N)


def matvec_q4_0(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor | None:
  """One row x @ dequant(W).T for Q4_0 blocks: packed uint8 [N, K/32, 16] (element j in the low nibble of byte j,
  element j + 16 in the high nibble), scale fp16 [N, K/32]."""
  N, nb, half = packed.shape
  K, wpb = nb * QBLOCK, half // 4
  if (opts := _blocks_opts(N, nb, wpb)) is None: return None
  def body(i: UOp, xp: UOp, qp: UOp, sp: UOp) -> UOp:
    b, w, c = _block_ranges(nb, wpb)
    v = _byte(_as_words(qp), i, b * wpb + w, c)
    lo, hi = (v & 15) - 8, (v >> 4) - 8
    j = b * QBLOCK + w * 4 + c
    pair = xp[j].cast(dtypes.float) * lo.cast(dtypes.float) + xp[j + half].cast(dtypes.float) * hi.cast(dtypes.float)
    return (pair * sp[i, b].cast(dtypes.float)).reduce(b, w, c, arg=Ops.ADD)
  y = _launch(f"gpu_matvec_q4_0_{N}_{K}", N, x.dtype, [x.reshape(K), packed, scale], body, opts)
  return y.reshape(*x.shape[:-1], N)
