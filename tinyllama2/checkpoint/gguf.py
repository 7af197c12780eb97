"""GGUF (v2/v3) reader: metadata into ModelArgs, tensors (F32, F16, BF16, Q8_0, Q4_0), and the vocabulary as a
SentencePiece model. Every count, length and offset is checked against the file before it is used.

GGUF stores llama q/k rows in Meta's interleaved layout (llama.cpp's converter undoes HF's permutation), which
is our layout, so no permutation is applied.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelArgs
from ..spm_proto import Piece, bytes_field, int_field
from .safetensors import bf16_to_f32

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
               7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 14, 30
# type -> (elements per block, bytes per block)
BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (32, 34), Q4_0: (32, 18), Q4_1: (32, 20), Q4_K: (256, 144),
          Q6_K: (256, 210)}
TYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0", Q4_1: "Q4_1", Q4_K: "Q4_K", Q6_K: "Q6_K"}
_OURS = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight"}
_LAYER = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
          "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
          "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


@dataclass
class TensorInfo:
  name: str
  shape: tuple[int, ...]   # numpy order: [rows, cols] for a weight [out, in]
  type: int
  offset: int              # from the start of the data section
  nbytes: int


@dataclass
class GGUFFile:
  path: Path
  metadata: dict
  tensors: dict[str, TensorInfo]
  data_start: int


class _Reader:
  def __init__(self, path: Path):
    self.path, self.size = path, os.path.getsize(path)
    self.mm = np.memmap(path, dtype=np.uint8, mode="r") if self.size else np.zeros(0, np.uint8)
    self.pos = 0

  def need(self, n: int, what: str) -> None:
    if n < 0 or self.pos + n > self.size:
      raise ValueError(f"{self.path}: truncated or corrupt GGUF file ({what} at byte {self.pos} runs past the end)")

  def raw(self, n: int, what: str) -> bytes:
    self.need(n, what)
    out = self.mm[self.pos:self.pos + n].tobytes()
    self.pos += n
    return out

  def scalar(self, fmt: str, what: str):
    return struct.unpack(fmt, self.raw(struct.calcsize(fmt), what))[0]

  def string(self, what: str) -> str:
    n = self.scalar("<Q", what)
    try: return self.raw(n, what).decode("utf-8")
    except UnicodeDecodeError: raise ValueError(f"{self.path}: corrupt GGUF file ({what} is not UTF-8)") from None

  def value(self, vtype: int, what: str):
    # an f32 comes back as the shortest decimal that reads back as the same f32 (1e-05, not 9.99999975e-06)
    if vtype == 6: return float(str(np.float32(self.scalar("<f", what))))
    if vtype in _SCALARS: return self.scalar(_SCALARS[vtype], what)
    if vtype == 8: return self.string(what)
    if vtype == 9:
      etype, n = self.scalar("<I", what), self.scalar("<Q", what)
      if etype in _NP_SCALARS:
        size = np.dtype(_NP_SCALARS[etype]).itemsize
        self.need(n * size, what)
        arr = self.mm[self.pos:self.pos + n * size].view(_NP_SCALARS[etype]).copy()
        self.pos += n * size
        return arr
      if etype == 8:
        self.need(n * 8, what)   # every string needs at least its 8-byte length
        return [self.string(what) for _ in range(n)]
      raise ValueError(f"{self.path}: unsupported GGUF array element type {etype} in {what}")
    raise ValueError(f"{self.path}: unknown GGUF value type {vtype} in {what}")


def read(path: str | Path) -> GGUFFile:
  path = Path(path)
  r = _Reader(path)
  if r.size < 4 or r.raw(4, "magic") != MAGIC: raise ValueError(f"{path}: not a GGUF file (bad magic)")
  version = r.scalar("<I", "version")
  if version not in (2, 3): raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
  n_tensors, n_kv = r.scalar("<Q", "tensor count"), r.scalar("<Q", "metadata count")
  if n_tensors > r.size // 24 or n_kv > r.size // 12:
    raise ValueError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata entries in {r.size} bytes)")
  metadata = {}
  for _ in range(n_kv):
    key = r.string("metadata key")
    metadata[key] = r.value(r.scalar("<I", f"type of {key}"), key)
  infos = {}
  for _ in range(n_tensors):
    name = r.string("tensor name")
    n_dims = r.scalar("<I", f"dims of {name}")
    if not 1 <= n_dims <= 4: raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions")
    ne = [r.scalar("<Q", f"shape of {name}") for _ in range(n_dims)]
    ttype, offset = r.scalar("<I", f"type of {name}"), r.scalar("<Q", f"offset of {name}")
    if ttype not in BLOCKS: raise ValueError(f"{path}: tensor {name!r} has unsupported GGUF type {ttype}")
    per_block, block_bytes = BLOCKS[ttype]
    count = int(np.prod(ne, dtype=np.float64))
    if ne[0] % per_block or count > r.size * 2: raise ValueError(f"{path}: tensor {name!r} has a corrupt shape {ne}")
    infos[name] = TensorInfo(name, tuple(int(d) for d in reversed(ne)), ttype, offset, count // per_block * block_bytes)
  align = int(metadata.get("general.alignment", 32))
  if align <= 0 or align & (align - 1): raise ValueError(f"{path}: corrupt general.alignment {align}")
  data_start = (r.pos + align - 1) // align * align
  for t in infos.values():
    if data_start + t.offset + t.nbytes > r.size:
      raise ValueError(f"{path}: truncated GGUF file (tensor {t.name!r} ends past the end of the file)")
  return GGUFFile(path, metadata, infos, data_start)


def _raw(f: GGUFFile, t: TensorInfo) -> np.ndarray:
  start = f.data_start + t.offset
  return np.memmap(f.path, dtype=np.uint8, mode="r", offset=start, shape=(t.nbytes,))


def q8_0_blocks(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(int8 values [rows, blocks, 32], fp16 scales [rows, blocks]) from Q8_0 bytes."""
  blocks = raw.view(np.dtype([("d", "<f2"), ("qs", "i1", 32)])).reshape(shape[0], -1)
  return np.ascontiguousarray(blocks["qs"]), np.ascontiguousarray(blocks["d"])


def q4_0_blocks(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(packed nibbles [rows, blocks, 16], fp16 scales [rows, blocks]) from Q4_0 bytes."""
  blocks = raw.view(np.dtype([("d", "<f2"), ("qs", "u1", 16)])).reshape(shape[0], -1)
  return np.ascontiguousarray(blocks["qs"]), np.ascontiguousarray(blocks["d"])


def _q4_1(raw: np.ndarray) -> np.ndarray:
  """Blocks of 32: x = d * q + m, q in the nibbles (low: elements 0-15, high: 16-31)."""
  b = raw.view(np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]))
  q = np.concatenate([b["qs"] & 15, b["qs"] >> 4], axis=-1).astype(np.float32)
  return q * b["d"].astype(np.float32)[:, None] + b["m"].astype(np.float32)[:, None]


def _q4_k(raw: np.ndarray) -> np.ndarray:
  """Super-blocks of 256 = 8 sub-blocks of 32 with 6-bit scales and mins: x = d*sc*q - dmin*m."""
  b = raw.view(np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)]))
  s = b["scales"].astype(np.int32)
  sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
  mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
  qs = b["qs"].reshape(-1, 4, 32)
  q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)   # sub-blocks 2i (low), 2i+1 (high)
  d, dmin = b["d"].astype(np.float32)[:, None, None], b["dmin"].astype(np.float32)[:, None, None]
  return (d * sc[:, :, None] * q - dmin * mn[:, :, None]).reshape(-1, 256)


def _q6_k(raw: np.ndarray) -> np.ndarray:
  """Super-blocks of 256: 6-bit q = 4 low bits (ql) + 2 high bits (qh) - 32, int8 scale per 16, fp16 d."""
  b = raw.view(np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")]))
  out = np.empty((len(b), 256), np.float32)
  d = b["d"].astype(np.float32)[:, None]
  for half in range(2):
    ql, qh = b["ql"][:, 64 * half:64 * half + 64].astype(np.int32), b["qh"][:, 32 * half:32 * half + 32].astype(np.int32)
    sc = b["scales"][:, 8 * half:8 * half + 8].astype(np.float32)
    quads = [(ql[:, :32] & 15) | ((qh & 3) << 4), (ql[:, 32:] & 15) | (((qh >> 2) & 3) << 4),
             (ql[:, :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[:, 32:] >> 4) | (((qh >> 6) & 3) << 4)]
    for k, q in enumerate(quads):   # values 32k..32k+31 of this half; scale index (l // 16) + 2k
      scale = np.repeat(sc[:, 2 * k:2 * k + 2], 16, axis=1)
      out[:, 128 * half + 32 * k:128 * half + 32 * k + 32] = d * scale * (q - 32)
  return out


def dequantize(f: GGUFFile, t: TensorInfo) -> np.ndarray:
  raw = _raw(f, t)
  if t.type == F32: return raw.view(np.float32).reshape(t.shape)
  if t.type == F16: return raw.view(np.float16).reshape(t.shape)
  if t.type == BF16: return bf16_to_f32(raw.view(np.uint16)).reshape(t.shape)
  if t.type in (Q8_0, Q4_0): return quantized_weight(f, t).dequantize()
  if t.type in (Q4_1, Q4_K, Q6_K): return {Q4_1: _q4_1, Q4_K: _q4_k, Q6_K: _q6_k}[t.type](raw).reshape(t.shape)
  raise ValueError(f"{f.path}: tensor {t.name!r} has GGUF type {TYPE_NAMES.get(t.type, t.type)}, which tinyllama2 "
                   "cannot read")


@dataclass
class QuantizedWeight:
  """A Q8_0 ("int8") or Q4_0 ("int4") matrix kept in its blocks: values/nibbles and fp16 scales."""
  mode: str
  packed: np.ndarray
  scale: np.ndarray
  shape: tuple[int, ...]

  def dequantize(self) -> np.ndarray:
    if self.mode == "int8": vals = self.packed.astype(np.float32)
    else: vals = np.concatenate([self.packed & 15, self.packed >> 4], axis=-1).astype(np.float32) - 8
    return (vals * self.scale.astype(np.float32)[..., None]).reshape(self.shape)


def quantized_weight(f: GGUFFile, t: TensorInfo) -> QuantizedWeight:
  """A Q8_0 or Q4_0 tensor as its blocks, without dequantizing."""
  packed, scale = (q8_0_blocks if t.type == Q8_0 else q4_0_blocks)(_raw(f, t), t.shape)
  return QuantizedWeight("int8" if t.type == Q8_0 else "int4", packed, scale, t.shape)


def our_name(gguf_name: str) -> str | None:
  if gguf_name in _OURS: return _OURS[gguf_name]
  parts = gguf_name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER and parts[3] == "weight":
    return f"layers.{parts[1]}.{_LAYER[parts[2]]}.weight"
  return None


def model_args(f: GGUFFile) -> ModelArgs:
  m = f.metadata
  arch = m.get("general.architecture")
  if arch != "llama": raise ValueError(f"{f.path}: GGUF architecture {arch!r} is not supported (llama)")
  try:
    scaling = None
    if m.get("llama.rope.scaling.type", "none") not in ("none", None):
      scaling = {"type": m["llama.rope.scaling.type"], "factor": float(m["llama.rope.scaling.factor"])}
      if "llama.rope.scaling.original_context_length" in m:
        scaling["original_max_position_embeddings"] = int(m["llama.rope.scaling.original_context_length"])
    n_heads = int(m["llama.attention.head_count"])
    return ModelArgs(dim=int(m["llama.embedding_length"]), n_layers=int(m["llama.block_count"]), n_heads=n_heads,
                     n_kv_heads=int(m.get("llama.attention.head_count_kv", n_heads)),
                     vocab_size=int(m.get("llama.vocab_size", len(m.get("tokenizer.ggml.tokens", [])))),
                     hidden_dim=int(m["llama.feed_forward_length"]),
                     norm_eps=float(m.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                     rope_theta=float(m.get("llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
                     max_position_embeddings=int(m.get("llama.context_length", 2048)),
                     tie_embeddings="output.weight" not in f.tensors,
                     bos_id=int(m.get("tokenizer.ggml.bos_token_id", 1)), eos_id=int(m.get("tokenizer.ggml.eos_token_id", 2)))
  except KeyError as e:
    raise ValueError(f"{f.path}: GGUF metadata lacks {e.args[0]!r}") from None


def load(path: str | Path | GGUFFile) -> tuple[ModelArgs, dict[str, np.ndarray | QuantizedWeight]]:
  """Weights by our names; Q8_0/Q4_0 matrices come as QuantizedWeight (the embedding table as float)."""
  f = path if isinstance(path, GGUFFile) else read(path)
  path = f.path
  if not f.tensors: raise ValueError(f"{path}: this GGUF file holds no tensors (a vocabulary-only file?)")
  args = model_args(f)
  weights = {}
  for name, t in f.tensors.items():
    ours = our_name(name)
    if ours is None:
      if name == "rope_freqs.weight": continue
      raise ValueError(f"{path}: unexpected tensor {name!r} for a llama model")
    keep_blocks = t.type in (Q8_0, Q4_0) and ours != "tok_embeddings.weight"
    weights[ours] = quantized_weight(f, t) if keep_blocks else dequantize(f, t)
  return args, weights


# ---- the vocabulary as a SentencePiece model -------------------------------------------------------------

def sentencepiece_proto(f: GGUFFile) -> bytes:
  """A serialized sentencepiece ModelProto (BPE, byte fallback, identity normalization, dummy prefix) holding
  the GGUF vocabulary, so sentencepiece itself tokenizes exactly as the Llama tokenizer.model would."""
  m = f.metadata
  if m.get("tokenizer.ggml.model") != "llama":
    raise ValueError(f"{f.path}: GGUF tokenizer {m.get('tokenizer.ggml.model')!r} is not supported (llama / SentencePiece)")
  tokens, scores = m["tokenizer.ggml.tokens"], m.get("tokenizer.ggml.scores")
  types = m.get("tokenizer.ggml.token_type")
  pieces = []
  for i, tok in enumerate(tokens):
    score = float(scores[i]) if scores is not None else 0.0
    ttype = int(types[i]) if types is not None else 1
    pieces.append(Piece(tok, score, ttype).encode())
  trainer = (int_field(3, 2) + int_field(4, len(tokens)) + int_field(35, 1) +
             int_field(40, int(m.get("tokenizer.ggml.unknown_token_id", 0))) +
             int_field(41, int(m.get("tokenizer.ggml.bos_token_id", 1))) +
             int_field(42, int(m.get("tokenizer.ggml.eos_token_id", 2))) +
             int_field(43, int(m.get("tokenizer.ggml.padding_token_id", -1))))
  add_prefix = bool(m.get("tokenizer.ggml.add_space_prefix", True))
  normalizer = bytes_field(1, b"identity") + int_field(3, int(add_prefix)) + int_field(4, 0)
  return b"".join(pieces) + bytes_field(2, trainer) + bytes_field(3, normalizer)


# ---- writing -----------------------------------------------------------------------------------------------

_THEIRS = {v: k for k, v in _OURS.items()}
_THEIRS_LAYER = {v: k for k, v in _LAYER.items()}
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}


def gguf_name(ours: str) -> str:
  if ours in _THEIRS: return _THEIRS[ours]
  _, i, rest = ours.split(".", 2)
  return f"blk.{i}.{_THEIRS_LAYER[rest.removesuffix('.weight')]}.weight"


def _w_string(s: str) -> bytes:
  b = s.encode("utf-8")
  return struct.pack("<Q", len(b)) + b


def _w_kv(key: str, value) -> bytes:
  out = _w_string(key)
  if isinstance(value, bool): return out + struct.pack("<I?", 7, value)
  if isinstance(value, str): return out + struct.pack("<I", 8) + _w_string(value)
  if isinstance(value, float): return out + struct.pack("<If", 6, value)
  if isinstance(value, int): return out + struct.pack("<II", 4, value)
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return out + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_w_string(v) for v in value)
  arr = np.asarray(value)
  etype = {np.dtype(np.float32): 6, np.dtype(np.int32): 5}[arr.dtype]
  return out + struct.pack("<IIQ", 9, etype, len(arr)) + arr.tobytes()


def q8_0_bytes(w: np.ndarray) -> bytes:
  """llama.cpp's reference Q8_0: per 32 values d = max|x| / 127 (stored fp16), q = round(x / d)."""
  b = w.reshape(w.shape[0], -1, 32).astype(np.float32)
  d = np.abs(b).max(-1) / np.float32(127)
  q = np.rint(b * np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0)[..., None]).astype(np.int8)
  rec = np.zeros(d.shape, np.dtype([("d", "<f2"), ("qs", "i1", 32)]))
  rec["d"], rec["qs"] = d.astype(np.float16), q
  return rec.tobytes()


def q4_0_bytes(w: np.ndarray) -> bytes:
  """llama.cpp's reference Q4_0: per 32 values d = (the value of largest magnitude) / -8 (stored fp16),
  q = min(15, trunc(x / d + 8.5)); byte j holds q[j] in its low nibble and q[j + 16] in its high nibble."""
  b = w.reshape(w.shape[0], -1, 32).astype(np.float32)
  hi, lo = b.max(-1), b.min(-1)
  d = np.where(hi >= -lo, hi, lo) / np.float32(-8)
  inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
  q = np.clip(np.trunc(b * inv[..., None] + np.float32(8.5)), 0, 15).astype(np.uint8)
  rec = np.zeros(d.shape, np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
  rec["d"], rec["qs"] = d.astype(np.float16), q[..., :16] | (q[..., 16:] << 4)
  return rec.tobytes()


def tokenizer_metadata(tokenizer) -> dict:
  """tokenizer.ggml.* keys from a SentencePiece tokenizer, as llama.cpp's converter writes them."""
  sp = tokenizer.sp
  n = sp.GetPieceSize()
  types = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i) else 6 if sp.IsByte(i) else 1
           for i in range(n)]
  return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.IdToPiece(i) for i in range(n)],
          "tokenizer.ggml.scores": np.array([sp.GetScore(i) for i in range(n)], np.float32),
          "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.bos_token_id": sp.bos_id(),
          "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.unknown_token_id": sp.unk_id(),
          "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}


def save(path: str | Path, args: ModelArgs, weights: dict[str, np.ndarray], tokenizer=None, dtype: str = "f32",
         name: str = "tinyllama2") -> None:
  """Write a llama GGUF v3 file (tokenizer embedded when given). dtype f32, f16, q8_0 or q4_0 for the matrices;
  norms stay f32 and a matrix whose width is not a multiple of 32 stays f16/f32, as llama.cpp does."""
  from ..fileio import atomic_write
  if dtype not in FILE_TYPES: raise ValueError(f"unsupported GGUF dtype {dtype!r}; use f32, f16, q8_0 or q4_0")
  meta: dict = {"general.architecture": "llama", "general.name": name, "general.file_type": FILE_TYPES[dtype],
                "general.alignment": 32, "llama.context_length": args.max_position_embeddings,
                "llama.embedding_length": args.dim, "llama.block_count": args.n_layers,
                "llama.feed_forward_length": args.hidden_dim, "llama.rope.dimension_count": args.head_dim,
                "llama.attention.head_count": args.n_heads, "llama.attention.head_count_kv": args.n_kv_heads,
                "llama.attention.layer_norm_rms_epsilon": float(args.norm_eps),
                "llama.rope.freq_base": float(args.rope_theta), "llama.vocab_size": args.vocab_size}
  if args.rope_scaling is not None and args.rope_scaling.type == "linear":
    meta.update({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": float(args.rope_scaling.factor)})
  elif args.rope_scaling is not None:
    raise ValueError(f"GGUF export of rope scaling {args.rope_scaling.type!r} is not supported yet")
  if tokenizer is not None: meta.update(tokenizer_metadata(tokenizer))
  blobs: list[tuple[str, int, tuple[int, ...], bytes]] = []
  for ours, arr in weights.items():
    if args.tie_embeddings and ours == "output.weight": continue
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 1 or dtype == "f32": blobs.append((gguf_name(ours), F32, arr.shape, arr.tobytes()))
    elif dtype == "q8_0" and arr.shape[1] % 32 == 0: blobs.append((gguf_name(ours), Q8_0, arr.shape, q8_0_bytes(arr)))
    elif dtype == "q4_0" and arr.shape[1] % 32 == 0: blobs.append((gguf_name(ours), Q4_0, arr.shape, q4_0_bytes(arr)))
    else: blobs.append((gguf_name(ours), F16, arr.shape, arr.astype(np.float16).tobytes()))
  infos, offset = b"", 0
  for tname, ttype, shape, raw in blobs:
    offset += -offset % 32
    infos += _w_string(tname) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
    infos += struct.pack("<IQ", ttype, offset)
    offset += len(raw)
  head = MAGIC + struct.pack("<IQQ", 3, len(blobs), len(meta)) + b"".join(_w_kv(k, v) for k, v in meta.items()) + infos
  with atomic_write(path) as out:
    out.write(head + b"\0" * (-len(head) % 32))
    written = 0
    for _, _, _, raw in blobs:
      out.write(b"\0" * (-written % 32))
      written += -written % 32
      out.write(raw)
      written += len(raw)
