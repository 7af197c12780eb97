"""Matrix-vector kernels for decoding on tinygrad's CPU (clang) backend, written as tinygrad custom kernels.

Decoding one token is a chain of matrix-vector products, so its speed is how fast the weights stream from
memory. tinygrad 0.14's generated CPU matvec keeps one serial accumulator chain per output row, and its C
renderer scalarizes every ALU op (fp16 weights are even converted lane by lane), so clang cannot vectorize the
reduction without reassociating floats: 3.5 GB/s for fp32 and 0.7 GB/s for fp16 on our 2-core test machine.
These kernels keep four independent 8-wide fp32 accumulators per row and convert fp16/int8/int4 weights to
fp32 a vector at a time, which reaches ~9 GB/s, the single-core streaming limit (tinygrad 0.14 runs every CPU
kernel on one worker thread, so one core is all a kernel gets).

They are tinygrad kernels all the same: `Tensor.custom_kernel` places them in the lazy graph, TinyJit captures
them with the rest of the decode step and tinygrad's compiler cache keeps them. Only the body is C (a CUSTOM
op), so they exist for the clang renderer only; every other backend keeps the generic matmul.
"""
from __future__ import annotations

import functools

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import DType
from tinygrad.helpers import TRAINING
from tinygrad.uop.ops import KernelInfo, Ops

from . import cpu_threads

QBLOCK = 32   # values per Q8_0 / Q4_0 block
# weight bytes per value, by the kind in a kernel's name (matvec_<kind>_<rows>_<cols>)
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

_PRELUDE = """typedef float tl_f8 __attribute__((ext_vector_type(8), aligned(4)));
typedef float tl_f16 __attribute__((ext_vector_type(16), aligned(4)));
typedef __fp16 tl_h8 __attribute__((ext_vector_type(8), aligned(2)));
typedef signed char tl_i8x8 __attribute__((ext_vector_type(8), aligned(1)));
typedef unsigned char tl_u8x16 __attribute__((ext_vector_type(16), aligned(1)));
"""
_HSUM8 = "((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))"

def _dot_row(row: str, wt: str, K: int, load8: str, result: str) -> str:
  """C setting float `result` to (weight row at pointer `row`) · x (tl_x): four independent 8-wide accumulators,
  then an 8-wide and a scalar tail, so any K works."""
  ld = lambda off: load8.replace("ROW", f"w + k{off}")
  return f"""float {result};
  {{
  const {wt}* w = {row};
  tl_f8 a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int k = 0;
  for (; k + 32 <= {K}; k += 32) {{
    a0 += {ld("")} * *(const tl_f8*)(tl_x + k);
    a1 += {ld(" + 8")} * *(const tl_f8*)(tl_x + k + 8);
    a2 += {ld(" + 16")} * *(const tl_f8*)(tl_x + k + 16);
    a3 += {ld(" + 24")} * *(const tl_f8*)(tl_x + k + 24);
  }}
  for (; k + 8 <= {K}; k += 8) a0 += {ld("")} * *(const tl_f8*)(tl_x + k);
  tl_f8 a = (a0 + a1) + (a2 + a3);
  {result} = {_HSUM8};
  for (; k < {K}; k++) {result} += (float)w[k] * tl_x[k];
  }}
"""


# Each kernel is (declarations, rows): `rows` computes output rows [tl_lo, tl_hi), so the rows can be split
# between threads (cpu_threads.py). Params: {0} = float32 output, {1} = float32 x, {2}... = weights.

# Q8_0: {2} = int8 values [N, K/32, 32], {3} = fp16 scales [N, K/32]; y[n] = sum_b d[n,b] * sum_j q[n,b,j] x[32b+j]
_Q8_0 = """const signed char* restrict tl_q = (const signed char*){2};
const __fp16* restrict tl_d = (const __fp16*){3};
const float* restrict tl_x = (const float*){1};
""", """for (int n = tl_lo; n < tl_hi; n++) {
  tl_f8 a0 = 0, a1 = 0;
  for (int b = 0; b < %(NB)d; b++) {
    const signed char* q = tl_q + ((long)n * %(NB)d + b) * 32;
    const float* x = tl_x + b * 32;
    tl_f8 s = __builtin_convertvector(*(const tl_i8x8*)q, tl_f8) * *(const tl_f8*)x
            + __builtin_convertvector(*(const tl_i8x8*)(q + 8), tl_f8) * *(const tl_f8*)(x + 8)
            + __builtin_convertvector(*(const tl_i8x8*)(q + 16), tl_f8) * *(const tl_f8*)(x + 16)
            + __builtin_convertvector(*(const tl_i8x8*)(q + 24), tl_f8) * *(const tl_f8*)(x + 24);
    float d = (float)tl_d[(long)n * %(NB)d + b];
    if (b & 1) a1 += s * d; else a0 += s * d;
  }
  tl_f8 a = a0 + a1;
  {0}[n] = %(hsum)s;
}"""

# Q4_0: {2} = bytes [N, K/32, 16] (value j in the low nibble of byte j, value j+16 in the high nibble), {3} = fp16
# scales; a weight is (nibble - 8) * d
_Q4_0 = """const unsigned char* restrict tl_q = (const unsigned char*){2};
const __fp16* restrict tl_d = (const __fp16*){3};
const float* restrict tl_x = (const float*){1};
""", """for (int n = tl_lo; n < tl_hi; n++) {
  tl_f16 acc = 0;
  for (int b = 0; b < %(NB)d; b++) {
    tl_u8x16 p = *(const tl_u8x16*)(tl_q + ((long)n * %(NB)d + b) * 16);
    const float* x = tl_x + b * 32;
    tl_f16 lo = __builtin_convertvector(p & (unsigned char)15, tl_f16) - 8.0f;
    tl_f16 hi = __builtin_convertvector(p >> 4, tl_f16) - 8.0f;
    tl_f16 s = lo * *(const tl_f16*)x + hi * *(const tl_f16*)(x + 16);
    acc += s * (float)tl_d[(long)n * %(NB)d + b];
  }
  tl_f8 a = acc.lo + acc.hi;
  {0}[n] = %(hsum)s;
}"""

_WEIGHT_C_TYPE = {dtypes.float32: "float", dtypes.float16: "__fp16"}
# float32 weights are a plain vector load; float16 a vector conversion (one vcvtph2ps on x86)
_LOAD8 = {dtypes.float32: "(*(const tl_f8*)(ROW))", dtypes.float16: "__builtin_convertvector(*(const tl_h8*)(ROW), tl_f8)"}


@functools.cache
def available(device: str) -> bool:
  """True when `device` compiles C with clang (tinygrad's default CPU renderer)."""
  if device.split(":")[0] != "CPU": return False
  from tinygrad.renderer.cstyle import ClangRenderer
  return isinstance(Device[device].renderer, ClangRenderer)


def usable(x: Tensor, weight_dtype: DType, device: str) -> bool:
  """Whether a projection of x (one row, no gradient needed) can use these kernels."""
  rows = 1
  for s in x.shape[:-1]: rows *= s if isinstance(s, int) else 2
  return rows == 1 and not TRAINING and weight_dtype in (dtypes.float32, dtypes.float16, dtypes.int8, dtypes.uint8) \
    and isinstance(device, str) and available(device)


def upcast_for_matmul(x: Tensor, weight_dtype: DType, device: str) -> bool:
  """Whether a several-row matmul (prefill) on the CPU should first write its weight out as float32: tinygrad's
  generated matmul converts fp16 (and unpacks int8/int4) weights element by element inside the inner loop, which
  makes an fp16 prefill ~15x slower than fp32; one vectorizable conversion pass per weight costs far less."""
  return weight_dtype != dtypes.float32 and not TRAINING and isinstance(device, str) and available(device)


def _braces_for_format(src: str) -> str:
  """tinygrad renders a CUSTOM op with str.format: {0}, {1}, ... name its operands, every other brace is C."""
  src = src.replace("{", "{{").replace("}", "}}")
  for i in range(8): src = src.replace("{{%d}}" % i, "{%d}" % i)
  return src


def _rows_per_chunk(n_rows: int, row_bytes: float, threads: int) -> int:
  """Rows per work chunk: ~16 chunks per thread so they end together, but at least 16 KB of weights each."""
  return max(-(-n_rows // (16 * threads)), -(-16384 // max(int(row_bytes), 1)), 1)


def _run(name: str, declarations: str, rows: str, n_out: int, row_bytes: float, x: Tensor, *weights: Tensor) -> Tensor:
  """One kernel computing n_out float32 outputs; its rows are shared with helper threads when the device has them."""
  if not available(x.device): raise ValueError(f"the C decode kernels need tinygrad's clang CPU backend, not {x.device}")
  inputs = [x.reshape(-1).float(), *[w.reshape(-1) for w in weights]]
  if (pool := cpu_threads.pool(x.device)) is not None:
    chunk = _rows_per_chunk(n_out, row_bytes, cpu_threads.config.threads)
    body = cpu_threads.parallel_rows(name, n_out, chunk, len(inputs) + 2, rows)
    inputs.append(pool.mailbox)
  else:
    body = f"int tl_lo = 0, tl_hi = {n_out};\n{rows}"
  source = _braces_for_format(_PRELUDE + declarations + body)
  def kernel(*params: UOp) -> UOp:
    return UOp(Ops.CUSTOM, dtypes.void, src=params, arg=source).sink(arg=KernelInfo(name=name, opts_to_apply=()))
  out = Tensor.empty(n_out, dtype=dtypes.float32, device=x.device)
  return out.custom_kernel(*inputs, fxn=kernel)[0]


def _dense_declarations(weights: list[Tensor]) -> str:
  """Typed pointers tl_w0, tl_w1, ... to the dense weights {2}, {3}, ... and x as tl_x."""
  wt = _WEIGHT_C_TYPE[weights[0].dtype]
  ptrs = "".join(f"const {wt}* restrict tl_w{i} = (const {wt}*){{{i + 2}}};\n" for i in range(len(weights)))
  return ptrs + "const float* restrict tl_x = (const float*){1};\n"


def _kind(weight: Tensor) -> str: return "f16" if weight.dtype == dtypes.float16 else "f32"


def matvec(x: Tensor, weight: Tensor) -> Tensor:
  """x [..., K] (one row) @ weight[N, K].T → float32 [N]; weight float32 or float16."""
  return matvec_concat(x, [weight], name=f"matvec_{_kind(weight)}_{weight.shape[0]}_{weight.shape[1]}")


def matvec_concat(x: Tensor, weights: list[Tensor], name: str | None = None) -> Tensor:
  """[x @ w.T for w in weights] concatenated, in one kernel (the q, k and v projections of a layer)."""
  K, wt, load8 = weights[0].shape[1], _WEIGHT_C_TYPE[weights[0].dtype], _LOAD8[weights[0].dtype]
  rows, offset = "", 0
  for i, w in enumerate(weights):   # output rows [offset, offset + N) come from weight i
    N = w.shape[0]
    rows += f"for (int n = (tl_lo > {offset} ? tl_lo : {offset}); n < (tl_hi < {offset + N} ? tl_hi : {offset + N}); n++) {{\n" \
            f"  {_dot_row(f'tl_w{i} + (long)(n - {offset}) * {K}', wt, K, load8, 's')}  {{0}}[n] = s;\n}}\n"
    offset += N
  name = name or f"matvec{len(weights)}_{_kind(weights[0])}_{offset}_{K}"
  return _run(name, _dense_declarations(weights), rows, offset, K * weights[0].dtype.itemsize, x, *weights)


def matvec_swiglu(x: Tensor, gate: Tensor, up: Tensor) -> Tensor:
  """silu(x @ gate.T) * (x @ up.T) → float32 [N] in one kernel that streams both weights row by row."""
  (N, K), wt, load8 = gate.shape, _WEIGHT_C_TYPE[gate.dtype], _LOAD8[gate.dtype]
  rows = f"for (int n = tl_lo; n < tl_hi; n++) {{\n  {_dot_row(f'tl_w0 + (long)n * {K}', wt, K, load8, 'g')}" \
         f"  {_dot_row(f'tl_w1 + (long)n * {K}', wt, K, load8, 'u')}" \
         f"  {{0}}[n] = g / (1.0f + __builtin_expf(-g)) * u;\n}}\n"
  return _run(f"swiglu_{_kind(gate)}_{N}_{K}", _dense_declarations([gate, up]), rows, N, 2 * K * gate.dtype.itemsize,
              x, gate, up)


def _quantized(kind: str, template: tuple[str, str], x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
  N, NB = scale.shape
  rows = template[1] % {"NB": NB, "hsum": _HSUM8}
  return _run(f"matvec_{kind}_{N}_{NB * QBLOCK}", template[0], rows, N, NB * QBLOCK * BYTES_PER_WEIGHT[kind], x, packed, scale)


def matvec_q8_0(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
  """x [..., K] (one row) against Q8_0 blocks: packed int8 [N, K/32, 32], scale fp16 [N, K/32] → float32 [N]."""
  return _quantized("q8_0", _Q8_0, x, packed, scale)


def matvec_q4_0(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
  """x [..., K] (one row) against Q4_0 blocks: packed uint8 [N, K/32, 16], scale fp16 [N, K/32] → float32 [N]."""
  return _quantized("q4_0", _Q4_0, x, packed, scale)
