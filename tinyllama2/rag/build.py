"""Reading the user's documents and building an index of their chunks."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .embedders import Embedder
from .lexical import BM25
from .split import Chunk, chunk_document
from .store import Index

SUFFIXES = (".txt", ".md")


def document_paths(paths: Sequence[str | Path]) -> list[Path]:
  """The files named, and the .txt/.md files under the folders named (sorted), each once."""
  found: list[Path] = []
  for p in map(Path, paths):
    if p.is_dir(): found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
    elif p.is_file():
      if p.suffix.lower() not in SUFFIXES: raise ValueError(f"{p}: only .txt and .md files are indexed")
      found.append(p)
    else: raise ValueError(f"{p}: no such file or folder")
  unique = list(dict.fromkeys(found))
  if not unique: raise ValueError(f"no .txt or .md files in {', '.join(map(str, paths))}")
  return unique


def read_text(path: Path) -> str:
  try: return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e: raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def build_index(paths: Sequence[str | Path], embedder: Embedder, chunk_size: int = 600, chunk_overlap: int = 100,
                batch: int = 32, progress: bool = True) -> Index:
  """The documents' chunks, their embeddings (`batch` chunks a call) and a BM25 index over them."""
  files = document_paths(paths)
  chunks: list[Chunk] = []
  for f in files: chunks += chunk_document(str(f), read_text(f), chunk_size, chunk_overlap)
  if not chunks: raise ValueError("the documents hold no text to index")
  vectors = []
  with tqdm(total=len(chunks), desc="embedding chunks", unit="chunk", disable=not progress) as bar:
    for lo in range(0, len(chunks), batch):
      vectors.append(embedder.embed([c.text for c in chunks[lo:lo + batch]]))
      bar.update(min(batch, len(chunks) - lo))
  meta = {"embedder": embedder.describe(), "chunk_size": chunk_size, "chunk_overlap": chunk_overlap,
          "sources": [str(f) for f in files]}
  return Index(chunks, np.concatenate(vectors), BM25.build([c.text for c in chunks]), meta)
