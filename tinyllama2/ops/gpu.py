"""Decode kernels for GPUs: one-row matrix products written as tinygrad UOps with hand-chosen optimizations.

Decoding one token reads every weight once, so each projection should stream its weights at the memory
bandwidth. For x @ W.T with a single row x, tinygrad 0.14's heuristics give each thread whole output rows: the
32 threads of a warp walk 32 different rows, so no load is coalesced (0.18–0.74 TB/s on an H200 for
llama2-7b's fp16 matrices, where these kernels stream 2.9–4.1 TB/s). Its matrix-vector heuristic (MV_*) would split rows across threads, but it only fires
when the reduction multiplies two plain loads, not the fp16→fp32 casts of a mixed-precision product; and a
`Tensor.contiguous(arg=opts)` hint is dropped by tinygrad 0.14 (tensor.py `replace_contig_with_store_after`
stores `u.src[0]`, losing `u.arg`).

So these kernels state the reduction plainly with `Tensor.custom_kernel` and attach the optimizations in their
KernelInfo: each thread loads 16 consecutive bytes of a row, `threads` threads of a work group share a row (a
warp reads 512 contiguous bytes), their partial sums meet in local memory, and every thread accumulates
`rows_per_thread` rows so x is loaded once for them. The dequantization of Q8_0/Q4_0 blocks happens in the
loop, so only the packed bytes are read. They compile on every backend with local memory (CUDA, NV, AMD,
Metal, OpenCL); the CPU has its own kernels (`ops/cpu.py`).

The functions at the end (`project`, ..., `cached_attention`) and `decode_attention` are the contract
ops/__init__.py calls, shared with ops/cpu.py. tinygrad 0.14 internals used: `Tensor.custom_kernel`, UOp
construction (`UOp.range`, `.reduce`, `.store`, `.valid`, `UOp.placeholder`, `UOp.variable(param=True)`),
`KernelInfo(opts_to_apply=...)` with `codegen.opt.Opt`/`OptOps`, and a renderer's `has_local`/`has_shared`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from tinygrad import Device, Tensor, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.dtype import DType
from tinygrad.uop.ops import AxisType, KernelInfo, Ops, UOp

QBLOCK = 32          # values per Q8_0 / Q4_0 block
LOAD_BYTES = 16      # bytes each thread loads at once (one 128-bit load)


@dataclass(frozen=True)
class MatvecSchedule:
  """How the work of y = W x is laid out on a GPU (upper bounds; each is reduced until it divides the shape)."""
  threads: int = 32          # threads of a work group that share one row's reduction
  rows: int = 4              # rows per work group
  rows_per_thread: int = 1   # rows each thread accumulates, reusing its loads of x

  def opts(self, n_out: int, n_reduce: int, unroll: int) -> tuple[Opt, ...] | None:
    """tinygrad optimizations for an [n_out, n_reduce] product loading `unroll` elements at once; None when the
    shape does not split (then the caller keeps tinygrad's generic kernel)."""
    if n_reduce % unroll: return None
    threads = _threads_for(n_reduce // unroll, self.threads)
    per_thread = _largest_divisor(n_out, self.rows_per_thread)
    # one row per work group when the thread count is not a power of two: PoCL miscomputes fp16 reductions over
    # 2-D work groups of such sizes (36 x 2 threads gave wrong sums in tests/test_gpu_kernels.py)
    rows = _largest_divisor(n_out // per_thread, self.rows if threads & (threads - 1) == 0 else 1)
    if threads < 4: return None
    opts = [Opt(OptOps.UNROLL, 0, unroll), Opt(OptOps.GROUP, 0, threads)]
    if rows > 1: opts.append(Opt(OptOps.LOCAL, 0, rows))
    if per_thread > 1: opts.append(Opt(OptOps.UPCAST, 0, per_thread))
    return tuple(opts)


# Measured on an H200 with llama2-7b's shapes (bench/gpu_matvec.py, see README): fp16 rows stream at 2.9-4.1 TB/s
# with 32 threads per row and 4 rows per work group; the block kernels do more arithmetic per byte and do best
# with each thread accumulating 2 rows (Q8_0 1.9-2.7 TB/s, Q4_0 1.0-1.7 TB/s).
SCHEDULES = {"dense": MatvecSchedule(32, 4, 1), "blocks": MatvecSchedule(32, 4, 2)}
_schedules = dict(SCHEDULES)


def set_schedule(kind: str, schedule: MatvecSchedule) -> MatvecSchedule:
  """Use `schedule` for the "dense" or "blocks" (Q8_0/Q4_0) kernels built from now on; returns the old one."""
  old, _schedules[kind] = _schedules[kind], schedule
  return old


def _largest_divisor(n: int, at_most: int) -> int:
  """The largest power of two ≤ at_most that divides n."""
  d = 1
  while d * 2 <= at_most and n % (d * 2) == 0: d *= 2
  return d


def _threads_for(n: int, wanted: int) -> int:
  """Threads sharing a reduction of n steps: a power of two up to `wanted` when one divides n well, else any divisor
  of n near `wanted` (llama2-7b's FFN has 344 blocks of 32 per row: with 43 threads instead of 8 its Q8_0 down
  projection went from 0.55 to 1.96 TB/s on an H200)."""
  d = _largest_divisor(n, wanted)
  if d * 2 > wanted: return d
  near = [t for t in range(wanted // 2, wanted * 2 + 1) if n % t == 0]
  return min(near, key=lambda t: abs(t - wanted)) if near else d


@functools.cache
def available(device: str) -> bool:
  """True for a device whose renderer has work groups with local memory (a GPU, or OpenCL); not the CPU."""
  if device.split(":")[0] in ("CPU", "PYTHON", "NULL", "DISK", "NPY"): return False
  try: renderer = Device[device].renderer
  except Exception: return False
  return bool(renderer.has_local and renderer.has_shared)


class _Row:
  """The input row x of a matrix-vector kernel as its body reads it, with what the kernel fuses around the product:
  RMSNorm of x before it (norm = (weight, eps)) and a residual added to each output. Every work group computes
  the sum of squares of x again, in the loop that reads x for its products, so the norm costs no kernel of its own
  and no pass of its own (x is a few KB, read from cache); a fused add saves a kernel per residual."""

  def __init__(self, x: Tensor, norm: tuple[Tensor, float] | None, residual: Tensor | None, out_dtype: DType | None = None):
    self.K, self.norm, self.residual, self.out_dtype = x.shape[-1], norm, residual, out_dtype or x.dtype
    self.inputs = [x.reshape(self.K)] + ([norm[0]] if norm else []) + ([residual.reshape(-1)] if residual is not None else [])

  def bind(self, params: tuple[UOp, ...]) -> tuple[UOp, ...]:
    """Take this row's kernel parameters from the front of `params`; returns the rest (the weights)."""
    self.xp, params = params[0], params[1:]
    if self.norm: self.nwp, params = params[0], params[1:]
    if self.residual is not None: self.rp, params = params[0], params[1:]
    return params

  def at(self, k: UOp) -> UOp:
    """x[k] as the product reads it: times the norm weight when normalized (1/rms scales the sums: `inv_rms`)."""
    v = self.xp[k].cast(dtypes.float)
    return v * self.nwp[k].cast(dtypes.float) if self.norm else v

  def inv_rms(self, squares: UOp) -> UOp | None:
    """1/rms(x) from the sum of x² over the kernel's reduce ranges (`squares`), None without a norm."""
    return ((squares * (1.0 / self.K) + float(self.norm[1])).rsqrt()) if self.norm else None

  def square(self, k: UOp) -> UOp:
    v = self.xp[k].cast(dtypes.float)
    return v * v

  def finish(self, i: UOp, value: UOp) -> UOp:
    return value + self.rp[i].cast(dtypes.float) if self.residual is not None else value

  def name(self, name: str) -> str:
    """Kernel names say what is fused in (norm_ before, _res after), so a profile tells the variants apart."""
    return ("norm_" if self.norm else "") + name + ("_res" if self.residual is not None else "")


def _launch(name: str, n_out: int, row: _Row, weights: list[Tensor], body, opts: tuple[Opt, ...]) -> Tensor:
  """A custom kernel computing y[i] for i < n_out in the row's output dtype: body(i, *weight placeholders) gives the
  product's value (float32), which `row` completes with its residual."""
  x, dtype = row.inputs[0], row.out_dtype
  def kernel(y: UOp, *params: UOp) -> UOp:
    weight_params = row.bind(params)
    i = UOp.range(n_out, 0)
    value = row.finish(i, body(i, *weight_params))
    return y[i].store(value.cast(dtype)).end(i).sink(arg=KernelInfo(name=row.name(name), opts_to_apply=opts))
  return Tensor.empty(n_out, dtype=dtype, device=x.device).custom_kernel(*row.inputs, *weights, fxn=kernel)[0]


def _row_dot(row: _Row, w: UOp, i: UOp, k: UOp) -> UOp:
  return (row.at(k) * w[i, k].cast(dtypes.float)).reduce(k, arg=Ops.ADD)


def _normalized(row: _Row, k: UOp, *dots: UOp) -> tuple[UOp, ...]:
  """The dots times 1/rms(x) when the row is normalized (x² summed over the same range k as the dots: one loop)."""
  if not row.norm: return dots
  inv = row.inv_rms(row.square(k).reduce(k, arg=Ops.ADD))
  return tuple(d * inv for d in dots)


def _unroll(dtype: DType) -> int: return LOAD_BYTES // dtype.itemsize


def matvec(x: Tensor, weight: Tensor) -> Tensor | None:
  """x [..., K] (one row) @ weight.T for weight [N, K]: the row [..., N] in x's dtype, or None if it does not fit."""
  return matvec_concat(x, [weight])


def _masked_rows(i: UOp, sizes: list[int]):
  """Output row i as a row index of each of several matrices stacked one after another, masked off (no load,
  value 0) outside that matrix's rows."""
  start = 0
  for n in sizes:
    yield (i - start).valid((i >= start) & (i < start + n)) if len(sizes) > 1 else i
    start += n


def matvec_concat(x: Tensor, weights: list[Tensor], norm: tuple[Tensor, float] | None = None,
                  residual: Tensor | None = None, out_dtype: DType | None = None) -> Tensor | None:
  """x (one row) @ [W0; W1; ...].T in one kernel (the q, k and v projections of a token): row i reads only the
  matrix that holds it. With norm = (weight, eps), x is RMS-normalized first; a residual [N] is added to the output.
  The output has x's dtype unless out_dtype is given (float32 logits from half activations)."""
  sizes, K = [w.shape[0] for w in weights], weights[0].shape[1]
  N = sum(sizes)
  opts = _schedules["dense"].opts(N, K, _unroll(weights[0].dtype))
  if opts is None or any(w.shape[1] != K or w.dtype != weights[0].dtype for w in weights): return None
  row = _Row(x, norm, residual, out_dtype)
  def body(i: UOp, *wps: UOp) -> UOp:
    k = UOp.range(K, 1, AxisType.REDUCE)
    w_ik = functools.reduce(UOp.__add__, [wp[r, k].cast(dtypes.float) for wp, r in zip(wps, _masked_rows(i, sizes))])
    return _normalized(row, k, (row.at(k) * w_ik).reduce(k, arg=Ops.ADD))[0]
  name = f"gpu_matvec{len(weights) if len(weights) > 1 else ''}_{N}_{K}"
  return _launch(name, N, row, weights, body, opts).reshape(*x.shape[:-1], N)


def matvec_swiglu(x: Tensor, gate: Tensor, up: Tensor, norm: tuple[Tensor, float] | None = None) -> Tensor | None:
  """silu(x @ gate.T) * (x @ up.T) for one row x in one kernel that reads both matrices once (x RMS-normalized
  first with norm = (weight, eps))."""
  N, K = gate.shape
  if (opts := _schedules["dense"].opts(N, K, _unroll(gate.dtype))) is None: return None
  row = _Row(x, norm, None)
  def body(i: UOp, gp: UOp, up_: UOp) -> UOp:
    k = UOp.range(K, 1, AxisType.REDUCE)   # one range for all sums: the optimizations apply to each
    g, u = _normalized(row, k, _row_dot(row, gp, i, k), _row_dot(row, up_, i, k))
    return _silu(g) * u
  return _launch(f"gpu_matvec_swiglu_{N}_{K}", N, row, [gate, up], body, opts).reshape(*x.shape[:-1], N)


def _as_words(packed: UOp) -> UOp:
  """The kernel parameter of packed bytes [N, ...] seen as int32 words [N, bytes per row / 4]: the code then loads
  whole words (four at once after unrolling) where byte loads are one instruction per byte. (Tensor.bitcast would
  copy the weights in a kernel of its own on every call.)"""
  N, row_bytes = packed.shape[0], math.prod(packed.shape[1:])
  return UOp.placeholder((N, row_bytes // 4), dtypes.int32, slot=packed.base.arg.slot)


def _blocks_opts(n_out: int, n_blocks: int, words_per_block: int, whole_blocks: bool) -> tuple[Opt, ...] | None:
  """Optimizations for a reduction over (block, word of the block, byte of the word): the bytes and up to four words
  (16 bytes) are unrolled into one load, threads of a work group take consecutive blocks. whole_blocks: all words of
  a block unrolled (Q8_0: two 16-byte loads), which a kernel with the norm's sum of squares needs: with a loop over
  words left, tinygrad 0.14's linearizer fails (an assertion in CFGContext) on the second reduction over it."""
  unroll_words = _largest_divisor(words_per_block, words_per_block if whole_blocks else LOAD_BYTES // 4)
  opts = _schedules["blocks"].opts(n_out, n_blocks, 1)
  if opts is None: return None
  return (Opt(OptOps.UNROLL, 2, 4), Opt(OptOps.UNROLL, 1, unroll_words)) + opts[1:]


def _block_index(b: UOp, w: UOp, c: UOp) -> UOp:
  """Index into x of byte c of word w of block b (Q4_0: the low nibble's value; the high nibble's is 16 further)."""
  return b * QBLOCK + w * 4 + c


def _block_term(kind: str, row: _Row, qp: UOp, sp: UOp, r: UOp, *, b: UOp, w: UOp, c: UOp) -> UOp:
  """scale[r, b] × (block b of weight row r · the matching 32 values of x), summed over the block's words w and
  bytes c. Q8_0: one signed byte per value. Q4_0: byte j of a block holds value j (low nibble) and j + 16."""
  wpb = qp.shape[-1] // 4
  word = _as_words(qp)[r, b * wpb + w]
  j = _block_index(b, w, c)
  if kind == "q8_0":
    q = (word >> (c * 8)).cast(dtypes.int8).cast(dtypes.float)   # the byte as a signed value (one PRMT/I2F)
    dot = row.at(j) * q
  else:
    v = (word >> (c * 8)) & 255
    lo, hi = ((v & 15) - 8).cast(dtypes.float), ((v >> 4) - 8).cast(dtypes.float)
    dot = row.at(j) * lo + row.at(j + QBLOCK // 2) * hi
  return dot.reduce(w, c, arg=Ops.ADD) * sp[r, b].cast(dtypes.float)


def _block_squares(kind: str, row: _Row, wpb: int, *, b: UOp, w: UOp, c: UOp) -> UOp:
  """The sum of x² over the same (block, word, byte) ranges as the products, so one loop computes both."""
  j = _block_index(b, w, c)
  sq = row.square(j) if kind == "q8_0" else row.square(j) + row.square(j + QBLOCK // 2)
  return sq.reduce(w, c, arg=Ops.ADD).reduce(b, arg=Ops.ADD)


def _blocks(kind: str, name: str, x: Tensor, layers: list[tuple[Tensor, Tensor]], combine,
            norm: tuple[Tensor, float] | None = None, residual: Tensor | None = None,
            out_dtype: DType | None = None) -> Tensor | None:
  """A kernel over the rows of several Q8_0/Q4_0 matrices (packed [N, K/32, bytes per block], scale [N, K/32]) of
  the same K: combine(i, terms, b, scale) gets each matrix's block terms for output row i and returns its value,
  applying scale (the norm's 1/rms) to each sum before anything nonlinear."""
  nb, wpb = layers[0][0].shape[1], layers[0][0].shape[2] // 4
  if any(p.shape[1:] != layers[0][0].shape[1:] for p, _ in layers): return None
  K, N = nb * QBLOCK, combine.n_out
  if (opts := _blocks_opts(N, nb, wpb, whole_blocks=norm is not None)) is None: return None
  row = _Row(x, norm, residual, out_dtype)
  def body(i: UOp, *params: UOp) -> UOp:
    b, w, c = UOp.range(nb, 1, AxisType.REDUCE), UOp.range(wpb, 2, AxisType.REDUCE), UOp.range(4, 3, AxisType.REDUCE)
    terms = [functools.partial(_block_term, kind, row, qp, sp, b=b, w=w, c=c) for qp, sp in zip(params[::2], params[1::2])]
    inv = row.inv_rms(_block_squares(kind, row, wpb, b=b, w=w, c=c)) if norm else None
    return combine(i, terms, b, (lambda v: v) if inv is None else (lambda v: v * inv))
  y = _launch(f"gpu_{name}_{kind}_{N}_{K}", N, row, [t for layer in layers for t in layer], body, opts)
  return y.reshape(*x.shape[:-1], N)


class _Rows:
  """combine for `_blocks`: output rows are the rows of the matrices one after another (q, k and v in one kernel)."""
  def __init__(self, sizes: list[int]): self.sizes, self.n_out = sizes, sum(sizes)

  def __call__(self, i: UOp, terms, b: UOp, scale) -> UOp:
    return scale(functools.reduce(UOp.__add__, [term(r) for term, r in zip(terms, _masked_rows(i, self.sizes))])
                 .reduce(b, arg=Ops.ADD))


class _SwiGLU:
  """combine for `_blocks`: silu(gate row i · x) × (up row i · x)."""
  def __init__(self, n: int): self.n_out = n

  def __call__(self, i: UOp, terms, b: UOp, scale) -> UOp:
    g, u = (scale(term(i).reduce(b, arg=Ops.ADD)) for term in terms)
    return _silu(g) * u


def _silu(g: UOp) -> UOp: return g * (1.0 / (1.0 + (g * -1.4426950408889634).exp2()))


def matvec_blocks(kind: str, x: Tensor, layers: list[tuple[Tensor, Tensor]], norm: tuple[Tensor, float] | None = None,
                  residual: Tensor | None = None, out_dtype: DType | None = None) -> Tensor | None:
  """One row x @ [dequant(W0); dequant(W1); ...].T for Q8_0 ("q8_0") or Q4_0 ("q4_0") layers (packed, scale);
  norm, residual and out_dtype as in `matvec_concat`."""
  return _blocks(kind, f"matvec{len(layers) if len(layers) > 1 else ''}", x, layers, _Rows([p.shape[0] for p, _ in layers]),
                 norm, residual, out_dtype)


def matvec_blocks_swiglu(kind: str, x: Tensor, gate: tuple[Tensor, Tensor], up: tuple[Tensor, Tensor],
                         norm: tuple[Tensor, float] | None = None) -> Tensor | None:
  """silu(x @ dequant(gate).T) * (x @ dequant(up).T) for one row x, both matrices read once (x RMS-normalized
  first with norm = (weight, eps))."""
  return _blocks(kind, "matvec_swiglu", x, [gate, up], _SwiGLU(gate[0].shape[0]), norm)


# ---- attention of one new token over the KV cache ----------------------------------------------------------------

def _kernel_position(start_pos: int | UOp) -> int | UOp:
  """The position as the kernels see it: an int, or the bound Variable's kernel-side parameter (its value arrives
  with each launch, so one compiled kernel serves every position)."""
  if isinstance(start_pos, int): return start_pos
  var = start_pos.unbind()[0] if start_pos.is_bound_var else start_pos
  return UOp.variable(var.arg.name, var.vmin, var.vmax, var.dtype, param=True)


def attention(q: Tensor, cache_k: Tensor, cache_v: Tensor, start_pos: int | UOp, first_row: int = 0) -> Tensor:
  """softmax(q k^T / sqrt(D)) v over cache positions 0..start_pos for q [1, 1, H, D] (RoPE applied, this token's
  k and v already in row first_row of the cache [rows, KV, max_len, D]) in two kernels: the scores, then softmax and the weighted
  sum of values together (tinygrad's generic path takes five: scores, max, sum of exp, normalize, values)."""
  _, _, H, D = q.shape
  _, KV, max_len, _ = cache_k.shape
  group, scale = H // KV, 1.0 / math.sqrt(D)
  unroll = _largest_divisor(D, _unroll(cache_k.dtype))
  threads = _largest_divisor(D // unroll, 32)

  def scores_kernel(out: UOp, qp: UOp, kp: UOp) -> UOp:
    n = _kernel_position(start_pos) + 1
    h, s, e = UOp.range(H, 0), UOp.range(n, 1), UOp.range(D, 2, AxisType.REDUCE)
    dot = (qp[0, 0, h, e].cast(dtypes.float) * kp[first_row, h // group, s, e].cast(dtypes.float)).reduce(e, arg=Ops.ADD)
    opts = (Opt(OptOps.UNROLL, 0, unroll), Opt(OptOps.GROUP, 0, threads)) if threads > 1 else ()
    return out[h, s].store(dot * scale).end(h, s).sink(arg=KernelInfo(name=f"gpu_attn_scores_{H}_{D}", opts_to_apply=opts))

  def values_kernel(out: UOp, sp: UOp, vp: UOp) -> UOp:
    n = _kernel_position(start_pos) + 1
    h, d = UOp.range(H, 0), UOp.range(D, 1)
    s1, s2, s3 = (UOp.range(n, i, AxisType.REDUCE) for i in (2, 3, 4))
    top = sp[h, s1].reduce(s1, arg=Ops.MAX)
    weight = lambda s: ((sp[h, s] - top) * 1.4426950408889634).exp2()
    total = weight(s2).reduce(s2, arg=Ops.ADD)
    acc = (weight(s3) * vp[first_row, h // group, s3, d].cast(dtypes.float)).reduce(s3, arg=Ops.ADD)
    per_thread = _largest_divisor(D, 4)
    opts = (Opt(OptOps.LOCAL, 1, _largest_divisor(D // per_thread, 32)),) + \
      ((Opt(OptOps.UPCAST, 1, per_thread),) if per_thread > 1 else ())
    return out[h, d].store((acc / total).cast(q.dtype)).end(h, d) \
      .sink(arg=KernelInfo(name=f"gpu_attn_values_{H}_{D}", opts_to_apply=opts))

  scores = Tensor.empty(H, max_len, dtype=dtypes.float32, device=q.device).custom_kernel(q, cache_k, fxn=scores_kernel)[0]
  out = Tensor.empty(H, D, dtype=q.dtype, device=q.device).custom_kernel(scores, cache_v, fxn=values_kernel)[0]
  return out.reshape(1, 1, H, D)


def _rotated_pair(src: UOp, base: int | UOp, i: UOp, cos: UOp, sin: UOp, pos: int | UOp) -> tuple[UOp, UOp]:
  """Pair i of the D values at src[base:] (elements 2i, 2i+1) rotated by RoPE at `pos`, float32."""
  x0, x1 = src[base + 2 * i].cast(dtypes.float), src[base + 2 * i + 1].cast(dtypes.float)
  c, s = cos[pos, i].cast(dtypes.float), sin[pos, i].cast(dtypes.float)
  return x0 * c - x1 * s, x0 * s + x1 * c


def decode_attention(qkv: Tensor, cache_k: Tensor, cache_v: Tensor, cos: Tensor, sin: Tensor, start_pos: int | UOp,
                     position: Tensor, n_heads: int, first_row: int = 0) -> Tensor:
  """One new token of one sequence in two kernels: qkv = its q, k and v unrotated [H*D + 2*KV*D]; RoPE of q and k
  at `start_pos` (tables cos/sin [max_len, D/2]), causal attention of q over positions 0..start_pos, and k, v written
  into row first_row of the caches [rows, KV, max_len, D] at that position → [H*D] in qkv's dtype. The first kernel computes the scores
  (the new key rotated on the fly, older keys from the cache); the second the softmax and the weighted sum of
  values, and the first query head of each kv head stores the new cache row. tinygrad's lazy graph does not
  order anything after that store (the cache outputs of the kernel are unused): nothing else in a decode step
  reads the cache, and every read of row start_pos in this step takes the new values from qkv (rounded to the
  cache dtype, as a cache read would give). `position` is any tensor computed from the bound start_pos (the decode
  step's int32 [1] buffer of it): the kernels take it as an input so that the Variable is in the graph and tinygrad
  knows its value at launch. Replaces the RoPE of q, the two cache writes and the scores/values kernels of
  `attention`'s path (five kernels) with two."""
  _, KV, max_len, D = cache_k.shape
  H = n_heads
  group, scale, cdt = H // KV, 1.0 / math.sqrt(D), cache_k.dtype
  k_base, v_base = H * D, (H + KV) * D
  threads = _largest_divisor(D // 2, 32)

  def scores_kernel(out: UOp, qp: UOp, kp: UOp, cp: UOp, sp: UOp, _position: UOp) -> UOp:
    pos = _kernel_position(start_pos)
    h, s, i = UOp.range(H, 0), UOp.range(pos + 1, 1), UOp.range(D // 2, 2, AxisType.REDUCE)   # i: a RoPE pair
    g = h // group
    q0, q1 = _rotated_pair(qp, h * D, i, cp, sp, pos)
    new0, new1 = (v.cast(cdt).cast(dtypes.float) for v in _rotated_pair(qp, k_base + g * D, i, cp, sp, pos))
    old = s < pos
    k0 = old.where(kp[first_row, g, s, 2 * i].cast(dtypes.float), new0)
    k1 = old.where(kp[first_row, g, s, 2 * i + 1].cast(dtypes.float), new1)
    dot = (q0 * k0 + q1 * k1).reduce(i, arg=Ops.ADD)
    opts = (Opt(OptOps.GROUP, 0, threads),) if threads > 1 else ()
    return out[h, s].store(dot * scale).end(h, s).sink(arg=KernelInfo(name=f"gpu_rope_attn_scores_{H}_{D}", opts_to_apply=opts))

  def values_kernel(out: UOp, scp: UOp, vp: UOp, qp: UOp, kp: UOp, cp: UOp, sp: UOp) -> UOp:
    pos = _kernel_position(start_pos)
    h, i, odd = UOp.range(H, 0), UOp.range(D // 2, 1), UOp.range(2, 2)   # output element d = 2i + odd (a RoPE pair)
    g, d = h // group, 2 * i + odd
    s1, s2, s3 = (UOp.range(pos + 1, r, AxisType.REDUCE) for r in (3, 4, 5))
    top = scp[h, s1].reduce(s1, arg=Ops.MAX)
    weight = lambda s: ((scp[h, s] - top) * 1.4426950408889634).exp2()
    total = weight(s2).reduce(s2, arg=Ops.ADD)
    new_v = qp[v_base + g * D + d].cast(cdt)
    value = (s3 < pos).where(vp[first_row, g, s3, d].cast(dtypes.float), new_v.cast(dtypes.float))
    acc = (weight(s3) * value).reduce(s3, arg=Ops.ADD)
    k0, k1 = _rotated_pair(qp, k_base + g * D, i, cp, sp, pos)
    writes = (h % group).eq(0)   # the first query head of each kv head writes its cache row
    stores = UOp.group(out[h, d].store((acc / total).cast(qkv.dtype)),
                       vp[first_row, g, pos, d.valid(writes)].store(new_v),
                       kp[first_row, g, pos, d.valid(writes)].store(odd.eq(0).where(k0, k1).cast(cdt)))
    opts = (Opt(OptOps.UPCAST, 2, 2), Opt(OptOps.LOCAL, 1, threads))
    return stores.end(h, i, odd).sink(arg=KernelInfo(name=f"gpu_rope_attn_values_{H}_{D}", opts_to_apply=opts))

  qkv = qkv.reshape(-1)
  scores = Tensor.empty(H, max_len, dtype=dtypes.float32, device=qkv.device) \
    .custom_kernel(qkv, cache_k, cos, sin, position, fxn=scores_kernel)[0]
  return Tensor.empty(H, D, dtype=qkv.dtype, device=qkv.device) \
    .custom_kernel(scores, cache_v, qkv, cache_k, cos, sin, fxn=values_kernel)[0].reshape(H * D)


# ---- the contract shared with ops/cpu.py (ops/__init__.py chooses; None: this module does not compute it) --------

WEIGHT_KINDS = ("f32", "f16", "bf16", "q8_0", "q4_0")
CACHE_DTYPES = (dtypes.float32, dtypes.float16, dtypes.bfloat16)


def project(x: Tensor, weights: list, norm: tuple[Tensor, float] | None = None, residual: Tensor | None = None,
            out_dtype: DType | None = None) -> Tensor | None:
  """One row x against layers of one kind read together (`layers.KernelWeights`) → their outputs one after another
  [..., sum of N] in out_dtype (default x's), x RMS-normalized first by norm = (weight, eps), a residual added;
  None when a shape does not split over the work groups, or for several rows."""
  if x.numel() != x.shape[-1]: return None
  if weights[0].blocks:
    return matvec_blocks(weights[0].kind, x, [w.tensors for w in weights], norm=norm, residual=residual, out_dtype=out_dtype)
  return matvec_concat(x, [w.tensors[0] for w in weights], norm=norm, residual=residual, out_dtype=out_dtype)


def project_swiglu(x: Tensor, gate, up, norm: tuple[Tensor, float] | None = None) -> Tensor | None:
  """silu(gate · x) * (up · x) for one row x, both layers read in one kernel, in x's dtype (None for several rows)."""
  if x.numel() != x.shape[-1]: return None
  if gate.blocks: return matvec_blocks_swiglu(gate.kind, x, gate.tensors, up.tensors, norm=norm)
  return matvec_swiglu(x, gate.tensors[0], up.tensors[0], norm=norm)


def project_rows(x: Tensor, weight) -> None:
  """Several rows (prefill) stay with tinygrad's graph on GPUs."""
  return None


def project_rows_swiglu(x: Tensor, gate, up) -> None:
  return None


def cached_attention(q: Tensor, cache_k: Tensor, cache_v: Tensor, start_pos: int | UOp,
                     key_bias: Tensor | None, first_row: int | UOp = 0) -> Tensor | None:
  """One token of one sequence without a padding bias, in a cache row fixed in the graph (`attention`); None for
  anything else."""
  B, T, _, D = q.shape
  if B != 1 or T != 1 or key_bias is not None or not isinstance(first_row, int) or \
     not all(isinstance(s, int) for s in cache_k.shape): return None
  return attention(q, cache_k, cache_v, start_pos, first_row)


def decode_attention_rows(qkv: Tensor, cache_k: Tensor, cache_v: Tensor, cos: Tensor, sin: Tensor, feed: Tensor,
                          n_heads: int) -> None:
  """Several sequences in one step are not written for GPUs yet: they decode one after another."""
  return None


def embedding_rows(weight: Tensor, feed: Tensor) -> None:
  return None
