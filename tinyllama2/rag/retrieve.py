"""Finding the chunks that answer a question: cosine similarity of embeddings, BM25 over words, and the two
fused by reciprocal-rank fusion (Cormack et al. 2009: score = sum over rankings of 1 / (60 + rank)).

Each ranking contributes its own top k, as LangChain's EnsembleRetriever fuses its retrievers' results: a chunk
that one ranking puts first stays in the fused top k however the other ranks it, so a weak embedding model does not
push out what BM25 found (nor the reverse)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .split import Chunk
from .store import Index

MODES = ("fused", "dense", "bm25")
RRF_K = 60   # the constant of reciprocal-rank fusion


@dataclass
class Hit:
  chunk: Chunk
  score: float                                 # cosine, BM25 or fused score, by the mode searched
  ranks: dict[str, int] = field(default_factory=dict)   # 1-based rank in each ranking it was found in


def _top(scores: np.ndarray, k: int, positive: bool = False) -> np.ndarray:
  """Indices of the k largest scores, best first (ties: lower index first); positive: only scores > 0."""
  idx = np.argsort(-scores, kind="stable")[:k]
  return idx[scores[idx] > 0] if positive else idx


def dense_ranking(index: Index, query_vector: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
  q = None if query_vector is None else np.asarray(query_vector, dtype=np.float32).reshape(-1)
  if q is None or q.size != index.vectors.shape[1]:
    raise ValueError(f"dense retrieval needs the question embedded as the index's chunks were "
                     f"({index.vectors.shape[1]} dimensions), got {'none' if q is None else q.size}")
  scores = index.vectors @ q
  top = _top(scores, k)
  return top, scores[top]


def bm25_ranking(index: Index, question: str, k: int) -> tuple[np.ndarray, np.ndarray]:
  scores = index.bm25.scores(question)
  top = _top(scores, k, positive=True)   # a chunk sharing no word with the question is not a BM25 candidate
  return top, scores[top]


def fuse(rankings: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
  """Reciprocal-rank fusion of rankings (chunk indices, best first): the k best by summed 1 / (RRF_K + rank). Ties
  go to the better best rank, then to the earlier ranking (BM25 comes first: a shared rare word is the more specific
  evidence), then to the earlier chunk."""
  fused: dict[int, float] = {}
  first: dict[int, tuple[int, int]] = {}   # chunk → (its best rank, the ranking that gave it)
  for which, ranking in enumerate(rankings):
    for rank, i in enumerate(ranking.tolist(), start=1):
      fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
      first[i] = min(first.get(i, (rank, which)), (rank, which))
  best = sorted(fused, key=lambda i: (-fused[i], first[i], i))[:k]
  return np.asarray(best, dtype=np.int64), np.asarray([fused[i] for i in best])


def search(index: Index, question: str, query_vector: np.ndarray | None, k: int = 4, mode: str = "fused") -> list[Hit]:
  """The k chunks that best match the question (query_vector: the question embedded as the index's chunks were;
  not needed for mode "bm25")."""
  if mode not in MODES: raise ValueError(f"unknown retrieval mode {mode!r}; use one of {', '.join(MODES)}")
  if k <= 0: raise ValueError(f"k must be positive, got {k}")
  found: dict[str, np.ndarray] = {}
  if mode in ("fused", "bm25"): found["bm25"], bm25_scores = bm25_ranking(index, question, k)
  if mode in ("fused", "dense"): found["dense"], dense_scores = dense_ranking(index, query_vector, k)
  if mode == "fused": top, scores = fuse(list(found.values()), k)
  elif mode == "dense": top, scores = found["dense"][:k], dense_scores[:k]
  else: top, scores = found["bm25"][:k], bm25_scores[:k]
  rank_of = {name: {int(i): r for r, i in enumerate(ranking.tolist(), start=1)} for name, ranking in found.items()}
  return [Hit(index.chunks[int(i)], float(s), {n: ranks[int(i)] for n, ranks in rank_of.items() if int(i) in ranks})
          for i, s in zip(top, scores)]
