"""llama2.c `.bin` checkpoints: the legacy (version 0) header and the "ak42" version 1 format, fp32."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..config import ModelArgs

MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256


def _args_from_header(path: Path, dims: tuple[int, ...], shared: bool) -> ModelArgs:
  dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = dims
  if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or max(dims) > 1 << 24:
    raise ValueError(f"{path}: not a llama2.c checkpoint (implausible header {dims})")
  try:
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                     hidden_dim=hidden, max_position_embeddings=seq_len, tie_embeddings=shared, norm_eps=1e-5)
  except ValueError as e:
    raise ValueError(f"{path}: not a valid llama2.c checkpoint ({e})") from None


def _layered(a: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
  kv = a.n_kv_heads * a.head_dim
  return [("attention.wq.weight", (a.dim, a.dim)), ("attention.wk.weight", (kv, a.dim)),
          ("attention.wv.weight", (kv, a.dim)), ("attention.wo.weight", (a.dim, a.dim)),
          ("feed_forward.w1.weight", (a.hidden_dim, a.dim)), ("feed_forward.w2.weight", (a.dim, a.hidden_dim)),
          ("feed_forward.w3.weight", (a.hidden_dim, a.dim))]


class _Reader:
  """Slices consecutive fp32 arrays out of a memory map, per layer where asked."""
  def __init__(self, path: Path, offset: int):
    self.mm, self.pos = np.memmap(path, dtype=np.float32, mode="r", offset=offset), 0

  def take(self, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    out = self.mm[self.pos:self.pos + n].reshape(shape)
    self.pos += n
    return out

  def per_layer(self, out: dict, n_layers: int, name: str, shape: tuple[int, ...]) -> None:
    stacked = self.take((n_layers, *shape))
    for i in range(n_layers): out[f"layers.{i}.{name}"] = stacked[i]


def _expected_floats(a: ModelArgs, legacy: bool, shared: bool) -> int:
  per_layer = 2 * a.dim + sum(int(np.prod(s)) for _, s in _layered(a))
  n = a.vocab_size * a.dim + a.n_layers * per_layer + a.dim
  if legacy: n += a.max_position_embeddings * a.head_dim  # freq_cis real + imag tables
  if not shared: n += a.vocab_size * a.dim
  return n


def _check_size(path: Path, header: int, a: ModelArgs, legacy: bool, shared: bool) -> None:
  size, want = os.path.getsize(path), header + 4 * _expected_floats(a, legacy, shared)
  if size < want: raise ValueError(f"{path}: truncated llama2.c checkpoint ({size} bytes, the header implies {want})")
  if size > want: raise ValueError(f"{path}: {size - want} unexpected bytes after the weights (corrupt llama2.c checkpoint?)")


def load(path: str | Path) -> tuple[ModelArgs, dict[str, np.ndarray]]:
  path = Path(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f: head = f.read(V1_HEADER_BYTES)
  if len(head) < 28: raise ValueError(f"{path}: too short to be a llama2.c checkpoint ({size} bytes)")
  magic, version = struct.unpack("<Ii", head[:8])
  if magic == MAGIC:
    if version != 1:
      raise ValueError(f"{path}: llama2.c export version {version} is not supported (only the fp32 formats: legacy and version 1)")
    if len(head) < V1_HEADER_BYTES: raise ValueError(f"{path}: truncated llama2.c v1 header")
    dims = struct.unpack("<7i", head[8:36])
    shared = bool(head[36])
    args = _args_from_header(path, dims, shared)
    _check_size(path, V1_HEADER_BYTES, args, legacy=False, shared=shared)
    return args, _read_v1(path, args, shared)
  dims = struct.unpack("<7i", head[:28])
  shared = dims[5] > 0
  args = _args_from_header(path, (*dims[:5], abs(dims[5]), dims[6]), shared)
  _check_size(path, 28, args, legacy=True, shared=shared)
  return args, _read_legacy(path, args, shared)


def _read_legacy(path: Path, a: ModelArgs, shared: bool) -> dict[str, np.ndarray]:
  r, w = _Reader(path, 28), {}
  w["tok_embeddings.weight"] = r.take((a.vocab_size, a.dim))
  r.per_layer(w, a.n_layers, "attention_norm.weight", (a.dim,))
  layered = _layered(a)
  for name, shape in layered[:4]: r.per_layer(w, a.n_layers, name, shape)
  r.per_layer(w, a.n_layers, "ffn_norm.weight", (a.dim,))
  for name, shape in layered[4:]: r.per_layer(w, a.n_layers, name, shape)
  w["norm.weight"] = r.take((a.dim,))
  r.take((a.max_position_embeddings * a.head_dim,))  # precomputed RoPE tables: recomputed by rope.py
  if not shared: w["output.weight"] = r.take((a.vocab_size, a.dim))
  return w


def _read_v1(path: Path, a: ModelArgs, shared: bool) -> dict[str, np.ndarray]:
  r, w = _Reader(path, V1_HEADER_BYTES), {}
  r.per_layer(w, a.n_layers, "attention_norm.weight", (a.dim,))
  r.per_layer(w, a.n_layers, "ffn_norm.weight", (a.dim,))
  w["norm.weight"] = r.take((a.dim,))
  w["tok_embeddings.weight"] = r.take((a.vocab_size, a.dim))
  for name, shape in _layered(a): r.per_layer(w, a.n_layers, name, shape)
  if not shared: w["output.weight"] = r.take((a.vocab_size, a.dim))
  return w


def save_v1(path: str | Path, args: ModelArgs, weights: dict[str, np.ndarray]) -> None:
  """Write the llama2.c version 1 format (fp32), e.g. to run a model with run.c."""
  from ..fileio import atomic_write
  shared = "output.weight" not in weights
  header = struct.pack("<Ii7iB", MAGIC, 1, args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                       args.vocab_size, args.max_position_embeddings, int(shared))
  order = [f"layers.{i}.attention_norm.weight" for i in range(args.n_layers)]
  order += [f"layers.{i}.ffn_norm.weight" for i in range(args.n_layers)]
  order += ["norm.weight", "tok_embeddings.weight"]
  for name, _ in _layered(args): order += [f"layers.{i}.{name}" for i in range(args.n_layers)]
  if not shared: order.append("output.weight")
  with atomic_write(path) as f:
    f.write(header + b"\0" * (V1_HEADER_BYTES - len(header)))
    for name in order: f.write(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
