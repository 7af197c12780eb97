"""Meta checkpoints: params.json + consolidated.NN.pth shards (PyTorch zip format), without PyTorch.

The pickle inside a .pth is read by an unpickler that resolves only the handful of globals a state dict
needs, to stand-ins of our own: nothing named by the file is ever imported or called. Shards are merged
along the axis Meta's model parallelism split them.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..config import ModelArgs

_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": "bf16",
                   "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8}
# column-parallel layers are split along their output rows (0), row-parallel ones along their inputs (1)
_SPLIT_AXIS = {"tok_embeddings.weight": 1, "output.weight": 0, "attention.wq.weight": 0, "attention.wk.weight": 0,
               "attention.wv.weight": 0, "attention.wo.weight": 1, "feed_forward.w1.weight": 0,
               "feed_forward.w2.weight": 1, "feed_forward.w3.weight": 0}


class _StorageType:
  def __init__(self, name: str): self.name = name


class _Storage:
  def __init__(self, data: np.ndarray): self.data = data


def _stored_member(archive: zipfile.ZipFile, source: Path, name: str, dtype) -> np.ndarray:
  """An uncompressed zip member as a read-only memory map (torch.save stores members uncompressed), so a
  checkpoint is not held in memory twice; compressed members are read normally."""
  try: info = archive.getinfo(name)
  except KeyError: raise pickle.UnpicklingError(f"storage {name} is missing from the archive") from None
  itemsize = np.dtype(dtype).itemsize
  if info.compress_type != zipfile.ZIP_STORED or info.file_size < itemsize:
    return np.frombuffer(archive.read(name), dtype=dtype)
  with open(source, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)
  if len(local) < 30 or local[:4] != b"PK\x03\x04": raise pickle.UnpicklingError(f"corrupt zip entry {name}")
  start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
  if start + info.file_size > source.stat().st_size: raise pickle.UnpicklingError(f"storage {name} is truncated")
  return np.memmap(source, dtype=dtype, mode="r", offset=start, shape=(info.file_size // itemsize,))


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_rest) -> np.ndarray:
  if not isinstance(storage, _Storage): raise pickle.UnpicklingError("tensor without a storage")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if any(s < 0 for s in size + stride) or offset < 0: raise pickle.UnpicklingError(f"bad tensor view {size} {stride}")
  needed = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1 if all(size) else 0
  if needed > storage.data.size: raise pickle.UnpicklingError(f"tensor view {size} runs past its storage")
  item = storage.data.itemsize
  return np.lib.stride_tricks.as_strided(storage.data[offset:], shape=size, strides=[s * item for s in stride])


def _rebuild_parameter(data, *_rest): return data


_ALLOWED = {("collections", "OrderedDict"): OrderedDict, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}


class SafeUnpickler(pickle.Unpickler):
  """Accepts only OrderedDict, tensor rebuilds and storage types; anything else is refused before it exists."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: Path):
    super().__init__(file)
    self.archive, self.prefix, self.source = archive, prefix, source

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED: return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES: return _StorageType(name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a PyTorch state dict does not need it "
                                 "(the file may try to run code)")

  def _member(self, name: str, dtype) -> np.ndarray: return _stored_member(self.archive, self.source, name, dtype)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    _, stype, key, _location, numel = pid[:5]
    dtype = _STORAGE_DTYPES[stype.name]
    arr = self._member(f"{self.prefix}/data/{key}", np.uint16 if dtype == "bf16" else dtype)
    if arr.size < int(numel): raise pickle.UnpicklingError(f"storage {key} is truncated")
    if dtype == "bf16": arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return _Storage(arr)


def load_pth(path: str | Path) -> dict[str, np.ndarray]:
  path = Path(path)
  try: archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise ValueError(f"{path}: not a PyTorch zip checkpoint (legacy or corrupt .pth files are not supported)") from None
  with archive:
    pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pkl) != 1: raise ValueError(f"{path}: no data.pkl in the archive; not a PyTorch checkpoint")
    prefix = pkl[0][: -len("/data.pkl")]
    try:
      with archive.open(pkl[0]) as f: state = SafeUnpickler(f, archive, prefix, path).load()
    except MemoryError: raise
    except Exception as e:   # the file is untrusted: any failure while parsing it is a format error
      raise ValueError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise ValueError(f"{path}: expected a state dict of tensors")
  # views of a memory map stay lazy; a strided view is copied to be contiguous
  return {str(k): v if v.flags.c_contiguous else np.ascontiguousarray(v) for k, v in state.items()}


def is_meta_dir(path: Path) -> bool:
  return path.is_dir() and (path / "params.json").is_file() and any(path.glob("consolidated.*.pth"))


def load(path: str | Path) -> tuple[ModelArgs, dict[str, np.ndarray]]:
  d = Path(path)
  try: params = json.loads((d / "params.json").read_text())
  except json.JSONDecodeError as e: raise ValueError(f"{d / 'params.json'}: not valid JSON ({e})") from None
  shards = [load_pth(p) for p in sorted(d.glob("consolidated.*.pth"))]
  weights = merge_shards(shards, source=d)
  weights.pop("rope.freqs", None)
  vocab = int(params.get("vocab_size", -1))
  if vocab <= 0: vocab = weights["tok_embeddings.weight"].shape[0]
  try:
    args = ModelArgs(dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=int(params["n_heads"]),
                     n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab, multiple_of=int(params.get("multiple_of", 256)),
                     ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=float(params.get("norm_eps", 1e-5)),
                     rope_theta=float(params.get("rope_theta", 10000.0)),
                     max_position_embeddings=int(params.get("max_seq_len", 4096)),
                     tie_embeddings="output.weight" not in weights)
  except KeyError as e: raise ValueError(f"{d / 'params.json'}: missing {e.args[0]!r}") from None
  w1 = weights.get("layers.0.feed_forward.w1.weight")
  if w1 is not None and w1.shape[0] != args.hidden_dim: args = args.replace(hidden_dim=int(w1.shape[0]))
  return args, weights


def merge_shards(shards: list[dict[str, np.ndarray]], source: Path) -> dict[str, np.ndarray]:
  if len(shards) == 1: return shards[0]
  names = set(shards[0])
  if any(set(s) != names for s in shards): raise ValueError(f"{source}: the shards hold different tensor names")
  merged = {}
  for name in shards[0]:
    key = name.split(".", 2)[-1] if name.startswith("layers.") else name
    axis = _SPLIT_AXIS.get(key)
    merged[name] = shards[0][name] if axis is None or shards[0][name].ndim < 2 else \
      np.concatenate([s[name] for s in shards], axis=axis)
  return merged


def save(out: str | Path, args: ModelArgs, weights: dict[str, np.ndarray]) -> None:
  """Write params.json + consolidated.00.pth (one shard, fp32) in PyTorch's zip layout, loadable by torch.load."""
  from ..fileio import atomic_write, write_text
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "max_seq_len": args.max_position_embeddings}
  if args.ffn_dim_multiplier is not None: params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
  with atomic_write(out / "consolidated.00.pth") as f:
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
      z.writestr("consolidated/data.pkl", _state_dict_pickle(weights))
      z.writestr("consolidated/version", "3\n")
      for i, arr in enumerate(weights.values()):
        z.writestr(f"consolidated/data/{i}", np.ascontiguousarray(arr, dtype=np.float32).tobytes())
  write_text(out / "params.json", json.dumps(params, indent=2))


def _state_dict_pickle(weights: dict[str, np.ndarray]) -> bytes:
  """The data.pkl torch.save writes for an OrderedDict of float32 tensors, emitted opcode by opcode."""
  P = pickle
  def glob(module: str, name: str) -> bytes: return P.GLOBAL + f"{module}\n{name}\n".encode()
  def text(s: str) -> bytes:
    b = s.encode()
    return P.BINUNICODE + len(b).to_bytes(4, "little") + b
  def integer(n: int) -> bytes: return P.BININT + n.to_bytes(4, "little", signed=True)
  def tup(items: list[bytes]) -> bytes: return P.MARK + b"".join(items) + P.TUPLE
  out = [P.PROTO + b"\x02", glob("collections", "OrderedDict"), P.EMPTY_TUPLE, P.REDUCE, P.MARK]
  for i, (name, arr) in enumerate(weights.items()):
    shape = arr.shape
    strides = [int(np.prod(shape[j + 1:])) for j in range(len(shape))]
    storage = tup([text("storage"), glob("torch", "FloatStorage"), text(str(i)), text("cpu"), integer(int(arr.size))])
    args = tup([storage + P.BINPERSID, integer(0), tup([integer(s) for s in shape]),
                tup([integer(s) for s in strides]), P.NEWFALSE, glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE])
    out += [text(name), glob("torch._utils", "_rebuild_tensor_v2"), args, P.REDUCE]
  out += [P.SETITEMS, P.STOP]
  return b"".join(out)
