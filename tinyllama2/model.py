"""The Llama decoder on tinygrad: RMSNorm, RoPE attention (MHA/MQA/GQA) over a KV cache, SwiGLU, output head.

Weights follow Meta's names and layout (q/k rows in the interleaved RoPE layout, as in llama2.c); loaders convert
other layouts into this one. The model knows nothing about files, tokenizers or kernels: its layers come from a
factory (plain `Linear` by default; quantize.py and lora.py swap them later), and the hot products go through
`ops`, which chooses the kernel. KV caches are passed in by their owner (`decoder.Decoder`).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.dtype import DType

from . import ops
from .config import ModelArgs
from .devices import resolve_device
from .fileio import release_mapped
from .layers import Linear
from .rope import rope_tables

LinearFactory = Callable[[int, int], object]   # (in_features, out_features) -> a layer mapping [..., in] to [..., out]


class RMSNorm:
  def __init__(self, dim: int, eps: float, dtype: DType, device: str):
    self.eps, self.weight = eps, Tensor.empty(dim, dtype=dtype, device=device)

  def __call__(self, x: Tensor) -> Tensor:
    xf = x.float()  # the mean of squares is taken in fp32 even for half weights, as Meta's reference does
    return (xf * (xf.square().mean(-1, keepdim=True) + self.eps).rsqrt()).cast(x.dtype) * self.weight


def _zeros(shape: tuple[int, ...], dtype: DType, device: Device, shard_axis: int | None) -> Tensor:
  if isinstance(device, str): return Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize()
  return Tensor.zeros(*shape, dtype=dtype, device=device[0]).contiguous().shard(device, axis=shard_axis).realize()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  """Rotate interleaved pairs (2i, 2i+1) of x [B, T, H, D] by the angles of cos/sin [T, D/2]."""
  B, T, H, D = x.shape
  pairs = x.reshape(B, T, H, D // 2, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  c, s = cos.reshape(1, T, 1, D // 2).cast(x.dtype), sin.reshape(1, T, 1, D // 2).cast(x.dtype)
  return Tensor.stack(x0 * c - x1 * s, x0 * s + x1 * c, dim=-1).reshape(B, T, H, D)


class RopeTables:
  """cos and sin of every position's RoPE angles, [max_seq_len, head_dim / 2] (slots: not parameters)."""
  __slots__ = ("cos", "sin")

  def __init__(self, args: ModelArgs, max_seq_len: int, device: str, prompt_len: int | None = None):
    cos, sin = rope_tables(args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings, max_seq_len,
                           prompt_len)
    self.cos, self.sin = Tensor(cos, device=device).realize(), Tensor(sin, device=device).realize()


Device = str | tuple[str, ...]   # one device, or the devices a sharded model spreads over (parallel.py)


class KVCache:
  """Keys and values of one layer, [rows, n_kv_heads, max_seq_len, head_dim], allocated once; a forward pass over a
  batch of B sequences uses rows first..first+B (`row`: one sequence's view of a cache of many). On several devices
  each holds a copy, or with split_heads a share of the key/value heads (tensor parallel). __slots__, so that
  tinygrad's get_state_dict does not mistake the cache for parameters."""
  __slots__ = ("k", "v", "first")

  def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: DType, device: Device,
               split_heads: bool = False):
    shape = (batch, n_kv_heads, max_seq_len, head_dim)
    self.k, self.v = (_zeros(shape, dtype, device, 1 if split_heads else None) for _ in range(2))
    self.first = 0

  def row(self, first: int | UOp) -> KVCache:
    """The same buffers, used from row `first` on (a bound Variable: one graph for every row)."""
    view = KVCache.__new__(KVCache)
    view.k, view.v, view.first = self.k, self.v, first
    return view


class Attention:
  def __init__(self, args: ModelArgs, linear: LinearFactory):
    self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
    self.wq = linear(args.dim, args.n_heads * args.head_dim)
    self.wk = linear(args.dim, args.n_kv_heads * args.head_dim)
    self.wv = linear(args.dim, args.n_kv_heads * args.head_dim)
    self.wo = linear(args.n_heads * args.head_dim, args.dim)

  def __call__(self, x: Tensor, start_pos: int | UOp, rope: RopeTables, cache: KVCache | None,
               key_bias: Tensor | None = None) -> Tensor:
    """With cache=None (training) the keys and values are this call's own, from position 0. key_bias [B, max_seq_len]
    is added to the scores of each key column (a large negative value hides the left padding of a batch)."""
    B, T, _ = x.shape
    H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
    cos, sin = rope.cos[start_pos:start_pos + T], rope.sin[start_pos:start_pos + T]
    xq, xk, xv = ops.qkv(x, self.wq, self.wk, self.wv)
    q = ops.grad_boundary(apply_rope(xq.reshape(B, T, H, D), cos, sin))
    k = ops.grad_boundary(apply_rope(xk.reshape(B, T, KV, D), cos, sin))
    v = xv.reshape(B, T, KV, D)
    if cache is None:
      keys, values = k.transpose(1, 2).unsqueeze(2), v.transpose(1, 2).unsqueeze(2)
    else:
      rows = slice(cache.first, cache.first + B)
      cache.k[rows, :, start_pos:start_pos + T].assign(k.transpose(1, 2).cast(cache.k.dtype))
      cache.v[rows, :, start_pos:start_pos + T].assign(v.transpose(1, 2).cast(cache.v.dtype))
      if (out := ops.attention(q, cache.k, cache.v, start_pos, key_bias, cache.first)) is not None:
        return self.wo(out.reshape(B, T, H * D))
      keys = cache.k[rows, :, 0:start_pos + T].cast(x.dtype).unsqueeze(2)     # [B, KV, 1, S, D]
      values = cache.v[rows, :, 0:start_pos + T].cast(x.dtype).unsqueeze(2)
    # query head h reads kv head h // (H // KV): group the query heads under their kv head
    q = q.transpose(1, 2).reshape(B, KV, H // KV, T, D).contiguous()
    # broadcast-multiply-sum rather than matmul: matmul's transposes of the symbolic-length cache view leave integer
    # div/mod in the innermost loop of tinygrad's kernel
    scores = (q.unsqueeze(-2) * keys.unsqueeze(-3)).sum(-1).float() * (1.0 / math.sqrt(D))  # [B, KV, G, T, S]
    if T > 1:
      mask = Tensor.full((T, start_pos + T), float("-inf"), device=x.device).triu(start_pos + 1)
      scores = scores + mask
    if key_bias is not None: scores = scores + key_bias[:, 0:start_pos + T].reshape(B, 1, 1, 1, -1)
    probs = ops.grad_boundary(ops.grad_boundary(scores).softmax(-1))
    out = probs.cast(x.dtype) @ values                                   # [B, KV, G, T, D]
    return self.wo(out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D))


class FeedForward:
  def __init__(self, args: ModelArgs, linear: LinearFactory):
    self.w1 = linear(args.dim, args.hidden_dim)   # gate
    self.w2 = linear(args.hidden_dim, args.dim)   # down
    self.w3 = linear(args.dim, args.hidden_dim)   # up

  def __call__(self, x: Tensor) -> Tensor: return self.w2(ops.gate_up_swiglu(x, self.w1, self.w3))


class TransformerBlock:
  def __init__(self, args: ModelArgs, linear: LinearFactory, dtype: DType, device: str):
    self.attention = Attention(args, linear)
    self.feed_forward = FeedForward(args, linear)
    self.attention_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)
    self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)

  def __call__(self, x: Tensor, start_pos: int | UOp, rope: RopeTables, cache: KVCache | None,
               key_bias: Tensor | None = None) -> Tensor:
    h = x + self.attention(self.attention_norm(x), start_pos, rope, cache, key_bias)
    return h + self.feed_forward(self.ffn_norm(h))


class Transformer:
  """Llama decoder. Parameters are created empty; fill them with `load_weights` or `init_random`.

  `linear(in_features, out_features)` builds every projection (default: an empty float `Linear` of the model's
  dtype). After replacing layers or parameter buffers outside `load_weights`/`init_random` (quantizing, LoRA,
  merging), call `weights_changed()` so compiled steps captured before are recaptured."""

  def __init__(self, args: ModelArgs, max_seq_len: int | None = None, dtype: DType = dtypes.float32,
               device: str | None = None, linear: LinearFactory | None = None):
    self.args, self.dtype = args, dtype
    self.device: Device = resolve_device(device)   # a tuple once sharded over several (parallel.py)
    self.max_seq_len = max_seq_len or args.default_max_seq_len()
    linear = linear or (lambda n_in, n_out: Linear.empty(n_in, n_out, dtype, self.device))
    self.tok_embeddings = Linear.empty(args.dim, args.vocab_size, dtype, self.device)  # rows are embeddings: [vocab, dim]
    self.layers = [TransformerBlock(args, linear, dtype, self.device) for _ in range(args.n_layers)]
    self.norm = RMSNorm(args.dim, args.norm_eps, dtype, self.device)
    self.output = None if args.tie_embeddings else linear(args.dim, args.vocab_size)
    self.rope = RopeTables(args, self.max_seq_len, self.device)
    self.quantization: str | None = None   # set by quantize.quantize_model
    self.kv_split = False                  # KV caches split by heads over the devices (parallel.shard_model)
    self.version = 0                       # bumped by weights_changed()

  @property
  def head(self):
    """The output projection: its own layer, or the embedding table when the two are tied."""
    return self.output if self.output is not None else self.tok_embeddings

  def weights_changed(self) -> None:
    """Layers were replaced or weights changed outside load_weights: compiled steps captured before are stale."""
    self.version += 1

  def new_caches(self, batch: int) -> list[KVCache]:
    a = self.args
    return [KVCache(batch, a.n_kv_heads, self.max_seq_len, a.head_dim, self.dtype, self.device, self.kv_split)
            for _ in range(a.n_layers)]

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
    self.weights_changed()

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
    self.weights_changed()

  # ---- forward ----------------------------------------------------------------------------------
  def prompt_rope(self, n: int) -> RopeTables | None:
    """With dynamic NTK scaling a prompt longer than the trained context, prefilled in one call, is rotated with
    the frequencies of its full length (as Hugging Face's forward does); None where the model's own tables apply."""
    s = self.args.rope_scaling
    if s is None or s.type != "dynamic" or n <= self.args.max_position_embeddings: return None
    return RopeTables(self.args, self.max_seq_len, self.device, prompt_len=n)

  def forward_hidden(self, x: Tensor, start_pos: int | UOp, caches: list[KVCache] | None,
                     key_bias: Tensor | None = None, rope: RopeTables | None = None) -> Tensor:
    """Hidden states after the final norm; with caches, keys and values are written at start_pos.. and attention
    reads the cache (decoding, prefill), without them (training) only this call's tokens from position 0."""
    if caches is not None: x = ops.inference_activations(x)
    for layer, cache in zip(self.layers, caches or [None] * len(self.layers)):
      x = layer(x, start_pos, rope or self.rope, cache, key_bias)
    return self.norm(x)

  def __call__(self, tokens: Tensor) -> Tensor:
    """Training forward: tokens [B, T] from position 0, no KV cache → float32 logits [B, T, vocab]."""
    if tokens.shape[1] > self.max_seq_len:
      raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than max_seq_len={self.max_seq_len}")
    return self.logits_from_hidden(self.forward_hidden(self.embed(tokens), 0, None))

  def logits_from_hidden(self, h: Tensor) -> Tensor: return self.head(h).float()

  def embed(self, tokens: Tensor) -> Tensor:
    """Embedding rows for int tokens [B, T] by comparison with an arange (tinygrad has no gather kernel)."""
    w = self.tok_embeddings.weight
    onehot = Tensor.arange(w.shape[0]) == tokens.unsqueeze(-1)
    return onehot.unsqueeze(-1).where(w, 0).sum(-2, dtype=w.dtype)

  def prefill(self, tokens: Tensor, start_pos: int | UOp, caches: list[KVCache], rope: RopeTables | None = None) -> Tensor:
    """Run tokens [B, T] at positions start_pos.. through the model, filling the caches; float32 logits of every row."""
    return self.logits_from_hidden(self.forward_hidden(self.embed(tokens), start_pos, caches, rope=rope))

  def prefill_last(self, tokens: Tensor, start_pos: UOp, last: UOp, caches: list[KVCache]) -> Tensor:
    """Prefill tokens [1, T] and return the logits [1, vocab] of row `last` (a bound Variable), so a chunk
    padded to a fixed length runs in one compiled graph."""
    h = self.forward_hidden(self.embed(tokens), start_pos, caches)
    return self.logits_from_hidden(h.shrink(((0, 1), (last, last + 1), (0, h.shape[2])))).reshape(1, -1)

  def decode_step(self, token: UOp, start_pos: UOp, caches: list[KVCache]) -> Tensor:
    """One token (a bound Variable, read from the embedding by a symbolic slice) → logits [1, vocab]."""
    x = self.tok_embeddings.weight.shrink(((token, token + 1), None)).reshape(1, 1, self.args.dim)
    return self.logits_from_hidden(self.forward_hidden(x, start_pos, caches)).reshape(1, -1)

  def decode_batch(self, tokens: Tensor, start_pos: UOp, key_bias: Tensor, caches: list[KVCache]) -> Tensor:
    """One token per row (int tokens [B, 1], all rows at the same cache column) → logits [B, vocab]; for beam
    search and batches of prompts (key_bias hides each row's left padding)."""
    return self.logits_from_hidden(self.forward_hidden(self.embed(tokens), start_pos, caches, key_bias))[:, 0, :]
