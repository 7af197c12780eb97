"""An index on disk as plain files, replaced atomically.

    INDEX/index.json          {"format": "tinyllama2-rag-index", "version": 1, "current": "<version folder>"}
    INDEX/<version>/meta.json       how it was built (embedder, chunking, sources)
    INDEX/<version>/chunks.jsonl    one chunk a line: source, index, start, text
    INDEX/<version>/vectors.npy     float32 [chunks, dim], unit rows
    INDEX/<version>/bm25/           bm25s' arrays (.npy) and vocabulary (.json)

A new version is written whole into a folder of its own, then index.json is replaced in one rename: a build killed
at any point leaves the old index or the new one, never a mixture. The version replaced is kept until the next
build, so a reader that read the old index.json still finds its files."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .extras import need
from .lexical import BM25
from .split import Chunk

FORMAT, VERSION = "tinyllama2-rag-index", 1
POINTER = "index.json"


@dataclass
class Index:
  chunks: list[Chunk]
  vectors: np.ndarray   # [len(chunks), dim] float32, unit rows
  bm25: BM25
  meta: dict            # embedder (Embedder.describe()), chunk_size, chunk_overlap, sources


def _write_json(path: Path, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=1)
    f.flush()
    os.fsync(f.fileno())


_OURS = re.compile(r"(\.tmp-)?v\d+-[\w-]+|\.index\.json\.tmp")   # version folders, and what a killed build leaves


def check_writable(out: Path, force: bool) -> None:
  """Before any work: an existing index is replaced only with force, and a folder that is not an index never (one
  holding only what a killed first build left is taken as empty)."""
  if not out.exists(): return
  if not out.is_dir(): raise ValueError(f"{out} exists and is not a folder; choose another --out")
  if (out / POINTER).is_file():
    if not force: raise ValueError(f"{out} already holds an index; pass --force to replace it")
  elif any(not _OURS.fullmatch(p.name) for p in out.iterdir()):
    raise ValueError(f"{out} is a folder that is not an index; choose an empty or new --out")


def _current(out: Path) -> str | None:
  try: return json.loads((out / POINTER).read_text(encoding="utf-8")).get("current")
  except (OSError, ValueError, AttributeError): return None


def save(index: Index, out: str | Path, force: bool = False) -> Path:
  """index written to the folder `out` as a new version (an existing index replaced only with force)."""
  out = Path(out)
  check_writable(out, force)
  out.mkdir(parents=True, exist_ok=True)
  name = f"v{VERSION}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
  tmp = out / f".tmp-{name}"
  tmp.mkdir()
  with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
    for c in index.chunks: f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  with open(tmp / "vectors.npy", "wb") as f:
    np.save(f, np.ascontiguousarray(index.vectors, dtype=np.float32))
    f.flush()
    os.fsync(f.fileno())
  index.bm25.save(tmp / "bm25")
  _write_json(tmp / "meta.json", dict(index.meta, version=VERSION, chunks=len(index.chunks),
                                      dim=int(index.vectors.shape[1])))
  os.rename(tmp, out / name)
  previous = _current(out)
  _write_json(out / f".{POINTER}.tmp", {"format": FORMAT, "version": VERSION, "current": name})
  os.replace(out / f".{POINTER}.tmp", out / POINTER)   # the switch: atomic
  for old in out.iterdir():   # older versions and what killed builds left; the one just replaced stays for readers
    if old.is_dir() and old.name not in (name, previous) and _OURS.fullmatch(old.name):
      shutil.rmtree(old, ignore_errors=True)
  return out


def _malformed(path: Path, why: str) -> ValueError:
  return ValueError(f"{path}: malformed index ({why}); rebuild it with `tinyllama2 rag index DOCS --out {path} --force`")


def load(path: str | Path) -> Index:
  path = Path(path)
  need("bm25s")   # a missing extra is not a malformed index
  if not (path / POINTER).is_file():
    what = "does not exist" if not path.exists() else "is not a tinyllama2 rag index (no index.json)"
    raise ValueError(f"{path} {what}; build one with `tinyllama2 rag index DOCS --out {path}`")
  try: pointer = json.loads((path / POINTER).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e: raise _malformed(path, f"index.json: {e}") from None
  if not isinstance(pointer, dict) or pointer.get("format") != FORMAT: raise _malformed(path, "index.json is not ours")
  if pointer.get("version") != VERSION:
    raise ValueError(f"{path}: index format version {pointer.get('version')!r}; this tinyllama2 reads version {VERSION}: "
                     f"rebuild it with `tinyllama2 rag index DOCS --out {path} --force`")
  current = str(pointer.get("current"))
  if not _OURS.fullmatch(current) or current.startswith("."): raise _malformed(path, f"index.json names {current!r}")
  folder = path / current
  if not folder.is_dir(): raise _malformed(path, f"its version folder {current} is missing")
  def read(name: str, how):
    try: return how(folder / name)
    except (OSError, ValueError, TypeError, KeyError) as e:
      raise _malformed(path, f"{name}: {type(e).__name__}: {e}".splitlines()[0]) from None
  meta = read("meta.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
  chunks = read("chunks.jsonl", lambda p: [Chunk(**json.loads(line)) for line in p.read_text(encoding="utf-8").splitlines()])
  vectors = read("vectors.npy", lambda p: np.load(p, allow_pickle=False))
  bm25 = read("bm25", BM25.load)
  if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != len(chunks):
    raise _malformed(path, f"vectors.npy is {vectors.dtype} {vectors.shape} for {len(chunks)} chunks")
  if meta.get("dim") != vectors.shape[1]: raise _malformed(path, "meta.json's dim differs from vectors.npy")
  if bm25.model.scores["num_docs"] != len(chunks): raise _malformed(path, "the BM25 index counts other chunks")
  return Index(chunks, vectors, bm25, meta)
