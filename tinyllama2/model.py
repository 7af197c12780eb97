"""The Llama decoder on tinygrad: RMSNorm, RoPE attention (MHA/MQA/GQA) with a KV cache, SwiGLU, output head.

Weights follow Meta's names and layout (q/k rows in the interleaved RoPE layout, as in llama2.c); loaders
convert other layouts into this one. The model knows nothing about files or tokenizers.
"""
from __future__ import annotations

import math
import os
import warnings

# read before tinygrad picks its default device: it then writes DEV into the environment itself
_USER_DEV = os.environ.get("DEV")

import numpy as np  # noqa: E402
from tinygrad import Tensor, TinyJit, UOp, Variable, dtypes  # noqa: E402
from tinygrad.dtype import DType  # noqa: E402
from tinygrad.helpers import TRAINING  # noqa: E402

from . import cpu_kernels, gpu_kernels  # noqa: E402
from .config import ModelArgs  # noqa: E402
from .fileio import release_mapped  # noqa: E402
from .jit_replay import Replay  # noqa: E402
from .rope import rope_tables  # noqa: E402


def named_compiler(device: str) -> str:
  """The compiler a device name carries ("CPU:LLVM" → "LLVM"), "" for none (a plain name, or "CL:1" naming a unit)."""
  suffix = device.partition(":")[2].upper()
  return "" if suffix.isdigit() else suffix


def resolve_device(device: str | None) -> str:
  """An explicit device, else the environment's DEV, else CPU (tinygrad alone would pick any GPU it finds)."""
  from tinygrad import Device
  name = device or _USER_DEV or "CPU"
  if named_compiler(name) and name.upper() != (_USER_DEV or "").upper():
    # tinygrad reads the compiler from DEV once, at start-up: in a device name it would be ignored without a word
    raise ValueError(f"device {name!r} names a compiler, which tinygrad takes only from the environment: run with "
                     f"DEV={name} instead")
  try: return Device.canonicalize(name)
  except Exception as e: raise ValueError(f"unknown device {name!r} ({e})") from None


class Linear:
  """A bias-free linear layer y = x @ W.T with W of shape [out, in] (PyTorch/Meta layout)."""
  def __init__(self, in_features: int, out_features: int, dtype: DType, device: str):
    self.weight = Tensor.empty(out_features, in_features, dtype=dtype, device=device)

  @classmethod
  def wrap(cls, weight: Tensor) -> Linear:
    lin = cls.__new__(cls)
    lin.weight = weight
    return lin

  def __call__(self, x: Tensor) -> Tensor:
    w = self.weight
    if cpu_kernels.usable(x, w.dtype, w.device):   # decoding one token on the CPU: a kernel that streams the weights
      return cpu_kernels.matvec(x, w).reshape(*x.shape[:-1], w.shape[0]).cast(x.dtype)
    if cpu_kernels.matmul_usable(x, w.dtype, w.device): return cpu_kernels.matmul(x, w).cast(x.dtype)
    if gpu_kernels.usable(x, w) and (y := gpu_kernels.matvec(x, w)) is not None: return y
    return _grad_boundary(x @ w.T)


def _grad_boundary(y: Tensor) -> Tensor:
  """When training, materialize y and the gradient arriving at y: otherwise tinygrad 0.14 fuses producers into
  their consumers' reductions and recomputes them per element (a matmul inside each weight-gradient reduction,
  the softmax's exp inside probs @ values), which makes a training step ~100x slower."""
  return y.contiguous().contiguous_backward() if TRAINING else y


class RMSNorm:
  def __init__(self, dim: int, eps: float, dtype: DType, device: str):
    self.eps, self.weight = eps, Tensor.empty(dim, dtype=dtype, device=device)

  def __call__(self, x: Tensor) -> Tensor:
    xf = x.float()  # the mean of squares is taken in fp32 even for half weights, as Meta's reference does
    return (xf * (xf.square().mean(-1, keepdim=True) + self.eps).rsqrt()).cast(x.dtype) * self.weight


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  """Rotate interleaved pairs (2i, 2i+1) of x [B, T, H, D] by the angles of cos/sin [T, D/2]."""
  B, T, H, D = x.shape
  pairs = x.reshape(B, T, H, D // 2, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  c, s = cos.reshape(1, T, 1, D // 2).cast(x.dtype), sin.reshape(1, T, 1, D // 2).cast(x.dtype)
  return Tensor.stack(x0 * c - x1 * s, x0 * s + x1 * c, dim=-1).reshape(B, T, H, D)


class KVCache:
  """Keys and values of one layer, [batch, n_kv_heads, max_seq_len, head_dim], allocated once.

  It has no __dict__ (slots), so tinygrad's get_state_dict does not mistake the cache for parameters.
  """
  __slots__ = ("k", "v")

  def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: DType, device: str):
    self.k = Tensor.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype, device=device).contiguous().realize()
    self.v = Tensor.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype, device=device).contiguous().realize()


class Attention:
  def __init__(self, args: ModelArgs, dtype: DType, device: str):
    self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
    self.wq = Linear(args.dim, args.n_heads * args.head_dim, dtype, device)
    self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, dtype, device)
    self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, dtype, device)
    self.wo = Linear(args.n_heads * args.head_dim, args.dim, dtype, device)

  def __call__(self, x: Tensor, start_pos: int | UOp, cos: Tensor, sin: Tensor, cache: KVCache | None,
               key_bias: Tensor | None = None) -> Tensor:
    """With cache=None (training) the keys and values are this call's own, from position 0. key_bias [B, max_seq_len]
    is added to the scores of each key column (a large negative value hides the left padding of a batch)."""
    B, T, _ = x.shape
    H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
    xq, xk, xv = self.project_qkv(x)
    q = _grad_boundary(apply_rope(xq.reshape(B, T, H, D), cos, sin))
    k = _grad_boundary(apply_rope(xk.reshape(B, T, KV, D), cos, sin))
    v = xv.reshape(B, T, KV, D)
    if cache is None:
      keys, values = k.transpose(1, 2).unsqueeze(2), v.transpose(1, 2).unsqueeze(2)
    else:
      cache.k[:, :, start_pos:start_pos + T].assign(k.transpose(1, 2).cast(cache.k.dtype))
      cache.v[:, :, start_pos:start_pos + T].assign(v.transpose(1, 2).cast(cache.v.dtype))
      if cpu_kernels.attention_usable(q, cache.k.dtype):
        out = cpu_kernels.attention(q, cache.k, cache.v, start_pos, key_bias).cast(x.dtype)
        return self.wo(out.reshape(B, T, H * D))
      if gpu_kernels.attention_usable(q, cache.k, key_bias):
        return self.wo(gpu_kernels.attention(q, cache.k, cache.v, start_pos).reshape(B, T, H * D))
      keys = cache.k[:, :, 0:start_pos + T].cast(x.dtype).unsqueeze(2)     # [B, KV, 1, S, D]
      values = cache.v[:, :, 0:start_pos + T].cast(x.dtype).unsqueeze(2)
    # query head h reads kv head h // (H // KV): group the query heads under their kv head
    q = q.transpose(1, 2).reshape(B, KV, H // KV, T, D).contiguous()
    # broadcast-multiply-sum rather than matmul: matmul's transposes of the symbolic-length cache view leave integer
    # div/mod in the innermost loop of tinygrad's kernel
    scores = (q.unsqueeze(-2) * keys.unsqueeze(-3)).sum(-1).float() * (1.0 / math.sqrt(D))  # [B, KV, G, T, S]
    if T > 1:
      mask = Tensor.full((T, start_pos + T), float("-inf"), device=x.device).triu(start_pos + 1)
      scores = scores + mask
    if key_bias is not None: scores = scores + key_bias[:, 0:start_pos + T].reshape(B, 1, 1, 1, -1)
    probs = _grad_boundary(_grad_boundary(scores).softmax(-1))
    out = probs.cast(x.dtype) @ values                                   # [B, KV, G, T, D]
    return self.wo(out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D))

  def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    projections = (self.wq, self.wk, self.wv)
    w = [p.weight for p in projections if type(p) is Linear]   # plain float layers (not LoRA, not quantized)
    qkv, kind = None, _block_kind(projections)   # one kernel for the three, when the layers allow
    blocks = [(p.packed, p.scale) for p in projections] if kind else []
    if len(w) == 3 and cpu_kernels.usable(x, w[0].dtype, w[0].device):
      qkv = cpu_kernels.matvec_concat(x, w).cast(x.dtype).reshape(*x.shape[:-1], -1)
    elif len(w) == 3 and gpu_kernels.usable(x, w[0]): qkv = gpu_kernels.matvec_concat(x, w)
    elif kind and cpu_kernels.usable(x, blocks[0][0].dtype, x.device):
      qkv = cpu_kernels.matvec_blocks(kind, x, blocks).cast(x.dtype).reshape(*x.shape[:-1], -1)
    elif kind and gpu_kernels.usable(x, blocks[0][0]): qkv = gpu_kernels.matvec_blocks(kind, x, blocks)
    if qkv is None: return self.wq(x), self.wk(x), self.wv(x)
    q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
    return qkv[..., :q_out], qkv[..., q_out:q_out + kv_out], qkv[..., q_out + kv_out:]


def _block_kind(layers) -> str | None:
  """"q8_0" or "q4_0" when every layer is a quantized layer (quantize.QuantLinear) of that one kind, else None."""
  kinds = {getattr(layer, "block_kind", None) for layer in layers}
  return kinds.pop() if len(kinds) == 1 and None not in kinds else None


class FeedForward:
  def __init__(self, args: ModelArgs, dtype: DType, device: str):
    self.w1 = Linear(args.dim, args.hidden_dim, dtype, device)   # gate
    self.w2 = Linear(args.hidden_dim, args.dim, dtype, device)   # down
    self.w3 = Linear(args.dim, args.hidden_dim, dtype, device)   # up

  def __call__(self, x: Tensor) -> Tensor:
    if type(self.w1) is Linear and type(self.w3) is Linear:   # plain float layers: gate, up and SwiGLU in one kernel
      gate, up = self.w1.weight, self.w3.weight
      if cpu_kernels.usable(x, gate.dtype, x.device):
        return self.w2(cpu_kernels.matvec_swiglu(x, gate, up).reshape(*x.shape[:-1], gate.shape[0]).cast(x.dtype))
      if cpu_kernels.matmul_usable(x, gate.dtype, x.device): return self.w2(cpu_kernels.matmul_swiglu(x, gate, up).cast(x.dtype))
      if gpu_kernels.usable(x, gate) and (h := gpu_kernels.matvec_swiglu(x, gate, up)) is not None: return self.w2(h)
    elif kind := _block_kind((self.w1, self.w3)):   # quantized gate and up of one kind
      gate_up = ((self.w1.packed, self.w1.scale), (self.w3.packed, self.w3.scale))
      if cpu_kernels.usable(x, self.w1.packed.dtype, x.device):
        return self.w2(cpu_kernels.matvec_blocks_swiglu(kind, x, *gate_up).reshape(*x.shape[:-1], -1).cast(x.dtype))
      if cpu_kernels.matmul_usable(x, self.w1.packed.dtype, x.device):   # prefill: the two products, then SwiGLU
        return self.w2(cpu_kernels.silu_mul(self.w1(x), self.w3(x)).cast(x.dtype))
      if gpu_kernels.usable(x, self.w1.packed) and (h := gpu_kernels.matvec_blocks_swiglu(kind, x, *gate_up)) is not None:
        return self.w2(h)
    return self.w2(_silu(self.w1(x)) * self.w3(x))


def _silu(x: Tensor) -> Tensor:
  """x·sigmoid(x). When training, the sigmoid and the derivative are stored once instead of being recomputed
  (with their exp) inside each weight-gradient reduction: same values, same gradient."""
  if not TRAINING: return x.silu()
  sig = x.sigmoid().contiguous().detach()
  dsilu = (sig * (1 + x.detach() * (1 - sig))).contiguous().detach()
  return x.detach() * sig + (x - x.detach()) * dsilu


def _fused_weights(layers) -> tuple[str, list] | None:
  """How a fused decode kernel reads `layers` together: ("f32" or "f16", [weight, ...]) for plain float layers of
  one dtype, (block kind, [(packed, scale), ...]) for quantized layers of one kind; None for anything else (LoRA,
  bf16, a mix), which keeps the layer-by-layer path."""
  if all(type(layer) is Linear for layer in layers):
    dtype = layers[0].weight.dtype
    if dtype not in (dtypes.float32, dtypes.float16) or any(layer.weight.dtype != dtype for layer in layers): return None
    return ("f16" if dtype == dtypes.float16 else "f32"), [layer.weight for layer in layers]
  if kind := _block_kind(layers): return kind, [(layer.packed, layer.scale) for layer in layers]
  return None


def _project(kernels, weights: tuple[str, list], x: Tensor, norm: RMSNorm | None = None,
             residual: Tensor | None = None, float32: bool = False) -> Tensor | None:
  """residual + (the layers' outputs concatenated) for one row x, RMS-normalized first by `norm`, in one kernel of
  `kernels` (cpu_kernels, always float32, or gpu_kernels: x's dtype unless `float32`); None where the GPU kernels
  do not fit the shape."""
  kind, ws = weights
  extra = {"norm": None if norm is None else (norm.weight, norm.eps), "residual": residual}
  if float32 and kernels is gpu_kernels: extra["out_dtype"] = dtypes.float32
  if kind in ("f32", "f16"): return kernels.matvec_concat(x, ws, **extra)
  return kernels.matvec_blocks(kind, x, ws, **extra)


def _swiglu(kernels, weights: tuple[str, list], x: Tensor, norm: RMSNorm) -> Tensor | None:
  """silu(gate(norm(x))) * up(norm(x)) for one row x: one kernel."""
  kind, (gate, up) = weights
  if kind in ("f32", "f16"): return kernels.matvec_swiglu(x, gate, up, norm=(norm.weight, norm.eps))
  return kernels.matvec_blocks_swiglu(kind, x, gate, up, norm=(norm.weight, norm.eps))


class TransformerBlock:
  def __init__(self, args: ModelArgs, dtype: DType, device: str):
    self.attention = Attention(args, dtype, device)
    self.feed_forward = FeedForward(args, dtype, device)
    self.attention_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)
    self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)

  def __call__(self, x: Tensor, start_pos: int | UOp, cos: Tensor, sin: Tensor, cache: KVCache | None,
               key_bias: Tensor | None = None) -> Tensor:
    h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, cache, key_bias)
    return h + self.feed_forward(self.ffn_norm(h))

  def decode_weights(self) -> list[tuple[str, list]] | None:
    """The weights of q/k/v, wo, gate/up and w2 as `decode_fused` reads them; None when a layer does not allow it."""
    a, f = self.attention, self.feed_forward
    plan = [_fused_weights(layers) for layers in ((a.wq, a.wk, a.wv), (a.wo,), (f.w1, f.w3), (f.w2,))]
    norms_ok = all(n.weight.dtype in (dtypes.float32, dtypes.float16) for n in (self.attention_norm, self.ffn_norm))
    return plan if norms_ok and None not in plan else None

  def decode_fused(self, kernels, x: Tensor, plan: list[tuple[str, list]], cache: KVCache, attend) -> Tensor | None:
    """This layer for one token of one sequence in the fused kernels of `kernels` (cpu_kernels: five kernels, where
    tinygrad's graph of the same layer takes 14; gpu_kernels: six, attention being two): norm + q/k/v; RoPE +
    cache write + attention (`attend(qkv, cache, n_heads)`); wo + residual; norm + gate/up/SwiGLU; w2 + residual.
    x: [dim] (float32 on the CPU). None when a GPU kernel does not fit a shape."""
    qkv_w, wo_w, gate_up_w, w2_w = plan
    if (qkv := _project(kernels, qkv_w, x, norm=self.attention_norm)) is None: return None
    attended = attend(qkv, cache, self.attention.n_heads)
    if (h := _project(kernels, wo_w, attended, residual=x)) is None: return None
    if (gated := _swiglu(kernels, gate_up_w, h, self.ffn_norm)) is None: return None
    return _project(kernels, w2_w, gated, residual=h)


class Transformer:
  """Llama decoder. Parameters are created empty; fill them with `load_weights` or `init_random`."""

  def __init__(self, args: ModelArgs, max_seq_len: int | None = None, dtype: DType = dtypes.float32,
               device: str | None = None):
    self.args, self.dtype = args, dtype
    self.device = resolve_device(device)
    self.max_seq_len = max_seq_len or args.default_max_seq_len()
    self.tok_embeddings = Linear(args.dim, args.vocab_size, dtype, self.device)  # rows are embeddings: [vocab, dim]
    self.layers = [TransformerBlock(args, dtype, self.device) for _ in range(args.n_layers)]
    self.norm = RMSNorm(args.dim, args.norm_eps, dtype, self.device)
    self.output = None if args.tie_embeddings else Linear(args.dim, args.vocab_size, dtype, self.device)
    self.quantization: str | None = None   # set by quantize.quantize_model
    self._runtime = _Runtime(self)

  # ---- parameters -------------------------------------------------------------------------------
  def state_dict(self) -> dict[str, Tensor]:
    from tinygrad.nn.state import get_state_dict
    return {k: v for k, v in get_state_dict(self).items() if not k.startswith("_")}

  def load_weights(self, weights: dict[str, np.ndarray | Tensor], strict: bool = True,
                   expected: set[str] | None = None) -> None:
    """Copy arrays into the parameters (cast to the model dtype), checking names and shapes.
    `expected`: all names the checkpoint provides, when some are loaded another way (quantized blocks)."""
    params = self.state_dict()
    provided = expected if expected is not None else set(weights)
    missing = sorted(set(params) - provided)
    unexpected = sorted(provided - set(params))
    if strict and (missing or unexpected):
      raise ValueError(f"weights do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, param in params.items():
      if name not in weights: continue
      w = weights[name]
      if tuple(w.shape) != tuple(param.shape):
        raise ValueError(f"weight {name}: shape {tuple(w.shape)} does not match the model's {tuple(param.shape)}")
      # a writable copy (OpenCL refuses read-only memory maps), realized at once so only one copy lives at a time
      t = w if isinstance(w, Tensor) else Tensor(np.array(w, order="C"), device=self.device)
      param.replace(t.to(self.device).cast(self.dtype).contiguous().realize())
      if isinstance(w, np.ndarray): release_mapped(w)

  def init_random(self, seed: int = 0, std: float = 0.02) -> None:
    """Seeded random init as in llama2.c's model.py (normal(0, 0.02), residual projections scaled, norms 1)."""
    Tensor.manual_seed(seed)
    # realized one weight at a time: the float32 randn temporaries of all weights at once take several model sizes
    for name, p in self.state_dict().items():
      if name.endswith("norm.weight"): p.replace(Tensor.ones(*p.shape, dtype=self.dtype, device=self.device).contiguous())
      else:
        s = std / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
        p.replace((Tensor.randn(*p.shape, device=self.device) * s).cast(self.dtype).contiguous())
      p.realize()

  # ---- forward ----------------------------------------------------------------------------------
  def forward_hidden(self, x: Tensor, start_pos: int | UOp, use_cache: bool = True, key_bias: Tensor | None = None) -> Tensor:
    rt = self._runtime
    T = x.shape[1]
    cos, sin = rt.cos[start_pos:start_pos + T], rt.sin[start_pos:start_pos + T]
    caches = rt.caches(x.shape[0]) if use_cache else [None] * len(self.layers)
    # on the CPU, half weights are read as half but the activations stay float32, as in llama.cpp: the C backend has
    # no vector half arithmetic, so half activations would only add a conversion to every element of every op
    if x.dtype == dtypes.float16 and use_cache and cpu_kernels.available(self.device): x = x.float()
    for layer, cache in zip(self.layers, caches): x = layer(x, start_pos, cos, sin, cache, key_bias)
    return self.norm(x)

  def __call__(self, tokens: Tensor) -> Tensor:
    """Training forward: tokens [B, T] from position 0, no KV cache → float32 logits [B, T, vocab]."""
    if tokens.shape[1] > self.max_seq_len:
      raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than max_seq_len={self.max_seq_len}")
    return self.logits_from_hidden(self.forward_hidden(self.embed(tokens), 0, use_cache=False))

  def logits_from_hidden(self, h: Tensor) -> Tensor:
    head = self.output if self.output is not None else Linear.wrap(self.tok_embeddings.weight)
    return head(h).float()

  def embed(self, tokens: Tensor) -> Tensor:
    """Embedding rows for int tokens [B, T] by comparison with an arange (tinygrad has no gather kernel)."""
    w = self.tok_embeddings.weight
    onehot = Tensor.arange(w.shape[0]) == tokens.unsqueeze(-1)
    return onehot.unsqueeze(-1).where(w, 0).sum(-2, dtype=w.dtype)

  def prefill(self, tokens: Tensor, start_pos: int | UOp) -> Tensor:
    """Run tokens [B, T] at positions start_pos.. through the model, filling the cache; float32 logits of every row."""
    return self.logits_from_hidden(self.forward_hidden(self.embed(tokens), start_pos))

  def prefill_last(self, tokens: Tensor, start_pos: UOp, last: UOp) -> Tensor:
    """Prefill tokens [1, T] and return the logits [1, vocab] of row `last` (a bound Variable), so a chunk
    padded to a fixed length runs in one compiled graph."""
    h = self.forward_hidden(self.embed(tokens), start_pos)
    return self.logits_from_hidden(h.shrink(((0, 1), (last, last + 1), (0, h.shape[2])))).reshape(1, -1)

  def decode_step(self, token: UOp, start_pos: UOp) -> Tensor:
    """One token (a bound Variable, read from the embedding by a symbolic slice) → logits [1, vocab]."""
    x = self.tok_embeddings.weight.shrink(((token, token + 1), None)).reshape(1, 1, self.args.dim)
    if (logits := self._decode_step_fused(x, start_pos)) is not None: return logits
    return self.logits_from_hidden(self.forward_hidden(x, start_pos)).reshape(1, -1)

  def _decode_step_fused(self, x: Tensor, start_pos: UOp) -> Tensor | None:
    """decode_step in 5 kernels per layer + 3 on the clang CPU backend (an embedding copy, the position, norm +
    output head), 6 per layer + 3 on a GPU, where tinygrad's graph takes ~14 per layer; for small models (CPU) and
    big GPUs the per-kernel cost is a large part of a step. None when some layer needs the general path (LoRA,
    bf16, a mix of float and quantized layers, a GPU shape the kernels do not split)."""
    on_cpu = cpu_kernels.available(self.device)
    if not self._runtime.fused_decode or TRAINING or self.dtype not in (dtypes.float32, dtypes.float16) \
       or not (on_cpu or gpu_kernels.available(self.device)): return None
    head = self.output if self.output is not None else Linear.wrap(self.tok_embeddings.weight)
    plans = [layer.decode_weights() for layer in self.layers]
    head_weights = _fused_weights((head,))
    if head_weights is None or None in plans or self.norm.weight.dtype not in (dtypes.float32, dtypes.float16): return None
    rt = self._runtime
    position = Tensor.full((1,), start_pos, dtype=dtypes.int32, device=self.device).contiguous()
    if on_cpu:
      kernels = cpu_kernels
      attend = lambda qkv, cache, H: cpu_kernels.decode_attention(qkv, cache.k, cache.v, rt.cos, rt.sin, position, H)
    else:
      kernels = gpu_kernels
      attend = lambda qkv, cache, H: gpu_kernels.decode_attention(qkv, cache.k, cache.v, rt.cos, rt.sin, start_pos, H, position)
    # float32 activations on the CPU, as llama.cpp keeps them; the model's dtype on a GPU, where every work group of
    # a product reads all of x (and the norm weight) from cache: half the bytes of float32 beside its weight rows
    x = x.reshape(-1).float() if on_cpu else x.reshape(-1).contiguous()
    for layer, plan, cache in zip(self.layers, plans, rt.caches(1)):
      x = layer.decode_fused(kernels, x, plan, cache, attend)
      if x is None: return None
    logits = _project(kernels, head_weights, x, norm=self.norm, float32=True)
    return None if logits is None else logits.reshape(1, -1)

  def decode_batch(self, tokens: Tensor, start_pos: UOp, key_bias: Tensor) -> Tensor:
    """One token per row (int tokens [B, 1], all rows at the same cache column) → logits [B, vocab]; for beam
    search and batches of prompts (key_bias hides each row's left padding)."""
    return self.logits_from_hidden(self.forward_hidden(self.embed(tokens), start_pos, key_bias=key_bias))[:, 0, :]

  def reorder_cache(self, rows: Tensor) -> None:
    """Row b of every KV cache becomes old row rows[b] (beam search keeps the surviving beams' histories)."""
    caches = self._runtime.caches(rows.shape[0])
    for c in caches:
      c.k.assign(c.k[rows].contiguous())
      c.v.assign(c.v[rows].contiguous())
    Tensor.realize(*[t for c in caches for t in (c.k, c.v)])


class _Runtime:
  """Per-model state that is not a parameter: RoPE tables, KV caches and the compiled decode step."""
  __slots__ = ("model", "cos", "sin", "_caches", "decode_jit", "decode_replay", "fused_decode", "prefill_jits", "pos_var",
               "tok_var", "last_var", "batch_jit", "reorder_jit")

  def __init__(self, model: Transformer):
    a = model.args
    self.model = model
    cos, sin = rope_tables(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings, model.max_seq_len)
    self.cos, self.sin = Tensor(cos, device=model.device).realize(), Tensor(sin, device=model.device).realize()
    self._caches: list[KVCache] | None = None
    self.decode_jit = TinyJit(lambda tok, pos: model.decode_step(tok, pos).realize())
    self.decode_replay: Replay | None | bool = None   # False: the captured step is not one Replay handles
    self.fused_decode = True   # False once the fused GPU decode kernels failed on this device
    self.batch_jit = TinyJit(lambda toks, pos, bias: model.decode_batch(toks, pos, bias).realize())
    self.reorder_jit = TinyJit(model.reorder_cache)
    self.prefill_jits: dict[int, TinyJit] = {}
    self.pos_var = Variable("start_pos", 0, model.max_seq_len - 1)
    self.tok_var = Variable("token", 0, a.vocab_size - 1)
    self.last_var = Variable("last", 0, model.max_seq_len - 1)

  def prefill_jit(self, length: int) -> TinyJit:
    if length not in self.prefill_jits:
      self.prefill_jits[length] = TinyJit(lambda toks, pos, last: self.model.prefill_last(toks, pos, last).realize())
    return self.prefill_jits[length]

  def decode(self, token: int, pos: int) -> Tensor:
    """Logits [1, vocab] of `token` at position `pos`: the compiled decode step, replayed through `Replay` once
    captured where it can be (less host Python per token)."""
    if self.decode_replay is None and self.decode_jit.captured is not None:
      self.decode_replay = Replay.of(self.decode_jit, (self.tok_var, self.pos_var)) or False
    if self.decode_replay: return self.decode_replay(token, pos)
    args = (self.tok_var.bind(token), self.pos_var.bind(pos))
    device = self.model.device
    try: return self.decode_jit(*args)
    except Exception as e:   # the GPU kernels are ours, tinygrad's graph is not: a device that can't build them still decodes
      if self.decode_jit.captured is not None or not self.fused_decode or cpu_kernels.available(device): raise
      warnings.warn(f"the fused decode kernels failed on {device} ({type(e).__name__}: {str(e)[:300]}); decoding with "
                    "tinygrad's generic kernels instead (slower)", stacklevel=2)
      self.fused_decode = False
      self.decode_jit.reset()
      return self.decode_jit(*args)

  def reset_jits(self) -> None:
    self.decode_jit.reset()
    self.decode_replay = None
    self.batch_jit.reset()
    self.reorder_jit.reset()
    self.prefill_jits.clear()

  def caches(self, batch: int) -> list[KVCache]:
    if self._caches is None or self._caches[0].k.shape[0] != batch:
      a, m = self.model.args, self.model
      self._caches = [KVCache(batch, a.n_kv_heads, m.max_seq_len, a.head_dim, m.dtype, m.device) for _ in range(a.n_layers)]
      self.reset_jits()
    return self._caches
