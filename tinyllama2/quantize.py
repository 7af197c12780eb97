"""Weight-only quantization: Q8_0 ("int8") and Q4_0 ("int4") blocks of 32, laid out as in GGUF.

Quantization runs on the device with tinygrad ops (`q8_0_on_device`, `q4_0_on_device`; checkpoint/gguf.py has the
numpy reference writers `q8_0_bytes`, `q4_0_bytes`, for files). The layers are `layers.QuantLinear`: the CPU and GPU
kernels read their blocks as they are, and tinygrad's graph fuses the dequantization into its matmul elsewhere,
so decoding reads the int8/int4 bytes and the fp16 scales, never a float copy of the weights.
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, dtypes

from .layers import BLOCK, QUANT_MODES, Linear, QuantLinear

__all__ = ["MODES", "QuantLinear", "float_weights", "load_prequantized", "quantize_model", "quantize_blocks"]

MODES = QUANT_MODES


def quantize_blocks(blocks: Tensor, mode: str) -> tuple[Tensor, Tensor]:
  """blocks [..., 32] float → (packed values, fp16 scales) of `mode` ("int8": Q8_0, "int4": Q4_0), on the device."""
  return (q8_0_on_device if mode == "int8" else q4_0_on_device)(blocks)


def q8_0_on_device(blocks: Tensor) -> tuple[Tensor, Tensor]:
  """blocks [..., 32] float → (int8 values [..., 32], fp16 scales [...]): d = max|x| / 127, q = round(x / d)."""
  d = blocks.abs().max(-1) / 127
  inv = (d > 0).where(1 / d.maximum(1e-30), 0)
  q = (blocks * inv.unsqueeze(-1)).round().clip(-127, 127).cast(dtypes.int8)
  return q, d.cast(dtypes.float16)


def q4_0_on_device(blocks: Tensor) -> tuple[Tensor, Tensor]:
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
  model.weights_changed()


def quantize_model(model, mode: str) -> None:
  """Replace the projections of every layer and the output head by QuantLinear (the embedding stays float).

  A matrix whose input width is not a multiple of 32 stays float, as llama.cpp falls back for such rows."""
  if mode not in MODES: raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
  # a tied head becomes its own layer here, so the quantized head and the float embedding are separate tensors
  if model.output is None: model.output = Linear(model.tok_embeddings.weight)
  for owner, attr, _ in _linears(model):
    layer = getattr(owner, attr)
    if isinstance(layer, QuantLinear):
      if layer.mode != mode: setattr(owner, attr, QuantLinear.from_float(layer.dequantize(), mode))
    elif layer.weight.shape[1] % BLOCK == 0: setattr(owner, attr, QuantLinear.from_float(layer.weight, mode))
  model.quantization = mode
  model.weights_changed()   # graphs captured before hold the float weights
