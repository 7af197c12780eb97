"""Logits processors and sampling with Hugging Face `generate()` semantics (numpy, one row of logits).

Order as in transformers: repetition penalty, no-repeat n-grams, min_new_tokens; then llama.cpp/OpenAI-style
frequency and presence penalties; then, only when sampling, temperature, top-k, top-p, min-p, typical-p.
They run on the host over one [vocab] row that decoding copies back anyway (to choose the token); at 32000
floats that costs well under a millisecond a step (see the note in bench/).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def knob(value, help: str, **cli):
  """A generation setting: its default value, the help line the CLI shows for it, and argparse overrides for its
  flag (e.g. a CLI `default` of its own; `flag=False`: no flag)."""
  return field(default=value, metadata={"help": help, "cli": cli})


@dataclass
class SamplingParams:
  """The logits processors' and samplers' settings (Hugging Face names and defaults)."""
  do_sample: bool = knob(False, "sample instead of greedy decoding", flag=False)
  temperature: float = knob(1.0, "sampling temperature; 0 means greedy decoding (CLI only: the API raises instead)",
                            default=0.0)
  top_k: int = knob(50, "keep the k most likely tokens (0 = off)")
  top_p: float = knob(1.0, "nucleus sampling: keep the smallest set with this mass")
  min_p: float = knob(0.0, "drop tokens below min_p × the top probability")
  repetition_penalty: float = knob(1.0, "penalty for tokens already seen (HF meaning)")
  typical_p: float = knob(1.0, "locally typical sampling mass (1 = off)")
  no_repeat_ngram_size: int = knob(0, "never repeat an n-gram of this size (0 = off)")
  min_new_tokens: int = knob(0, "suppress eos until this many new tokens")
  frequency_penalty: float = knob(0.0, "OpenAI-style: logit -= count × this")
  presence_penalty: float = knob(0.0, "OpenAI-style: logit -= this if the token appeared")
  # window of frequency/presence penalties in tokens (-1: the whole sequence)
  penalty_last_n: int = knob(64, "window of the two penalties above (-1 = everything)")

  def validate(self) -> None:
    if self.do_sample and self.temperature <= 0:
      raise ValueError(f"temperature={self.temperature} with do_sample=True is invalid; for greedy decoding set "
                       "do_sample=False (temperature must be > 0 when sampling)")
    if not 0 <= self.top_p <= 1: raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
    if not 0 <= self.min_p <= 1: raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
    if self.top_k < 0: raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
    if self.repetition_penalty <= 0: raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
    if not 0 < self.typical_p <= 1: raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
    if self.no_repeat_ngram_size < 0: raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
    if self.min_new_tokens < 0: raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
    if self.penalty_last_n < -1: raise ValueError(f"penalty_last_n must be >= -1, got {self.penalty_last_n}")


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


def no_repeat_ngram(logits: np.ndarray, seen: Sequence[int], n: int) -> np.ndarray:
  """Ban every token that would complete an n-gram already present in the sequence (prompt included)."""
  if n <= 0 or len(seen) + 1 < n: return logits
  seq = [int(t) for t in seen]
  prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
  banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix]
  if not banned: return logits
  out = logits.copy()
  out[banned] = -np.inf
  return out


def suppress_eos(logits: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
  """min_new_tokens: eos cannot be chosen yet."""
  ids = [i for i in eos_ids if 0 <= i < logits.shape[-1]]
  if not ids: return logits
  out = logits.copy()
  out[ids] = -np.inf
  return out


def frequency_presence_penalty(logits: np.ndarray, window: Sequence[int], frequency: float, presence: float) -> np.ndarray:
  """OpenAI / llama.cpp: logit -= count·frequency + (count > 0)·presence, counting the tokens in `window`."""
  if (frequency == 0 and presence == 0) or not len(window): return logits
  ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
  out = logits.copy()
  out[ids] -= (counts * frequency + presence).astype(out.dtype)
  return out


def typical_filter(logits: np.ndarray, mass: float) -> np.ndarray:
  """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy until `mass` is covered."""
  if mass >= 1.0: return logits
  logp = logits.astype(np.float64) - np.max(logits)
  logp = logp - np.log(np.exp(logp).sum())
  p = np.exp(logp)
  live = p > 0
  entropy = -np.sum(logp[live] * p[live])
  shifted = np.abs(-logp - entropy)
  order = np.argsort(shifted, kind="stable")
  cum = np.cumsum(p[order])
  last = min(int((cum < mass).sum()), len(order) - 1)
  remove = shifted[order] > shifted[order][last]
  remove[0] = False   # at least one token
  out = logits.copy()
  out[order[remove]] = -np.inf
  return out


def process(logits: np.ndarray, params: SamplingParams, seen: Sequence[int], n_new: int = 0,
            eos_ids: Sequence[int] = ()) -> np.ndarray:
  """All processors for one step. seen: the sequence so far (prompt + new tokens); n_new: new tokens so far."""
  logits = repetition_penalty(np.asarray(logits, dtype=np.float32), seen, params.repetition_penalty)
  logits = no_repeat_ngram(logits, seen, params.no_repeat_ngram_size)
  if n_new < params.min_new_tokens: logits = suppress_eos(logits, list(eos_ids))
  n = params.penalty_last_n
  window = list(seen) if n == -1 else list(seen)[-n:] if n > 0 else []
  logits = frequency_presence_penalty(logits, window, params.frequency_penalty, params.presence_penalty)
  if not params.do_sample: return logits
  logits = logits / np.float32(params.temperature)
  logits = top_k_filter(logits, params.top_k)
  # the remaining warpers only look at tokens that still have probability: after top-k that is a handful, so
  # they run on that subset (same result: removed tokens have probability 0 and stay removed)
  live = np.flatnonzero(np.isfinite(logits))
  sub = logits[live] if len(live) < len(logits) // 2 else logits
  sub = typical_filter(min_p_filter(top_p_filter(sub, params.top_p), params.min_p), params.typical_p)
  if sub is logits or len(sub) == len(logits): return sub
  out = np.full_like(logits, -np.inf)
  out[live] = sub
  return out


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
  """Argmax when greedy, else one draw from softmax(logits) by inverse CDF with a uniform from `rng`."""
  if not params.do_sample: return int(np.argmax(logits))
  live = np.flatnonzero(np.isfinite(logits))   # tokens with probability > 0, in id order
  probs = _softmax(logits[live].astype(np.float64))
  cdf = np.cumsum(probs)
  # side="right" lands on the first token whose cumulative mass exceeds u, never on a zero-probability token
  return int(live[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(probs) - 1)])
