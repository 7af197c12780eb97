"""The linear layers a Llama is built from, each saying how a hand-written kernel reads it.

`Linear` holds a float weight, `QuantLinear` Q8_0/Q4_0 blocks, `LoRALinear` wraps a base layer with a low-rank
update. All three are called the same way (`layer(x)` goes through `ops.linear`) and answer `kernel_weights`:
the tensors a kernel would read and their kind, or None when only the layer's own graph (`forward`) computes it.
So `ops` chooses kernels from what a layer says it holds, never from its type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType

from . import ops

if TYPE_CHECKING: from .lora import LoraConfig

BLOCK = 32                      # values per Q8_0 / Q4_0 block
QUANT_MODES = ("int8", "int4")  # our names; GGUF's are q8_0 / q4_0
_DENSE_KIND = {dtypes.float32: "f32", dtypes.float16: "f16", dtypes.bfloat16: "bf16"}


@dataclass(frozen=True)
class KernelWeights:
  """What a kernel reads for one layer: kind "f32" | "f16" | "bf16" with (weight [N, K],), or "q8_0" | "q4_0" with
  (packed [N, K/32, 32 or 16], scale fp16 [N, K/32])."""
  kind: str
  tensors: tuple[Tensor, ...]

  @property
  def blocks(self) -> bool: return self.kind in ("q8_0", "q4_0")

  @property
  def out_features(self) -> int: return self.tensors[-1].shape[0]


class Linear:
  """A bias-free linear layer y = x @ W.T with W of shape [out, in] (PyTorch/Meta layout)."""

  def __init__(self, weight: Tensor): self.weight = weight

  @classmethod
  def empty(cls, in_features: int, out_features: int, dtype: DType, device: str) -> Linear:
    return cls(Tensor.empty(out_features, in_features, dtype=dtype, device=device))

  def _asdict(self) -> dict[str, Tensor]:
    """The parameters by name (tinygrad's get_state_dict reads a layer through this hook)."""
    return {"weight": self.weight}

  @property
  def kernel_weights(self) -> KernelWeights | None:
    kind = _DENSE_KIND.get(self.weight.dtype)
    return None if kind is None else KernelWeights(kind, (self.weight,))

  def forward(self, x: Tensor) -> Tensor: return ops.grad_boundary(x @ self.weight.T)

  def __call__(self, x: Tensor) -> Tensor: return ops.linear(x, self)


class QuantLinear:
  """y = x @ dequant(W).T with W [out, in] stored as Q8_0 or Q4_0 blocks along `in`, laid out as in GGUF."""

  def __init__(self, mode: str, packed: Tensor, scale: Tensor, in_features: int, dtype: DType):
    if mode not in QUANT_MODES: raise ValueError(f"unknown quantization {mode!r}; use one of {QUANT_MODES}")
    self.mode, self.packed, self.scale, self.in_features, self.dtype = mode, packed, scale, in_features, dtype

  def _asdict(self) -> dict[str, Tensor]: return {"packed": self.packed, "scale": self.scale}

  @property
  def out_features(self) -> int: return self.packed.shape[0]

  @property
  def block_kind(self) -> str:
    """The GGUF name of the block layout: "q8_0" or "q4_0"."""
    return "q8_0" if self.mode == "int8" else "q4_0"

  @property
  def kernel_weights(self) -> KernelWeights: return KernelWeights(self.block_kind, (self.packed, self.scale))

  @classmethod
  def from_float(cls, weight: Tensor, mode: str) -> QuantLinear:
    from .quantize import quantize_blocks
    out, k = weight.shape
    if k % BLOCK: raise ValueError(f"cannot quantize a [{out}, {k}] weight: {k} is not a multiple of {BLOCK}")
    packed, scale = quantize_blocks(weight.float().reshape(out, k // BLOCK, BLOCK), mode)
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

  def forward(self, x: Tensor) -> Tensor: return x @ self.dequantize().T

  def __call__(self, x: Tensor) -> Tensor: return ops.linear(x, self)

  def nbytes(self) -> int: return self.packed.nbytes() + self.scale.nbytes()


class LoRALinear:
  """A frozen base Linear plus a trainable low-rank update: y = base(x) + scale · dropout(x) A^T B^T, with A [r, in]
  and B [out, r] (scale = alpha / r). Its parameters keep the base's name `weight` beside lora_A and lora_B."""

  def __init__(self, base: Linear, cfg: LoraConfig):
    out_f, in_f = base.weight.shape
    self.base = base
    base.weight.is_param_(False)
    dev = base.weight.device
    # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0 (no change at first)
    bound = 1 / math.sqrt(in_f)
    self.lora_A = Tensor.uniform(cfg.r, in_f, low=-bound, high=bound, device=dev).contiguous().realize()
    self.lora_B = Tensor.zeros(out_f, cfg.r, device=dev).contiguous().realize()
    self.scale, self.dropout, self.merged = cfg.scale, cfg.dropout, False
    self.enabled = True   # False: the base layer alone (lora.adapters_off)

  def _asdict(self) -> dict[str, Tensor]: return {"weight": self.weight, "lora_A": self.lora_A, "lora_B": self.lora_B}

  @property
  def weight(self) -> Tensor: return self.base.weight

  @property
  def kernel_weights(self) -> None:
    """Only the layer's own graph computes it (lora.merge turns a merged layer back into a plain Linear)."""
    return None

  def delta(self) -> Tensor: return (self.lora_B @ self.lora_A) * self.scale   # [out, in]

  def forward(self, x: Tensor) -> Tensor:
    y = x @ self.weight.T
    if self.merged or not self.enabled: return y
    h = x.dropout(self.dropout) if self.dropout else x
    return y + ((h.cast(dtypes.float32) @ self.lora_A.T @ self.lora_B.T) * self.scale).cast(y.dtype)

  def __call__(self, x: Tensor) -> Tensor: return ops.linear(x, self)

  def merge(self) -> None:
    if not self.merged: self.weight.assign((self.weight.float() + self.delta()).cast(self.weight.dtype)).realize()
    self.merged = True

  def unmerge(self) -> None:
    if self.merged: self.weight.assign((self.weight.float() - self.delta()).cast(self.weight.dtype)).realize()
    self.merged = False
