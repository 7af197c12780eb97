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

The functions at the end (`project`, ..., `decode_attention`) are the contract ops/__init__.py calls, shared with
ops/gpu.py. tinygrad 0.14 internals used: `Tensor.custom_kernel` with a CUSTOM UOp body and `KernelInfo`, and
`renderer.cstyle.ClangRenderer` to recognise the clang backend.
"""
from __future__ import annotations

import functools

from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import DType
from tinygrad.uop.ops import KernelInfo, Ops

from ..runtime import cpu_threads

QBLOCK = 32   # values per Q8_0 / Q4_0 block
# weight bytes per value, by the kind in a kernel's name (matvec_<kind>_<rows>_<cols>)
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# TL_EXPF is exp without libm (a Taylor polynomial after range reduction, ~1 ulp; TL_EXPF8 the same for 8 lanes):
# tinygrad's ELF loader links a call to libm's expf as a 32-bit displacement without a range check, so once the
# process has mapped a few GB the call lands at a wrong address and the kernel dies of a segfault. These kernels
# call nothing outside themselves.
_PRELUDE = """typedef float tl_f8 __attribute__((ext_vector_type(8), aligned(4)));
typedef float tl_f16 __attribute__((ext_vector_type(16), aligned(4)));
typedef __fp16 tl_h8 __attribute__((ext_vector_type(8), aligned(2)));
typedef int tl_i8 __attribute__((ext_vector_type(8)));
typedef signed char tl_i8x8 __attribute__((ext_vector_type(8), aligned(1)));
typedef unsigned char tl_u8x16 __attribute__((ext_vector_type(16), aligned(1)));
typedef char tl_c32 __attribute__((vector_size(32), aligned(1)));
typedef short tl_s16x16 __attribute__((vector_size(32)));
#define TL_EXPF(v) ({ float tl_e_x = (v); \\
  tl_e_x = tl_e_x < -87.0f ? -87.0f : (tl_e_x > 88.0f ? 88.0f : tl_e_x); \\
  float tl_e_k = __builtin_rintf(tl_e_x * 1.44269504f); \\
  float tl_e_r = (tl_e_x - tl_e_k * 0.693145751953125f) - tl_e_k * 1.42860677e-6f; \\
  float tl_e_p = 1.0f + tl_e_r * (1.0f + tl_e_r * (0.5f + tl_e_r * (0.166666667f + tl_e_r * (0.0416666667f \\
                 + tl_e_r * (0.00833333333f + tl_e_r * 0.00138888889f))))); \\
  union { int i; float f; } tl_e_two = { .i = ((int)tl_e_k + 127) << 23 }; \\
  tl_e_p * tl_e_two.f; })
#define TL_EXPF8(v) ({ tl_f8 tl_e_x = __builtin_elementwise_max(__builtin_elementwise_min((v), (tl_f8)88.0f), (tl_f8)-87.0f); \\
  tl_f8 tl_e_k = (tl_e_x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */ \\
  tl_f8 tl_e_r = (tl_e_x - tl_e_k * 0.693145751953125f) - tl_e_k * 1.42860677e-6f; \\
  tl_f8 tl_e_p = 1.0f + tl_e_r * (1.0f + tl_e_r * (0.5f + tl_e_r * (0.166666667f + tl_e_r * (0.0416666667f \\
                 + tl_e_r * (0.00833333333f + tl_e_r * 0.00138888889f))))); \\
  tl_e_p * (tl_f8)((__builtin_convertvector(tl_e_k, tl_i8) + 127) << 23); })
"""
_HSUM8 = "((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))"

def _dot_row(row: str, wt: str, K: int, load8: str, result: str, x: str = "tl_x") -> str:
  """C setting float `result` to (weight row at pointer `row`) · x (pointer `x`): four independent 8-wide
  accumulators, then an 8-wide and a scalar tail, so any K works."""
  ld = lambda off: load8.replace("ROW", f"w + k{off}")
  return f"""float {result};
  {{
  const {wt}* w = {row};
  tl_f8 a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int k = 0;
  for (; k + 32 <= {K}; k += 32) {{
    a0 += {ld("")} * *(const tl_f8*)({x} + k);
    a1 += {ld(" + 8")} * *(const tl_f8*)({x} + k + 8);
    a2 += {ld(" + 16")} * *(const tl_f8*)({x} + k + 16);
    a3 += {ld(" + 24")} * *(const tl_f8*)({x} + k + 24);
  }}
  for (; k + 8 <= {K}; k += 8) a0 += {ld("")} * *(const tl_f8*)({x} + k);
  tl_f8 a = (a0 + a1) + (a2 + a3);
  {result} = {_HSUM8};
  for (; k < {K}; k++) {result} += (float)w[k] * {x}[k];
  }}
"""


def _dot_rows(row: str, wt: str, K: int, load8: str, results: list[str], xs: list[str]) -> str:
  """C setting each float results[r] to (weight row at pointer `row`) · xs[r], for a few rows of x at once: each
  weight vector is loaded (and converted) once for all of them, and each row's sum is computed exactly as
  `_dot_row` computes it alone (the same four accumulators, tails and order)."""
  ld = lambda off: load8.replace("ROW", f"w + k{off}")
  acc = ", ".join(f"a{r}{j} = 0" for r in range(len(xs)) for j in range(4))
  fma = lambda j, off: "".join(f"    a{r}{j} += v{j} * *(const tl_f8*)({x} + k{off});\n" for r, x in enumerate(xs))
  offs = ["", " + 8", " + 16", " + 24"]
  sums = "".join(f"  {{ tl_f8 a = (a{r}0 + a{r}1) + (a{r}2 + a{r}3); {res} = {_HSUM8}; }}\n" for r, res in enumerate(results))
  tails = "".join(f"    {res} += wk * {x}[k];\n" for res, x in zip(results, xs))
  return f"""float {", ".join(results)};
  {{
  const {wt}* w = {row};
  tl_f8 {acc};
  int k = 0;
  for (; k + 32 <= {K}; k += 32) {{
{"".join(f"    tl_f8 v{j} = {ld(offs[j])};" + chr(10) + fma(j, offs[j]) for j in range(4))}  }}
  for (; k + 8 <= {K}; k += 8) {{
    tl_f8 v0 = {ld("")};
{fma(0, "")}  }}
{sums}  for (; k < {K}; k++) {{
    float wk = (float)w[k];
{tails}  }}
  }}
"""


X_ROWS_PER_PASS = 3   # rows of x sharing each weight load in a batched step's kernels: 3 x 4 accumulators and the 4
# weight vectors fill the 16 AVX2 registers


# Each kernel is (declarations, rows): `rows` computes output rows [tl_lo, tl_hi), so the rows can be split
# between threads (cpu_threads.py). Params: {0} = float32 output, {1} = float32 x, {2}... = weights.

# Q8_0 and Q4_0 weights meet x quantized to Q8_0 blocks, as in llama.cpp: each thread first rounds x to int8
# (tl_xq) with a float scale per block of 32 (tl_xs), then a block's dot product is exact integer arithmetic
# (AVX2: sign tricks + pmaddubsw + pmaddwd, 32 products in four instructions) times the two scales. Converting
# every weight to float instead makes these kernels compute-bound below the memory bandwidth.
_QUANTIZE_X = """signed char tl_xq[%(K)d] __attribute__((aligned(32))), tl_xabs[%(K)d] __attribute__((aligned(32)));
float tl_xs[%(NB)d], tl_xsum[%(NB)d];
for (int b = 0; b < %(NB)d; b++) {
  const float* xb = tl_x + b * 32;
  float amax = 0;
  for (int j = 0; j < 32; j++) { float a = __builtin_fabsf(xb[j]); amax = a > amax ? a : amax; }
  float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
  int sum = 0;
  for (int j = 0; j < 32; j++) {
    int q = (int)__builtin_rintf(xb[j] * id);
    tl_xq[b * 32 + j] = (signed char)q;
    tl_xabs[b * 32 + j] = (signed char)(q < 0 ? -q : q);
    sum += q;
  }
  tl_xs[b] = d;
  tl_xsum[b] = d * (float)sum;   /* Q4_0: the -8 of every weight nibble, applied once per block */
}
"""
# tl_f8 s = (a tl_c32 of 32 int8 weights w) · (32 int8 of x at xq) as eight partial integer sums, in float. pmaddubsw
# multiplies unsigned bytes by signed ones: signed Q8_0 weights go through the sign trick (|x| · w·sign(x), |x| kept
# from rounding x: tl_xabs); Q4_0 nibbles 0..15 are unsigned already (their -8 comes back through tl_xsum): two
# instructions less per block, 5-10% faster Q4_0 kernels (in-process A/B, tinyllama-1.1b's gate/up and 32000-row head).
_PAIRS = {"q8_0": "__builtin_ia32_pmaddubsw256(*(const tl_c32*)(tl_xabs + XB * 32), __builtin_ia32_psignb256(w, xv))",
          "q4_0": "__builtin_ia32_pmaddubsw256(w, xv)"}
_I8_DOT = """#if defined(__AVX2__)
    const tl_s16x16 ones = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    tl_c32 xv = *(const tl_c32*)(XQ);
    tl_s16x16 pairs = PAIRS;
    tl_f8 s = __builtin_convertvector(__builtin_ia32_pmaddwd256(pairs, ones), tl_f8);
#else
    int si = 0;
    for (int j = 0; j < 32; j++) si += (int)w[j] * (int)(XQ)[j];
    tl_f8 s = 0;
    s[0] = (float)si;
#endif
"""
# The 32 int8 weights of block b of a row, as tl_c32 w: Q8_0 bytes as they are; Q4_0 bytes [N, K/32, 16] hold value j
# in the low nibble of byte j and value j+16 in the high nibble, a weight being (nibble - 8) * d: w holds the nibbles
_BLOCK_WEIGHTS = {
  "q8_0": "tl_c32 w = *(const tl_c32*)(Q + b * 32);",
  "q4_0": """tl_u8x16 p = *(const tl_u8x16*)(Q + b * 16);
    tl_c32 w = (tl_c32)__builtin_shufflevector(p & (unsigned char)15, p >> 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                               14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);""",
}
_BLOCK_BYTES = {"q8_0": 32, "q4_0": 16}


def _block_rows_dot(kind: str, dots: list[tuple], NB: int) -> str:
  """C setting float `result` to (row `row` of quantized weight i: bytes tl_q{i}, fp16 scales tl_d{i}) · x, with x as
  the thread's Q8_0 blocks (tl_xq, tl_xs): integer block dot products times the two scales; for several such dot
  products (weight i, row, result[, x block]) in one loop over the blocks, which loads each
  block of x (or of a weight, for several rows of x) once for all of them and gives the core independent chains to
  overlap; each dot's own sum is the same as alone. Q4_0 sums nibbles · x and subtracts 8 · (sum of the block's x)
  · scale once per row. A dot's fourth element (default "b") is the index of x's block b among the quantized blocks
  (of several rows of x: row r's block b is r * NB + b)."""
  q4 = kind == "q4_0"
  body, ends = "", ""
  for r, (i, row, result, *own_xb) in enumerate(dots):
    xb_r = own_xb[0] if own_xb else "b"
    q = f"(tl_q{i} + (long)({row}) * {NB * _BLOCK_BYTES[kind]})"
    body += f"""    {{
    {_BLOCK_WEIGHTS[kind].replace("Q", q)}
{_I8_DOT.replace("PAIRS", _PAIRS[kind].replace("XB", xb_r)).replace("XQ", f"tl_xq + {xb_r} * 32")}    float dw = (float)tl_d{i}[(long)({row}) * {NB} + b];
    acc{r} += s * (dw * tl_xs[{xb_r}]);
    {f"offset{r} += dw * tl_xsum[{xb_r}];" if q4 else ""}
    }}
"""
    ends += f"  {{ tl_f8 a = acc{r}; {result} = {_HSUM8}{f' - 8.0f * offset{r}' if q4 else ''}; }}\n"
  decl = "".join(f"  tl_f8 acc{r} = 0;\n  float offset{r} = 0;\n" for r in range(len(dots)))
  results = "".join(f"float {d[2]};\n" for d in dots)
  return f"""{results}{{
{decl}  for (int b = 0; b < {NB}; b++) {{
{body}  }}
{ends}}}
"""


# C element type of a weight, by the kind in a kernel's name
_C_TYPE = {"f32": "float", "f16": "__fp16", "q8_0": "signed char", "q4_0": "unsigned char"}
_WEIGHT_C_TYPE = {dtypes.float32: _C_TYPE["f32"], dtypes.float16: _C_TYPE["f16"]}
# float32 weights are a plain vector load; float16 a vector conversion (one vcvtph2ps on x86)
_LOAD8 = {dtypes.float32: "(*(const tl_f8*)(ROW))", dtypes.float16: "__builtin_convertvector(*(const tl_h8*)(ROW), tl_f8)"}


@functools.cache
def available(device: str) -> bool:
  """True when `device` compiles C with clang (tinygrad's default CPU renderer)."""
  if device.split(":")[0] != "CPU": return False
  from tinygrad.renderer.cstyle import ClangRenderer
  return isinstance(Device[device].renderer, ClangRenderer)


def kernel_source(src: str) -> str:
  """A kernel body for tinygrad's CUSTOM op, which renders it with str.format: {0}, {1}, ... name its operands,
  every other brace is C."""
  src = src.replace("{", "{{").replace("}", "}}")
  for i in range(64): src = src.replace("{{%d}}" % i, "{%d}" % i)
  return src


def _rows_per_chunk(n_rows: int, row_bytes: float, threads: int) -> int:
  """Rows per work chunk: ~16 chunks per thread so they end together, but at least 16 KB of weights each."""
  return max(-(-n_rows // (16 * threads)), -(-16384 // max(int(row_bytes), 1)), 1)


def _run(name: str, declarations: str, rows: str, n_out: int, row_bytes: float, x: Tensor, *weights: Tensor,
         n_rows: int | None = None, chunk_multiple: int = 1, prologue: str = "", extra: _Extras | None = None) -> Tensor:
  """One kernel computing n_out float32 outputs from n_rows independent weight rows (n_out by default), shared
  between threads in chunks of ~16 KB of weights (a multiple of chunk_multiple rows). `extra` adds its inputs
  after the weights and its x set-up before `prologue`; without it tl_x is x itself."""
  n_rows = n_rows or n_out
  threads = cpu_threads.config.threads
  chunk = -(-_rows_per_chunk(n_rows, row_bytes, threads) // chunk_multiple) * chunk_multiple
  extra = extra or _Extras(0, 0, None, None)
  inputs = [x.reshape(-1).float(), *[w.reshape(-1) for w in weights], *extra.inputs]
  return _launch(name, declarations + extra.declarations, rows, n_out, inputs, n_rows, chunk, extra.setup + prologue)


class _Extras:
  """What a matrix-vector kernel may fuse around its product, as C and inputs: RMSNorm of x before it (norm =
  (weight, eps); every thread normalizes its own copy of x, a few microseconds) and a residual added to each
  output (out[i] = residual[i] + row n · x). Saves the norm's two kernels and the add's one per use. Without
  either, tl_x is x itself. `rows`: rows of x (each normalized on its own)."""

  def __init__(self, first_param: int, K: int, norm: tuple[Tensor, float] | None, residual: Tensor | None,
               rows: int = 1):
    self.declarations, self.inputs, self.store = "", [], "{value}"
    self.setup = "const float* restrict tl_x = tl_in;\n"
    if norm is not None:
      weight, eps = norm
      wt = _WEIGHT_C_TYPE[weight.dtype]
      self.declarations += f"const {wt}* restrict tl_nw = (const {wt}*){{{first_param}}};\n"
      self.inputs.append(weight.reshape(-1))
      one = lambda src, dst: f"""{{
  tl_f8 a = 0;
  int k = 0;
  for (; k + 8 <= {K}; k += 8) {{ tl_f8 v = *(const tl_f8*)({src} + k); a += v * v; }}
  float ss = {_HSUM8};
  for (; k < {K}; k++) ss += {src}[k] * {src}[k];
  float inv = 1.0f / __builtin_sqrtf(ss / {K} + {float(eps)!r}f);
  for (k = 0; k < {K}; k++) {dst}[k] = {src}[k] * inv * (float)tl_nw[k];
}}
"""
      body = one("tl_in", "tl_xn") if rows == 1 else \
        f"for (int tl_r = 0; tl_r < {rows}; tl_r++) {one(f'(tl_in + (long)tl_r * {K})', f'(tl_xn + (long)tl_r * {K})')}"
      self.setup = f"float tl_xn[{rows * K}] __attribute__((aligned(32)));\n{body}const float* restrict tl_x = tl_xn;\n"
    if residual is not None:
      self.declarations += f"const float* restrict tl_res = (const float*){{{first_param + len(self.inputs)}}};\n"
      self.inputs.append(residual.reshape(-1).float())
      self.store = "tl_res[{index}] + {value}"


def _x_rows(x: Tensor) -> int:
  """Rows of x [..., K] (one per sequence of a batched decode step)."""
  return x.numel() // x.shape[-1]


def _x_row_groups(rows: int, per_pass: int = 0) -> list[list[int]]:
  """The rows of x in groups that share weight loads (X_ROWS_PER_PASS at a time unless per_pass says)."""
  per_pass = per_pass or X_ROWS_PER_PASS
  return [list(range(g, min(g + per_pass, rows))) for g in range(0, rows, per_pass)]


def _dense_dots(w_row: str, wt: str, K: int, load8: str, rows: int, name: str) -> tuple[str, list[str]]:
  """C computing weight row w_row · each row of x into floats {name}0, {name}1, ... (one row: `_dot_row` into
  {name}); and the names of those floats."""
  if rows == 1: return _dot_row(w_row, wt, K, load8, name), [name]
  code, names = "", []
  for group in _x_row_groups(rows):
    results = [f"{name}{r}" for r in group]
    code += _dot_rows(w_row, wt, K, load8, results, [f"(tl_x + {r * K})" for r in group])
    names += results
  return code, names


def _rows_name(name: str, rows: int) -> str: return name if rows == 1 else f"{name}_x{rows}"


def _launch(name: str, declarations: str, rows: str, n_out: int, inputs: list[Tensor], n_rows: int, rows_per_chunk: int,
            prologue: str = "") -> Tensor:
  """A custom kernel: {0} is its float32 output [n_out], {1}.. the inputs; `rows` computes rows [tl_lo, tl_hi), which
  helper threads share when the device has them, each thread running `prologue` once before its first rows."""
  device = inputs[0].device
  if not available(device): raise ValueError(f"the C CPU kernels need tinygrad's clang CPU backend, not {device}")
  if (pool := cpu_threads.pool(device)) is not None:
    inputs = [*inputs, pool.mailbox]
    body = cpu_threads.parallel_rows(name, n_rows, rows_per_chunk, len(inputs) + 1, rows, prologue)
  else:
    body = f"{prologue}int tl_lo = 0, tl_hi = {n_rows};\n{rows}"
  source = kernel_source(_PRELUDE + declarations + body)
  def kernel(*params: UOp) -> UOp:
    return UOp(Ops.CUSTOM, dtypes.void, src=params, arg=source).sink(arg=KernelInfo(name=name, opts_to_apply=()))
  return Tensor.empty(n_out, dtype=dtypes.float32, device=device).custom_kernel(*inputs, fxn=kernel)[0]


def _dense_declarations(weights: list[Tensor]) -> str:
  """Typed pointers tl_w0, tl_w1, ... to the dense weights {2}, {3}, ... and x as tl_in."""
  wt = _WEIGHT_C_TYPE[weights[0].dtype]
  ptrs = "".join(f"const {wt}* restrict tl_w{i} = (const {wt}*){{{i + 2}}};\n" for i in range(len(weights)))
  return ptrs + "const float* restrict tl_in = (const float*){1};\n"


def _kind(weight: Tensor) -> str: return "f16" if weight.dtype == dtypes.float16 else "f32"


def matvec(x: Tensor, weight: Tensor) -> Tensor:
  """x [..., K] (one row) @ weight[N, K].T → float32 [N]; weight float32 or float16."""
  return matvec_concat(x, [weight], name=f"matvec_{_kind(weight)}_{weight.shape[0]}_{weight.shape[1]}")


def _fused_name(name: str, norm: tuple[Tensor, float] | None, residual: Tensor | None) -> str:
  """Kernel names say what is fused in: norm_ before, _res after (a profile then tells the variants apart)."""
  return ("norm_" if norm is not None else "") + name + ("_res" if residual is not None else "")


def matvec_concat(x: Tensor, weights: list[Tensor], name: str | None = None, norm: tuple[Tensor, float] | None = None,
                  residual: Tensor | None = None) -> Tensor:
  """[x @ w.T for w in weights] concatenated, in one kernel (the q, k and v projections of a layer); with
  norm = (weight, eps), x is RMS-normalized first, and a residual [sum of N] is added to the output. x may hold a
  few rows (one per sequence decoded together): each weight row is read from memory once for all of them, and the
  output is [rows, sum of N]."""
  K, wt, load8 = weights[0].shape[1], _WEIGHT_C_TYPE[weights[0].dtype], _LOAD8[weights[0].dtype]
  B, total = _x_rows(x), sum(w.shape[0] for w in weights)
  extra = _Extras(2 + len(weights), K, norm, residual, B)
  rows, offset = "", 0
  for i, w in enumerate(weights):   # output rows [offset, offset + N) come from weight i
    N = w.shape[0]
    dots, names = _dense_dots(f"tl_w{i} + (long)(n - {offset}) * {K}", wt, K, load8, B, "s")
    index = lambda r: "n" if B == 1 else f"{r * total} + n"
    stores = "".join(f"  {{0}}[{index(r)}] = {extra.store.format(index=index(r), value=v)};\n" for r, v in enumerate(names))
    rows += f"for (int n = (tl_lo > {offset} ? tl_lo : {offset}); n < (tl_hi < {offset + N} ? tl_hi : {offset + N}); n++) {{\n" \
            f"  {dots}{stores}}}\n"
    offset += N
  name = _fused_name(name or f"matvec{len(weights)}_{_kind(weights[0])}_{offset}_{K}", norm, residual)
  return _run(_rows_name(name, B), _dense_declarations(weights), rows, B * total, K * weights[0].dtype.itemsize, x,
              *weights, n_rows=total, extra=extra)


def matvec_swiglu(x: Tensor, gate: Tensor, up: Tensor, norm: tuple[Tensor, float] | None = None) -> Tensor:
  """silu(x @ gate.T) * (x @ up.T) → float32 [N] ([rows, N] for a few rows of x) in one kernel that streams both
  weights row by row (x RMS-normalized first with norm = (weight, eps))."""
  (N, K), wt, load8 = gate.shape, _WEIGHT_C_TYPE[gate.dtype], _LOAD8[gate.dtype]
  B = _x_rows(x)
  g_dots, gs = _dense_dots(f"tl_w0 + (long)n * {K}", wt, K, load8, B, "g")
  u_dots, us = _dense_dots(f"tl_w1 + (long)n * {K}", wt, K, load8, B, "u")
  index = lambda r: "n" if B == 1 else f"{r * N} + n"
  stores = "".join(f"  {{0}}[{index(r)}] = {g} / (1.0f + TL_EXPF(-{g})) * {u};\n" for r, (g, u) in enumerate(zip(gs, us)))
  rows = f"for (int n = tl_lo; n < tl_hi; n++) {{\n  {g_dots}  {u_dots}{stores}}}\n"
  return _run(_rows_name(_fused_name(f"swiglu_{_kind(gate)}_{N}_{K}", norm, None), B), _dense_declarations([gate, up]),
              rows, B * N, 2 * K * gate.dtype.itemsize, x, gate, up, n_rows=N, extra=_Extras(4, K, norm, None, B))


def _block_declarations(kind: str, n_layers: int) -> str:
  """Typed pointers tl_q0, tl_d0, tl_q1, ... to the packed bytes and fp16 scales {2}, {3}, {4}, ... and x as tl_in."""
  qt = _C_TYPE[kind]
  ptrs = "".join(f"const {qt}* restrict tl_q{i} = (const {qt}*){{{2 + 2 * i}}};\n"
                 f"const __fp16* restrict tl_d{i} = (const __fp16*){{{3 + 2 * i}}};\n" for i in range(n_layers))
  return ptrs + "const float* restrict tl_in = (const float*){1};\n"


def _quantize_x(NB: int, rows: int) -> str:
  """The per-thread prologue rounding every row of x to Q8_0 blocks (a row's blocks follow the previous row's)."""
  return _QUANTIZE_X % {"K": rows * NB * QBLOCK, "NB": rows * NB}


def _x_block(r: int, rows: int, NB: int) -> str:
  """The index among the quantized blocks of x of row r's block b (see `_block_rows_dot`)."""
  return "b" if rows == 1 else f"({r * NB} + b)"


def matvec_blocks(kind: str, x: Tensor, layers: list[tuple[Tensor, Tensor]], norm: tuple[Tensor, float] | None = None,
                  residual: Tensor | None = None) -> Tensor:
  """x [..., K] (one row, or a few) against Q8_0 ("q8_0") or Q4_0 ("q4_0") layers (packed [N, K/32, 32 or 16], fp16
  scale [N, K/32]) → float32 [sum of N] per row of x, their outputs one after another, in one kernel: x is rounded to
  Q8_0 blocks once for all of them (the q, k and v projections of a layer). norm and residual as in `matvec_concat`."""
  NB, rows, offset = layers[0][1].shape[1], "", 0
  B, total = _x_rows(x), sum(scale.shape[0] for _, scale in layers)
  extra = _Extras(2 + 2 * len(layers), NB * QBLOCK, norm, residual, B)
  for i, (_, scale) in enumerate(layers):   # output rows [offset, offset + N) come from layer i
    N = scale.shape[0]
    dots = "".join(_block_rows_dot(kind, [(i, f"n - {offset}", f"s{r}", _x_block(r, B, NB)) for r in group], NB)
                   for group in _x_row_groups(B))
    index = lambda r: "n" if B == 1 else f"{r * total} + n"
    stores = "".join(f"  {{0}}[{index(r)}] = {extra.store.format(index=index(r), value=f's{r}')};\n" for r in range(B))
    rows += f"for (int n = (tl_lo > {offset} ? tl_lo : {offset}); n < (tl_hi < {offset + N} ? tl_hi : {offset + N}); n++) {{\n" \
            f"  {dots}{stores}}}\n"
    offset += N
  name = _fused_name(f"matvec{len(layers) if len(layers) > 1 else ''}_{kind}_{offset}_{NB * QBLOCK}", norm, residual)
  return _run(_rows_name(name, B), _block_declarations(kind, len(layers)), rows, B * total,
              NB * QBLOCK * BYTES_PER_WEIGHT[kind], x, *[t for layer in layers for t in layer], n_rows=total,
              prologue=_quantize_x(NB, B), extra=extra)


def matvec_blocks_swiglu(kind: str, x: Tensor, gate: tuple[Tensor, Tensor], up: tuple[Tensor, Tensor],
                         norm: tuple[Tensor, float] | None = None) -> Tensor:
  """silu(x @ dequant(gate).T) * (x @ dequant(up).T) → float32 [N] per row of x (one or a few), in one kernel (x
  RMS-normalized first with norm = (weight, eps))."""
  N, NB = gate[1].shape
  B = _x_rows(x)
  dots = "".join(_block_rows_dot(kind, [d for r in group for d in ((0, "n", f"g{r}", _x_block(r, B, NB)),
                                                                      (1, "n", f"u{r}", _x_block(r, B, NB)))], NB)
                 for group in _x_row_groups(B, 2))
  index = lambda r: "n" if B == 1 else f"{r * N} + n"
  stores = "".join(f"  {{0}}[{index(r)}] = g{r} / (1.0f + TL_EXPF(-g{r})) * u{r};\n" for r in range(B))
  rows = f"for (int n = tl_lo; n < tl_hi; n++) {{\n  {dots}{stores}}}\n"
  return _run(_rows_name(_fused_name(f"swiglu_{kind}_{N}_{NB * QBLOCK}", norm, None), B), _block_declarations(kind, 2),
              rows, B * N, 2 * NB * QBLOCK * BYTES_PER_WEIGHT[kind], x, *gate, *up, n_rows=N,
              prologue=_quantize_x(NB, B), extra=_Extras(6, NB * QBLOCK, norm, None, B))


# Several-row products (prefill): y [M, N] = x [M, K] @ W[N, K].T. Each group of three weight rows is first made
# float32 (fp16/Q8_0/Q4_0 converted into a buffer on the stack), then every four rows of x are multiplied with
# it in a 4x3 register tile: twelve 8-wide accumulators, so each loaded vector feeds three or four FMAs.
_TO_F32 = {
  "f16": """for (int k = 0; k < {K}; k++) dst[k] = (float)src[k];""",
  "q8_0": """for (int b = 0; b < {NB}; b++) {{
      float d = (float)scale[(long)r * {NB} + b];
      const signed char* q = src + b * 32;
      for (int i = 0; i < 32; i += 8) *(tl_f8*)(dst + b * 32 + i) = __builtin_convertvector(*(const tl_i8x8*)(q + i), tl_f8) * d;
    }}""",
  "q4_0": """for (int b = 0; b < {NB}; b++) {{
      float d = (float)scale[(long)r * {NB} + b];
      tl_u8x16 p = *(const tl_u8x16*)(src + b * 16);
      *(tl_f16*)(dst + b * 32) = (__builtin_convertvector(p & (unsigned char)15, tl_f16) - 8.0f) * d;
      *(tl_f16*)(dst + b * 32 + 16) = (__builtin_convertvector(p >> 4, tl_f16) - 8.0f) * d;
    }}""",
}
_TILE_ROWS, _TILE_COLS = 4, 3   # rows of x, rows of W per register tile


def _hsum(a: str) -> str: return _HSUM8.replace("a[", f"{a}[")


def _tile(mt: int, K: int, w: str, store) -> str:
  """C for rows m..m+mt-1 of x against the weight rows {w}0, {w}1, {w}2; store(i, j, value) is the C statement
  that keeps output (m + i, n + j) (it is only reached for j < nt, the weight rows that exist)."""
  xs = "".join(f"  const float* x{i} = tl_x + (long)(m + {i}) * {K};\n" for i in range(mt))
  acc = ", ".join(f"a{i}{j} = 0" for i in range(mt) for j in range(3))
  fma = "".join(f"    u = *(const tl_f8*)(x{i} + k); a{i}0 += u * v0; a{i}1 += u * v1; a{i}2 += u * v2;\n" for i in range(mt))
  sums = "".join(f"  float s{i}{j} = {_hsum(f'a{i}{j}')};\n" for i in range(mt) for j in range(3))
  tail = "".join(f"    s{i}{j} += x{i}[k] * {w}{j}[k];\n" for i in range(mt) for j in range(3))
  stores = "".join(f"  {'' if j == 0 else f'if (nt > {j}) '}{store(i, j, f's{i}{j}')}\n" for i in range(mt) for j in range(3))
  return f"""{{
{xs}  tl_f8 {acc}, u;
  int k = 0;
  for (; k + 8 <= {K}; k += 8) {{
    tl_f8 v0 = *(const tl_f8*)({w}0 + k), v1 = *(const tl_f8*)({w}1 + k), v2 = *(const tl_f8*)({w}2 + k);
{fma}  }}
{sums}  for (; k < {K}; k++) {{
{tail}  }}
{stores}}}
"""


def _weight_rows(kind: str, K: int, index: int, prefix: str) -> str:
  """C that points {prefix}0..2 at weight rows n..n+2 of weight `index` as float32 (converted into a stack
  buffer unless they already are); rows past the chunk's end repeat row n."""
  weight, scale = f"tl_w{index}", f"tl_d{index}"
  row = f"{weight} + (long)r * {K // 2 if kind == 'q4_0' else K}"
  if kind == "f32": convert = f"rows[j] = {row};"
  else:
    scale_ptr = f"const __fp16* scale = {scale};\n    " if kind in ("q8_0", "q4_0") else ""
    convert = f"const {_C_TYPE[kind]}* src = {row};\n    {scale_ptr}float* dst = {prefix}_buf + j * {K};\n    " \
              + _TO_F32[kind].format(K=K, NB=K // QBLOCK) + "\n    rows[j] = dst;"
  return f"""const float *{prefix}0, *{prefix}1, *{prefix}2;
{{
  const float* rows[3];
  for (int j = 0; j < 3; j++) {{
    int r = n + j;
    if (j >= nt) {{ rows[j] = rows[0]; continue; }}
    {convert}
  }}
  {prefix}0 = rows[0]; {prefix}1 = rows[1]; {prefix}2 = rows[2];
}}
"""


def _matmul(name: str, x: Tensor, weights: list[tuple[Tensor, Tensor | None]], kind: str, combine: str | None) -> Tensor:
  """y [..., N] = x [..., K] @ W.T for one weight, or combine(g, u) of two products with weights (W_g, W_u)."""
  K, N = x.shape[-1], weights[0][0].shape[0]
  M = x.numel() // K
  decl = "float* restrict tl_y = (float*){0};\nconst float* restrict tl_in = (const float*){1};\n"
  inputs, prefixes = [], ("w", "u")
  for i, (w, scale) in enumerate(weights):
    decl += f"const {_C_TYPE[kind]}* restrict tl_w{i} = (const {_C_TYPE[kind]}*){{{len(inputs) + 2}}};\n"
    inputs.append(w.reshape(-1))
    if scale is not None:
      decl += f"const __fp16* restrict tl_d{i} = (const __fp16*){{{len(inputs) + 2}}};\n"
      inputs.append(scale.reshape(-1))
    if kind != "f32": decl += f"float {prefixes[i]}_buf[3 * {K}] __attribute__((aligned(64)));\n"
  out = lambda i, j, v: f"tl_y[(long)(m + {i}) * {N} + n + {j}] = {v};"
  if combine is None: tiles = lambda mt: _tile(mt, K, "w", out)
  else:   # the first product is kept in registers (tl_g), the second combines with it
    keep = lambda i, j, v: f"tl_g[{i}][{j}] = {v};"
    both = lambda i, j, v: out(i, j, combine.format(g=f"tl_g[{i}][{j}]", u=v))
    tiles = lambda mt: "{\n" + f"float tl_g[{mt}][3];\n" + _tile(mt, K, "w", keep) + _tile(mt, K, "u", both) + "}\n"
  rows = f"""for (int n = tl_lo; n < tl_hi; n += 3) {{
  int nt = tl_hi - n < 3 ? tl_hi - n : 3;
{"".join(_weight_rows(kind, K, i, prefixes[i]) for i in range(len(weights)))}  int m = 0;
  for (; m + {_TILE_ROWS} <= {M}; m += {_TILE_ROWS}) {tiles(_TILE_ROWS)}  for (; m < {M}; m++) {tiles(1)}}}
"""
  row_bytes = K * BYTES_PER_WEIGHT[kind] * len(weights)
  y = _run(f"{name}_{kind}_{M}_{N}_{K}", decl, rows, M * N, row_bytes, x, *inputs, n_rows=N, chunk_multiple=_TILE_COLS)
  return y.reshape(*x.shape[:-1], N)


def matmul(x: Tensor, weight: Tensor, scale: Tensor | None = None, kind: str | None = None) -> Tensor:
  """x [..., K] (several rows) @ W.T → float32 [..., N] for W float32/float16 [N, K], or Q8_0/Q4_0 blocks with
  kind "q8_0"/"q4_0" (weight = packed values, scale = fp16 scales [N, K/32])."""
  return _matmul("matmul", x, [(weight, scale)], kind or _kind(weight), None)


def matmul_swiglu(x: Tensor, gate: Tensor, up: Tensor) -> Tensor:
  """silu(x @ gate.T) * (x @ up.T) for several rows of x, in one kernel (no [M, hidden] intermediates)."""
  return _matmul("swiglu", x, [(gate, None), (up, None)], _kind(gate), "{g} / (1.0f + TL_EXPF(-{g})) * {u}")


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
  """silu(gate) * up for float32 rows [..., N], the rows shared between the threads. Prefill of quantized gate/up
  layers needs it between their two products; tinygrad's generated kernel for it took ~2.8 ms on one core for
  stories110M's 128 x 2048 (a tenth of its int4 prefill), this one ~0.2 ms."""
  N = gate.shape[-1]
  M = gate.numel() // N
  decl = "float* restrict tl_y = (float*){0};\nconst float* restrict tl_g = (const float*){1};\n" \
         "const float* restrict tl_u = (const float*){2};\n"
  rows = f"""long i = (long)tl_lo * {N}, end = (long)tl_hi * {N};
for (; i + 8 <= end; i += 8) {{
  tl_f8 g = *(const tl_f8*)(tl_g + i);
  *(tl_f8*)(tl_y + i) = g / (1.0f + TL_EXPF8(-g)) * *(const tl_f8*)(tl_u + i);
}}
for (; i < end; i++) tl_y[i] = tl_g[i] / (1.0f + TL_EXPF(-tl_g[i])) * tl_u[i];
"""
  per_chunk = _rows_per_chunk(M, N * 12, cpu_threads.config.threads)
  y = _launch(f"silu_mul_{M}_{N}", decl, rows, M * N, [gate.reshape(-1).float(), up.reshape(-1).float()], M, per_chunk)
  return y.reshape(gate.shape)


def _dot(D: int, a: str, b: str, b_load8: str) -> str:
  """C expression-statement: float `dot` = a[0:D] · b[0:D] (b float or __fp16), in 8-wide pieces when D allows."""
  if D % 8: return f"float dot = 0; for (int d = 0; d < {D}; d++) dot += {a}[d] * (float){b}[d];"
  load = b_load8.replace("ROW", f"{b} + d")
  return f"tl_f8 a = 0; for (int d = 0; d < {D}; d += 8) a += *(const tl_f8*)({a} + d) * {load};\n    float dot = {_HSUM8};"


def attention(q: Tensor, cache_k: Tensor, cache_v: Tensor, start_pos: int | UOp, key_bias: Tensor | None = None,
              first_row: int | UOp = 0) -> Tensor:
  """Causal attention of q [B, T, H, D] (positions start_pos..start_pos+T-1) over cache rows first_row.. of the
  cache [rows, KV, max_seq_len, D], whose first start_pos + T positions are filled; key_bias [B, max_seq_len] is
  added to the scores of each key.
  → float32 [B, T, H, D]. One (batch, position, head) row per work item, so prefill rows spread over the threads;
  tinygrad's generated kernels for the same attention reach ~3 GFLOP/s here."""
  B, T, H, D = q.shape
  _, KV, max_len, _ = cache_k.shape
  kt, load8 = _WEIGHT_C_TYPE[cache_k.dtype], _LOAD8[cache_k.dtype]
  decl = f"float* restrict tl_o = (float*){{0}};\nconst float* restrict tl_q = (const float*){{1}};\n" \
         f"const {kt}* restrict tl_k = (const {kt}*){{2}};\nconst {kt}* restrict tl_v = (const {kt}*){{3}};\n"
  inputs = [q.reshape(-1).float(), cache_k.reshape(-1), cache_v.reshape(-1)]
  if key_bias is not None:
    decl += f"const float* restrict tl_bias = (const float*){{{len(inputs) + 1}}};\n"
    inputs.append(key_bias.reshape(-1).float())
  for name, value in (("tl_pos", start_pos), ("tl_row", first_row)):
    if isinstance(value, UOp):   # a bound Variable: its value reaches the C through a one-int buffer
      decl += f"const int {name} = *(const int*){{{len(inputs) + 1}}};\n"
      inputs.append(Tensor.full((1,), value, dtype=dtypes.int32, device=q.device).contiguous())
    else: decl += f"const int {name} = {int(value)};\n"
  bias = f" + tl_bias[(long)b * {max_len} + s]" if key_bias is not None else ""
  rows = f"""for (int r = tl_lo; r < tl_hi; r++) {{
  int h = r % {H}, t = (r / {H}) % {T}, b = r / ({H} * {T});
  int n_keys = tl_pos + t + 1;
  const float* q = tl_q + (long)r * {D};
  long head = ((long)(b + tl_row) * {KV} + h / {H // KV}) * {max_len} * {D};
  float scores[n_keys];
  float top = -__builtin_inff();
  for (int s = 0; s < n_keys; s++) {{
    const {kt}* k = tl_k + head + (long)s * {D};
    {_dot(D, "q", "k", load8)}
    scores[s] = dot * {1 / D ** 0.5!r}f{bias};
    if (scores[s] > top) top = scores[s];
  }}
  float* o = tl_o + (long)r * {D};
  float acc[{D}] __attribute__((aligned(32)));
  for (int d = 0; d < {D}; d++) acc[d] = 0;
  float total = 0;
  if (top > -__builtin_inff()) for (int s = 0; s < n_keys; s++) {{
    float p = TL_EXPF(scores[s] - top);
    const {kt}* v = tl_v + head + (long)s * {D};
    total += p;
    for (int d = 0; d < {D}; d++) acc[d] += p * (float)v[d];
  }}
  for (int d = 0; d < {D}; d++) o[d] = total > 0 ? acc[d] / total : 0.0f;
}}
"""
  row = "_rowvar" if isinstance(first_row, UOp) else f"_row{first_row}" if first_row else ""
  name = f"attention_{_kind(cache_k)}_{B}_{T}_{H}_{KV}_{D}{row}"
  out = _launch(name, decl, rows, B * T * H * D, inputs, B * T * H, 1)
  return out.reshape(B, T, H, D)


def _attend_new_token(D: int, half: int, H: int, KV: int, max_len: int, kt: str, load8: str) -> str:
  """C for one query head h of one new token whose q, k, v (unrotated) are at q_in, k_in, v_in, at position tl_pos
  of the cache head starting at `head` (an element offset into tl_k / tl_v): RoPE of q and k, this token's k and
  v written into the cache by the first query head of each kv head, attention over positions 0..tl_pos into o."""
  rotate = lambda src, dst, cast: f"""for (int i = 0; i < {half}; i++) {{
    float x0 = {src}[2 * i], x1 = {src}[2 * i + 1];
    {dst}[2 * i] = {cast}(x0 * c[i] - x1 * sn[i]);
    {dst}[2 * i + 1] = {cast}(x0 * sn[i] + x1 * c[i]);
  }}"""
  return f"""{{
  const float *c = tl_cos + (long)tl_pos * {half}, *sn = tl_sin + (long)tl_pos * {half};
  float q[{D}] __attribute__((aligned(32)));
  {kt} k_new[{D}] __attribute__((aligned(32))), v_new[{D}] __attribute__((aligned(32)));
  {rotate("q_in", "q", "")}
  {rotate("k_in", "k_new", f"({kt})")}
  for (int d = 0; d < {D}; d++) v_new[d] = ({kt})v_in[d];
  if (h % {H // KV} == 0) for (int d = 0; d < {D}; d++) {{
    tl_k[head + (long)tl_pos * {D} + d] = k_new[d];
    tl_v[head + (long)tl_pos * {D} + d] = v_new[d];
  }}
  int n_keys = tl_pos + 1;
  float scores[n_keys];
  float top = -__builtin_inff();
  for (int s = 0; s < n_keys; s++) {{
    const {kt}* k = s < tl_pos ? tl_k + head + (long)s * {D} : k_new;
    {_dot(D, "q", "k", load8)}
    scores[s] = dot * {1 / D ** 0.5!r}f;
    if (scores[s] > top) top = scores[s];
  }}
  float acc[{D}] __attribute__((aligned(32)));
  for (int d = 0; d < {D}; d++) acc[d] = 0;
  float total = 0;
  for (int s = 0; s < n_keys; s++) {{
    float p = TL_EXPF(scores[s] - top);
    const {kt}* v = s < tl_pos ? tl_v + head + (long)s * {D} : v_new;
    total += p;
    for (int d = 0; d < {D}; d++) acc[d] += p * (float)v[d];
  }}
  for (int d = 0; d < {D}; d++) o[d] = acc[d] / total;
}}
"""


def _attention_declarations(kt: str) -> str:
  return f"""float* restrict tl_o = (float*){{0}};
const float* restrict tl_qkv = (const float*){{1}};
{kt}* tl_k = ({kt}*){{2}};
{kt}* tl_v = ({kt}*){{3}};
const float* restrict tl_cos = (const float*){{4}};
const float* restrict tl_sin = (const float*){{5}};
"""


def decode_attention(qkv: Tensor, cache_k: Tensor, cache_v: Tensor, cos: Tensor, sin: Tensor, start_pos: int | UOp,
                     position: Tensor, n_heads: int, first_row: int = 0) -> Tensor:
  """One new token of one sequence, in one kernel: RoPE of its q and k (qkv = q, k, v unrotated, [H*D + 2*KV*D]) with
  row `position` of the tables cos/sin [max_len, D/2], its k and v written into row first_row of the caches
  [rows, KV, max_len, D] at that position, then causal attention of q over positions 0..position → float32 [H*D].
  The kernel reads the position from `position`, an int32 [1] buffer holding start_pos, so one compiled kernel
  serves every step. The cache write happens inside the kernel, unseen by tinygrad's graph: nothing else in a
  decode step reads the cache, and the next step's kernels run after this one.
  The first query head of each kv head writes that head's row; every head uses its own copy of the new k and v
  (rounded to the cache dtype, as a cache read would give), so no head reads a row another thread is writing.
  Replaces seven kernels per layer (RoPE of q and k, two cache writes, the position, attention)."""
  _, KV, max_len, D = cache_k.shape
  H, kt, load8 = n_heads, _WEIGHT_C_TYPE[cache_k.dtype], _LOAD8[cache_k.dtype]
  decl = _attention_declarations(kt) + "const int tl_pos = *(const int*){6};\n"
  rows = f"""for (int h = tl_lo; h < tl_hi; h++) {{
  int g = h / {H // KV};
  const float* q_in = tl_qkv + h * {D};
  const float* k_in = tl_qkv + {H * D} + g * {D};
  const float* v_in = tl_qkv + {(H + KV) * D} + g * {D};
  long head = ((long){first_row} * {KV} + g) * {max_len * D};
  float* o = tl_o + (long)h * {D};
  {_attend_new_token(D, D // 2, H, KV, max_len, kt, load8)}}}
"""
  inputs = [qkv.reshape(-1).float(), cache_k.reshape(-1), cache_v.reshape(-1), cos.reshape(-1), sin.reshape(-1),
            position.reshape(-1)]
  name = f"decode_attention_{_kind(cache_k)}_{H}_{KV}_{D}_{max_len}" + (f"_row{first_row}" if first_row else "")
  return _launch(name, decl, rows, H * D, inputs, H, 1)


def decode_attention_rows(qkv: Tensor, cache_k: Tensor, cache_v: Tensor, cos: Tensor, sin: Tensor, feed: Tensor,
                          n_heads: int) -> Tensor:
  """`decode_attention` for a few sequences at once, each at its own position in its own cache row: qkv [B, H*D +
  2*KV*D], feed int32 [3, B] = (tokens, positions, cache rows) → float32 [B, H*D]. A row whose cache row is -1
  (padding up to the batch size of a compiled step) writes nothing and attends to nothing (zeros). Each (sequence,
  head) computes exactly what `decode_attention` computes for it alone."""
  B = qkv.shape[0]
  _, KV, max_len, D = cache_k.shape
  H, kt, load8 = n_heads, _WEIGHT_C_TYPE[cache_k.dtype], _LOAD8[cache_k.dtype]
  width = (H + 2 * KV) * D
  decl = _attention_declarations(kt) + "const int* restrict tl_feed = (const int*){6};\n"
  rows = f"""for (int r = tl_lo; r < tl_hi; r++) {{
  int b = r / {H}, h = r % {H}, g = h / {H // KV};
  int tl_pos = tl_feed[{B} + b], slot = tl_feed[{2 * B} + b];
  float* o = tl_o + (long)r * {D};
  if (slot < 0) {{ for (int d = 0; d < {D}; d++) o[d] = 0; continue; }}
  const float* q_in = tl_qkv + (long)b * {width} + h * {D};
  const float* k_in = tl_qkv + (long)b * {width} + {H * D} + g * {D};
  const float* v_in = tl_qkv + (long)b * {width} + {(H + KV) * D} + g * {D};
  long head = ((long)slot * {KV} + g) * {max_len * D};
  {_attend_new_token(D, D // 2, H, KV, max_len, kt, load8)}}}
"""
  inputs = [qkv.reshape(-1).float(), cache_k.reshape(-1), cache_v.reshape(-1), cos.reshape(-1), sin.reshape(-1),
            feed.reshape(-1)]
  out = _launch(f"decode_attention_{_kind(cache_k)}_{H}_{KV}_{D}_{max_len}_x{B}", decl, rows, B * H * D, inputs, B * H, 1)
  return out.reshape(B, H * D)


def embedding_rows(weight: Tensor, feed: Tensor) -> Tensor:
  """Rows feed[0, :] (the tokens of a batched decode step, int32 [3, B]) of the embedding table [vocab, dim] →
  float32 [B, dim]: a row read per token (tinygrad's gather compares every table row with every token)."""
  B, dim = feed.shape[1], weight.shape[1]
  wt = _WEIGHT_C_TYPE[weight.dtype]
  decl = f"float* restrict tl_y = (float*){{0}};\nconst int* restrict tl_feed = (const int*){{1}};\n" \
         f"const {wt}* restrict tl_w = (const {wt}*){{2}};\n"
  rows = f"""for (int b = tl_lo; b < tl_hi; b++) {{
  const {wt}* row = tl_w + (long)tl_feed[b] * {dim};
  for (int d = 0; d < {dim}; d++) tl_y[(long)b * {dim} + d] = (float)row[d];
}}
"""
  return _launch(f"embedding_{_kind(weight)}_{dim}_x{B}", decl, rows, B * dim, [feed.reshape(-1), weight.reshape(-1)],
                 B, B).reshape(B, dim)


# ---- the contract shared with ops/gpu.py (ops/__init__.py chooses; None: this module does not compute it) --------

WEIGHT_KINDS = ("f32", "f16", "q8_0", "q4_0")   # what these kernels read (bf16 stays with tinygrad's graph)
CACHE_DTYPES = (dtypes.float32, dtypes.float16)


def project(x: Tensor, weights: list, norm: tuple[Tensor, float] | None = None, residual: Tensor | None = None,
            out_dtype: DType | None = None) -> Tensor | None:
  """One row x (or a few: the sequences of a batched decode step) against layers of one kind read together
  (`layers.KernelWeights`) → their outputs one after another [..., sum of N] in out_dtype (default x's), x
  RMS-normalized first by norm = (weight, eps), a residual added."""
  kind = weights[0].kind
  if kind in ("f32", "f16"):
    dense = [w.tensors[0] for w in weights]
    extras = norm is not None or residual is not None
    y = matvec_concat(x, dense, norm=norm, residual=residual) if len(dense) > 1 or extras else matvec(x, dense[0])
  else: y = matvec_blocks(kind, x, [w.tensors for w in weights], norm=norm, residual=residual)
  return y.reshape(*x.shape[:-1], -1).cast(out_dtype or x.dtype)


def project_swiglu(x: Tensor, gate, up, norm: tuple[Tensor, float] | None = None) -> Tensor | None:
  """silu(gate · x) * (up · x) for one row x (or a few), both layers read in one kernel, in x's dtype."""
  if gate.kind in ("f32", "f16"): y = matvec_swiglu(x, gate.tensors[0], up.tensors[0], norm=norm)
  else: y = matvec_blocks_swiglu(gate.kind, x, gate.tensors, up.tensors, norm=norm)
  return y.reshape(*x.shape[:-1], -1).cast(x.dtype)


def project_rows(x: Tensor, weight) -> Tensor | None:
  """x [..., K] (several rows) against one layer, in x's dtype."""
  if weight.blocks: return matmul(x, *weight.tensors, kind=weight.kind).cast(x.dtype)
  return matmul(x, weight.tensors[0]).cast(x.dtype)


def project_rows_swiglu(x: Tensor, gate, up) -> Tensor | None:
  """silu(x @ gate.T) * (x @ up.T) for several rows: one kernel for float weights; for Q8_0/Q4_0 the two products,
  then the threaded SwiGLU kernel (a fused block kernel was slower on small models)."""
  if not gate.blocks: return matmul_swiglu(x, gate.tensors[0], up.tensors[0]).cast(x.dtype)
  g, u = (matmul(x, *w.tensors, kind=w.kind) for w in (gate, up))
  return silu_mul(g, u).cast(x.dtype)


def cached_attention(q: Tensor, cache_k: Tensor, cache_v: Tensor, start_pos: int | UOp,
                     key_bias: Tensor | None, first_row: int | UOp = 0) -> Tensor | None:
  """Causal attention of q [B, T, H, D] over cache rows first_row.. of the KV cache (`attention`), in q's dtype."""
  return attention(q, cache_k, cache_v, start_pos, key_bias, first_row).cast(q.dtype)
