"""The one-token decode step in few kernels: an opt-in runner over a Transformer's own layers.

Per layer (ops/cpu.py: five kernels, where tinygrad's graph of the same layer takes 14; ops/gpu.py: six, attention
being two): RMSNorm + q/k/v; RoPE + cache write + attention; wo + residual; RMSNorm + gate/up/SwiGLU; w2 +
residual. Then RMSNorm + the output head. For small models on the CPU and for big GPUs the per-kernel cost is a
large part of a step. It computes what `Transformer.decode_step` computes (tests hold the two equal); a model
whose layers it cannot read together (LoRA, bf16, a mix of float and quantized layers) has no plan and decodes
through `Transformer.decode_step`.

`decode_rows` is the same step for a few sequences at once (the engine's batch), each at its own position in its
own cache row: every weight is read once for all of them, and each row is computed exactly as it is alone. Only
ops/cpu.py has kernels for it; elsewhere it returns None and the sequences decode one after another.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from tinygrad import Tensor, UOp, dtypes

from . import backend, cpu


@dataclass
class LayerPlan:
  qkv: list      # KernelWeights of wq, wk, wv
  wo: list
  gate_up: list  # of w1, w3
  w2: list


@dataclass
class Plan:
  kernels: ModuleType
  layers: list[LayerPlan]
  head: list


def _together(layers) -> list | None:
  """The layers' kernel weights when one fused kernel reads them: one float kind (f32, f16) or one block kind."""
  weights = [layer.kernel_weights for layer in layers]
  if any(w is None for w in weights) or len({w.kind for w in weights}) != 1: return None
  return weights if weights[0].kind in ("f32", "f16", "q8_0", "q4_0") else None


def plan(model) -> Plan | None:
  """How the fused step reads `model` on its device, None when it cannot (see the module docstring)."""
  kernels = backend(model.device)
  if kernels is None or model.dtype not in (dtypes.float32, dtypes.float16): return None
  layers = []
  for block in model.layers:
    a, f = block.attention, block.feed_forward
    parts = [_together(group) for group in ((a.wq, a.wk, a.wv), (a.wo,), (f.w1, f.w3), (f.w2,))]
    norms = (block.attention_norm, block.ffn_norm)
    if None in parts or any(n.weight.dtype not in (dtypes.float32, dtypes.float16) for n in norms): return None
    layers.append(LayerPlan(*parts))
  head = _together((model.head,))
  if head is None or model.norm.weight.dtype not in (dtypes.float32, dtypes.float16): return None
  return Plan(kernels, layers, head)


def _norm(norm) -> tuple[Tensor, float]: return norm.weight, norm.eps


def decode_step(model, plan: Plan, token: UOp, start_pos: UOp, caches: list) -> Tensor | None:
  """Logits [1, vocab] (float32) of one token (a bound Variable) at start_pos (a bound Variable), writing the
  caches' row start_pos; None when a GPU kernel does not fit a shape (the caller then uses the plain step)."""
  kernels, rope = plan.kernels, model.rope
  position = Tensor.full((1,), start_pos, dtype=dtypes.int32, device=model.device).contiguous()
  x = model.tok_embeddings.weight.shrink(((token, token + 1), None)).reshape(-1)
  # float32 activations on the CPU, as llama.cpp keeps them; the model's dtype on a GPU, where every work group of
  # a product reads all of x (and the norm weight) from cache: half the bytes of float32 beside its weight rows
  x = x.float() if kernels is cpu else x.contiguous()
  for block, layer, cache in zip(model.layers, plan.layers, caches):
    if (qkv := kernels.project(x, layer.qkv, norm=_norm(block.attention_norm))) is None: return None
    attended = kernels.decode_attention(qkv, cache.k, cache.v, rope.cos, rope.sin, start_pos, position,
                                        block.attention.n_heads, cache.first)
    if (h := kernels.project(attended, layer.wo, residual=x)) is None: return None
    if (gated := kernels.project_swiglu(h, *layer.gate_up, norm=_norm(block.ffn_norm))) is None: return None
    if (x := kernels.project(gated, layer.w2, residual=h)) is None: return None
  logits = kernels.project(x, plan.head, norm=_norm(model.norm), out_dtype=dtypes.float32)
  return None if logits is None else logits.reshape(1, -1)


def decode_rows(model, plan: Plan, feed: Tensor, caches: list) -> Tensor | None:
  """Logits [B, vocab] (float32) of B sequences' next tokens: feed int32 [3, B] holds their tokens, positions and
  cache rows (-1: a padding row, which writes nothing). None where the kernels have no batched step."""
  kernels, rope = plan.kernels, model.rope
  if (x := kernels.embedding_rows(model.tok_embeddings.weight, feed)) is None: return None
  for block, layer, cache in zip(model.layers, plan.layers, caches):
    if (qkv := kernels.project(x, layer.qkv, norm=_norm(block.attention_norm))) is None: return None
    attended = kernels.decode_attention_rows(qkv, cache.k, cache.v, rope.cos, rope.sin, feed, block.attention.n_heads)
    if attended is None or (h := kernels.project(attended, layer.wo, residual=x)) is None: return None
    if (gated := kernels.project_swiglu(h, *layer.gate_up, norm=_norm(block.ffn_norm))) is None: return None
    if (x := kernels.project(gated, layer.w2, residual=h)) is None: return None
  return kernels.project(x, plan.head, norm=_norm(model.norm), out_dtype=dtypes.float32)
