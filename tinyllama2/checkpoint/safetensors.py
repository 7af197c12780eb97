"""A small, validating safetensors reader/writer on numpy memory maps (no code runs from the file)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ..fileio import atomic_write

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
           "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64", np.dtype(np.int8): "I8",
          np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
MAX_HEADER = 100 * 1024 * 1024


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
  """bfloat16 stored as uint16 → float32 (bf16 is the top half of an fp32)."""
  return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
  """float32 → bfloat16 bits (uint16) with round-to-nearest-even, as PyTorch does."""
  bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
  rounded = bits + 0x7FFF + ((bits >> 16) & 1)
  return (rounded >> 16).astype(np.uint16)


def read_header(path: Path) -> tuple[dict, int]:
  """(header dict, data start offset), validated against the file size."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8: raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size: raise ValueError(f"{path}: corrupt safetensors header length {n} (file is {size} bytes)")
    try: header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e: raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict): raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
  data_len = size - 8 - n
  for name, info in header.items():
    if name == "__metadata__": continue
    try:
      dtype, shape, (start, end) = _DTYPES[info["dtype"]], [int(s) for s in info["shape"]], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if any(s < 0 for s in shape) or not (0 <= start <= end <= data_len) or end - start != count * np.dtype(dtype).itemsize:
      raise ValueError(f"{path}: tensor {name!r} (shape {shape}, {info['dtype']}) does not fit its byte range "
                       f"{start}..{end} of {data_len} data bytes (truncated or corrupt file?)")
  return header, 8 + n


def load(path: str | Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
  """Memory-mapped arrays by name; BF16 comes back as float32."""
  path = Path(path)
  header, base = read_header(path)
  mm = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    if name == "__metadata__" or (names is not None and name not in names): continue
    start, end = info["data_offsets"]
    arr = mm[base + start:base + end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    out[name] = bf16_to_f32(arr) if info["dtype"] == "BF16" else arr
  return out


def save(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None,
         bf16: set[str] | None = None) -> None:
  """Write tensors atomically. Names in `bf16` are stored as BF16 (given as float32)."""
  header: dict = {"__metadata__": metadata or {"format": "pt"}}
  blobs, offset = [], 0
  for name, arr in tensors.items():
    if bf16 and name in bf16: data, dt = f32_to_bf16(arr), "BF16"
    else:
      data = np.ascontiguousarray(arr)
      if data.dtype not in _NAMES: raise ValueError(f"cannot store {name} of dtype {data.dtype} in safetensors")
      dt = _NAMES[data.dtype]
    header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + data.nbytes]}
    blobs.append(data)
    offset += data.nbytes
  hjson = json.dumps(header, separators=(",", ":")).encode()
  hjson += b" " * (-len(hjson) % 8)
  with atomic_write(path) as f:
    f.write(struct.pack("<Q", len(hjson)))
    f.write(hjson)
    for b in blobs: f.write(memoryview(np.ascontiguousarray(b)).cast("B"))
