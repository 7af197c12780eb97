"""Splitting documents into overlapping chunks at the most natural boundary that keeps them under a size.

LangChain's RecursiveCharacterTextSplitter is the model (600 characters, 100 of overlap in the write-up): split at
paragraphs, then lines, then sentence ends, then clauses, then spaces, and only as a last resort inside a word;
then merge the pieces back into chunks. Sentence ends include Chinese 。！？ (Chinese has no spaces between words,
so a splitter that only knows spaces would cut it anywhere)."""
from __future__ import annotations

import re
from dataclasses import dataclass

# boundaries from the most to the least natural; each piece keeps its separator at its end
SEPARATORS = ("\n\n", "\n", "。", "！", "？", ". ", "! ", "? ", "；", "; ", "，", ", ", " ")


@dataclass(frozen=True)
class Chunk:
  """A piece of a source document: `index` counts the source's chunks from 0, `start` is its first character."""
  source: str
  index: int
  start: int
  text: str

  @property
  def id(self) -> str: return f"{self.source}#{self.index}"


def _pieces(text: str, size: int, separators: tuple[str, ...]) -> list[str]:
  """text cut into consecutive pieces of at most `size` characters, each ending at the most natural boundary."""
  if len(text) <= size: return [text]
  for i, sep in enumerate(separators):
    if sep not in text: continue
    parts = [p for p in re.split(f"(?<={re.escape(sep)})", text) if p]
    out: list[str] = []
    for part in parts: out += _pieces(part, size, separators[i + 1:]) if len(part) > size else [part]
    return out
  return [text[i:i + size] for i in range(0, len(text), size)]


def split_text(text: str, chunk_size: int = 600, chunk_overlap: int = 100) -> list[tuple[int, str]]:
  """(start offset, text) of chunks of at most chunk_size characters; consecutive chunks share up to chunk_overlap
  characters of whole pieces. Chunks that are only whitespace are dropped; others keep their text as it is."""
  if chunk_size <= 0: raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  if not 0 <= chunk_overlap < chunk_size:
    raise ValueError(f"chunk_overlap must be at least 0 and less than chunk_size ({chunk_size}), got {chunk_overlap}")
  chunks: list[tuple[int, str]] = []
  window: list[tuple[int, str]] = []   # (start, piece) of the chunk being built
  length, at = 0, 0
  def emit() -> None:
    body = "".join(p for _, p in window)
    if body.strip(): chunks.append((window[0][0], body))
  for piece in _pieces(text, chunk_size, SEPARATORS):
    if window and length + len(piece) > chunk_size:
      emit()
      while window and (length > chunk_overlap or length + len(piece) > chunk_size):   # keep the overlap's pieces
        length -= len(window.pop(0)[1])
    window.append((at, piece))
    length, at = length + len(piece), at + len(piece)
  if window and (not chunks or chunks[-1][0] + len(chunks[-1][1]) < at): emit()
  return chunks


def chunk_document(source: str, text: str, chunk_size: int = 600, chunk_overlap: int = 100) -> list[Chunk]:
  """split_text's chunks of one document, numbered."""
  return [Chunk(source, i, start, body) for i, (start, body) in enumerate(split_text(text, chunk_size, chunk_overlap))]
