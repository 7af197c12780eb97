"""BM25 over words: bm25s scores them, jieba segments Chinese into words (it has no spaces between them)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from .extras import need

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+|[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
  """Lower-cased words of text: runs of letters and digits, and jieba's words inside runs of Chinese characters."""
  out: list[str] = []
  for w in _WORD.findall(text.lower()):
    out += _segment(w) if _HAN.fullmatch(w) else [w]
  return out


def _segment(han: str) -> list[str]:
  jieba = need("jieba")
  if jieba.default_logger.level < logging.WARNING: jieba.setLogLevel(logging.WARNING)   # no dictionary-loading chatter
  return jieba.lcut(han)


class BM25:
  """BM25 scores of every chunk for a query (bm25s' Lucene variant, k1 1.5, b 0.75)."""

  def __init__(self, model) -> None: self.model = model

  @classmethod
  def build(cls, texts: list[str]) -> BM25:
    bm25s = need("bm25s")
    model = bm25s.BM25()
    model.index([words(t) or [""] for t in texts], show_progress=False)
    return cls(model)

  def scores(self, query: str) -> np.ndarray:
    known = [w for w in words(query) if w in self.model.vocab_dict]
    if not known: return np.zeros(self.model.scores["num_docs"], dtype=np.float32)
    return np.asarray(self.model.get_scores(known), dtype=np.float32)

  def save(self, folder: Path) -> None: self.model.save(str(folder), show_progress=False)

  @classmethod
  def load(cls, folder: Path) -> BM25:
    bm25s = need("bm25s")
    return cls(bm25s.BM25.load(str(folder), show_progress=False))
