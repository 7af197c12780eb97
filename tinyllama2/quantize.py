"""Weight-only quantization: Q8_0 ("int8") and Q4_0 ("int4") blocks of 32, laid out as in GGUF.

Quantization runs on the device with tinygrad ops. At run time the dequantization is a lazy elementwise
expression on the packed weights, so tinygrad fuses it into the matmul kernel: decode reads the int8/int4
bytes and the fp16 scales, never a float copy of the weights.
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType

from . import cpu_kernels, gpu_kernels

BLOCK = 32
MODES = ("int8", "int4")


class QuantLinear:
  """y = x @ dequant(W).T with W [out, in] stored as Q8_0 or Q4_0 blocks along `in`."""

  def __init__(self, mode: str, packed: Tensor, scale: Tensor, in_features: int, dtype: DType):
    if mode not in MODES: raise ValueError(f"unknown quantization {mode!r}; use one of {MODES}")
    self.mode, self.packed, self.scale, self.in_features, self.dtype = mode, packed, scale, in_features, dtype

  @property
  def out_features(self) -> int: return self.packed.shape[0]

  @property
  def block_kind(self) -> str:
    """The GGUF name of the block layout: "q8_0" or "q4_0"."""
    return "q8_0" if self.mode == "int8" else "q4_0"

  @classmethod
  def from_float(cls, weight: Tensor, mode: str) -> QuantLinear:
    out, k = weight.shape
    if k % BLOCK: raise ValueError(f"cannot quantize a [{out}, {k}] weight: {k} is not a multiple of {BLOCK}")
    blocks = weight.float().reshape(out, k // BLOCK, BLOCK)
    packed, scale = (quantize_q8_0 if mode == "int8" else quantize_q4_0)(blocks)
    q = cls(mode, packed.contiguous(), scale.contiguous(), k, weight.dtype)
    Tensor.realize(q.packed, q.scale)
    return q

  def dequantize(self, dtype: DType | None = None) -> Tensor:
    dtype = dtype or self.dtype
    d = self.scale.cast(dtype).unsqueeze(-1)
    if self.mode == "int8": vals = self.packed.cast(dtype)
    else:
      lo, hi = self.packed.bitwise_and(15), self.packed.rshift(4)
      vals = lo.cat(hi, dim=-1).cast(dtype) - 8
    return (vals * d).reshape(self.out_features, self.in_features)

  def __call__(self, x: Tensor) -> Tensor:
    if cpu_kernels.usable(x, self.packed.dtype, self.packed.device):   # one row on the CPU: read the blocks as they are
      y = cpu_kernels.matvec_blocks(self.block_kind, x, [(self.packed, self.scale)])
      return y.reshape(*x.shape[:-1], self.out_features).cast(x.dtype)
    if cpu_kernels.matmul_usable(x, self.packed.dtype, self.packed.device):   # several rows (prefill) on the CPU
      return cpu_kernels.matmul(x, self.packed, self.scale, self.block_kind).cast(x.dtype)
    if gpu_kernels.usable(x, self.packed):   # one row on a GPU
      if (y := gpu_kernels.matvec_blocks(self.block_kind, x, [(self.packed, self.scale)])) is not None: return y
    return x @ self.dequantize().T

  def nbytes(self) -> int: return self.packed.nbytes() + self.scale.nbytes()


def quantize_q8_0(blocks: Tensor) -> tuple[Tensor, Tensor]:
  """blocks [..., 32] float → (int8 values [..., 32], fp16 scales [...]): d = max|x| / 127, q = round(x / d)."""
  d = blocks.abs().max(-1) / 127
  inv = (d > 0).where(1 / d.maximum(1e-30), 0)
  q = (blocks * inv.unsqueeze(-1)).round().clip(-127, 127).cast(dtypes.int8)
  return q, d.cast(dtypes.float16)


def quantize_q4_0(blocks: Tensor) -> tuple[Tensor, Tensor]:
  """llama.cpp's Q4_0: d = (the value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)).
  Two values per byte: element j in the low nibble of byte j, element j + 16 in the high nibble."""
  hi_v, lo_v = blocks.max(-1), blocks.min(-1)
  signed_max = (hi_v >= -lo_v).where(hi_v, lo_v)
  d = signed_max / -8
  inv = (d != 0).where(1 / (d + (d == 0).cast(d.dtype)), 0)
  q = (blocks * inv.unsqueeze(-1) + 8.5).floor().clip(0, 15).cast(dtypes.uint8)
  half = BLOCK // 2
  packed = q[..., :half].bitwise_or(q[..., half:].lshift(4))
  return packed, d.cast(dtypes.float16)


def _linears(model):
  """(owner, attribute name, our weight name) of every projection and of the output head."""
  for i, layer in enumerate(model.layers):
    for owner, prefix, names in ((layer.attention, "attention", ("wq", "wk", "wv", "wo")),
                                 (layer.feed_forward, "feed_forward", ("w1", "w2", "w3"))):
      for name in names: yield owner, name, f"layers.{i}.{prefix}.{name}.weight"
  yield model, "output", "output.weight"


def float_weights(model) -> dict[str, np.ndarray]:
  """The model's weights as float32 arrays by our names, quantized layers dequantized (for export)."""
  weights = {k: v.float().numpy() for k, v in model.state_dict().items() if not k.endswith((".packed", ".scale"))}
  for owner, attr, name in _linears(model):
    if isinstance(layer := getattr(owner, attr), QuantLinear): weights[name] = layer.dequantize(dtypes.float32).numpy()
  return weights


def load_prequantized(model, weights: dict) -> None:
  """Put blocks read from a file (GGUF Q8_0/Q4_0) straight into QuantLinear layers: no dequantize/requantize."""
  for owner, attr, name in _linears(model):
    w = weights.get(name)
    if w is None or not hasattr(w, "packed"): continue
    packed = Tensor(np.ascontiguousarray(w.packed), device=model.device)
    scale = Tensor(np.ascontiguousarray(w.scale), device=model.device)
    setattr(owner, attr, QuantLinear(w.mode, packed, scale, w.shape[1], model.dtype))
    Tensor.realize(packed, scale)
  model._runtime.reset_jits()


def quantize_model(model, mode: str) -> None:
  """Replace the projections of every layer and the output head by QuantLinear (the embedding stays float).

  A matrix whose input width is not a multiple of 32 stays float, as llama.cpp falls back for such rows."""
  from .model import Linear
  if mode not in MODES: raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
  # a tied head becomes its own layer here, so the quantized head and the float embedding are separate tensors
  if model.output is None: model.output = Linear.wrap(model.tok_embeddings.weight)
  for owner, attr, _ in _linears(model):
    layer = getattr(owner, attr)
    if isinstance(layer, QuantLinear):
      if layer.mode != mode: setattr(owner, attr, QuantLinear.from_float(layer.dequantize(), mode))
    elif layer.weight.shape[1] % BLOCK == 0: setattr(owner, attr, QuantLinear.from_float(layer.weight, mode))
  model.quantization = mode
  model._runtime.reset_jits()   # graphs captured before hold the float weights
