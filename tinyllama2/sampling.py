"""Logits processors and sampling with Hugging Face `generate()` semantics (numpy, one row of logits).

Order as in transformers: repetition penalty; then, only when sampling, temperature, top-k, top-p, min-p.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class SamplingParams:
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 50
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0

  def validate(self) -> None:
    if self.do_sample and self.temperature <= 0:
      raise ValueError(f"temperature={self.temperature} with do_sample=True is invalid; for greedy decoding set "
                       "do_sample=False (temperature must be > 0 when sampling)")
    if not 0 <= self.top_p <= 1: raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
    if not 0 <= self.min_p <= 1: raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
    if self.top_k < 0: raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
    if self.repetition_penalty <= 0: raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def repetition_penalty(logits: np.ndarray, seen: Sequence[int], penalty: float) -> np.ndarray:
  """Each token seen so far (prompt included) once: negative logits times penalty, positive ones divided."""
  if penalty == 1.0 or not len(seen): return logits
  ids = np.unique(np.asarray(seen, dtype=np.int64))
  out = logits.copy()
  vals = out[ids]
  out[ids] = np.where(vals < 0, vals * penalty, vals / penalty)
  return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
  """Keep tokens whose logit is >= the k-th largest (ties with the k-th survive)."""
  if k <= 0 or k >= logits.shape[-1]: return logits
  kth = np.partition(logits, -k)[-k]
  return np.where(logits < kth, -np.inf, logits)


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - np.max(x))
  return e / e.sum()


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
  """Keep the smallest set of most probable tokens whose probability reaches p (at least one token)."""
  if p >= 1.0: return logits
  order = np.argsort(logits, kind="stable")                # ascending, as HF sorts
  cum = np.cumsum(_softmax(logits[order].astype(np.float64)))
  remove = cum <= (1 - p)
  remove[-1] = False
  out = logits.copy()
  out[order[remove]] = -np.inf
  return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
  """Drop tokens whose probability is below min_p times the top token's probability."""
  if min_p <= 0: return logits
  probs = _softmax(logits.astype(np.float64))
  remove = probs < min_p * probs.max()
  remove[np.argmax(logits)] = False
  return np.where(remove, -np.inf, logits)


def process(logits: np.ndarray, params: SamplingParams, seen: Sequence[int]) -> np.ndarray:
  logits = repetition_penalty(np.asarray(logits, dtype=np.float32), seen, params.repetition_penalty)
  if not params.do_sample: return logits
  logits = logits / np.float32(params.temperature)
  logits = top_k_filter(logits, params.top_k)
  logits = top_p_filter(logits, params.top_p)
  return min_p_filter(logits, params.min_p)


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
  """Argmax when greedy, else one draw from softmax(logits) by inverse CDF with a uniform from `rng`."""
  if not params.do_sample: return int(np.argmax(logits))
  probs = _softmax(logits.astype(np.float64))
  cdf = np.cumsum(probs)
  # side="right" lands on the first token whose cumulative mass exceeds u, never on a zero-probability token
  return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(probs) - 1)
