"""Generation: the settings (`GenerationConfig`), the token-step core every loop shares, results and streamed text.

A `Continuation` is one sequence being generated: the engine (engine.py) runs many of them through one model and
each chooses its tokens (logits processors and sampler of sampling.py) into `TokenStep` records, with the finish
reason on a sequence's last record and the timings so far (as mlx-lm's GenerationResponse). Whole results
(`Generation`) and streamed text (`TextStream`) are built from those records; beam search (beam.py) keeps its
own loop but stops and times the same way (`Stopping`, `Timer`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np

from .sampling import SamplingParams, choose, knob, process
from .tokenizer import Tokenizer


@dataclass
class GenerationConfig(SamplingParams):
  """Every generation setting, with Hugging Face's defaults and meanings (the sampling ones are SamplingParams').
  The CLI's flags and their help lines are derived from these fields."""
  max_new_tokens: int = knob(256, "tokens to generate at most")
  num_beams: int = knob(1, "beam search width (1 = off)")
  length_penalty: float = knob(1.0, "beam score = logprob sum / length ** this")
  early_stopping: bool | str = knob(False, "beam search stop rule (HF)", choices=["true", "false", "never"],
                                    default="false")  # True, False or "never", as in Hugging Face
  num_return_sequences: int = knob(1, "sequences to return (generate --json)")
  eos_token_id: int | list[int] | None = knob(None, "end-of-sequence id (repeatable; default: the model's)",
                                              type=int, action="append")   # None: the model's own
  seed: int | None = knob(None, "random seed for sampling", type=int)
  stop: list[str] = field(default_factory=list, metadata={"help": "stop string (repeatable)",
                                                          "cli": {"action": "append", "default": []}})

  @classmethod
  def of(cls, config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """`config` (default: the defaults) with some settings replaced, checked; unknown names are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(overrides) - names):
      raise ValueError(f"unknown generation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    if isinstance(overrides.get("stop"), str): overrides["stop"] = [overrides["stop"]]
    if "stop" in overrides and overrides["stop"] is None: overrides["stop"] = []
    cfg = dataclasses.replace(config or cls(), **overrides)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    super().validate()
    if self.max_new_tokens < 0: raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
    if self.num_beams < 1: raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if self.early_stopping not in (True, False, "never"):
      raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
    limit = self.num_beams if self.num_beams > 1 or not self.do_sample else None
    if self.num_return_sequences < 1 or (limit is not None and self.num_return_sequences > limit):
      raise ValueError(f"num_return_sequences={self.num_return_sequences} must be between 1 and num_beams={self.num_beams}"
                       " (greedy search returns one sequence; sampling may return any number)")
    if self.num_beams > 1 and self.do_sample:
      raise ValueError("beam search with do_sample=True (beam sampling) is not supported; use one or the other")
    if any(not isinstance(s, str) or not s for s in self.stop):
      raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class Generation:
  text: str
  tokens: list[int]                  # the new ids, without the eos that ended generation
  prompt_tokens: list[int]
  finish_reason: str                 # "stop" (eos or stop string) or "length"
  prefill_tokens_per_s: float = 0.0
  decode_tokens_per_s: float = 0.0
  time_to_first_token_s: float = 0.0
  score: float | None = None         # beam search: sum of log-probs / generated_len ** length_penalty


@dataclass
class TokenStep:
  """One step of one sequence. `token` is the new id, or None on a last step that ended on eos (which is not part
  of the generated text); `finish_reason` is None until the sequence's last step, then "stop" or "length"."""
  row: int
  token: int | None
  finish_reason: str | None
  prefill_tokens_per_s: float
  decode_tokens_per_s: float
  time_to_first_token_s: float
  logits: np.ndarray | None = field(default=None, repr=False)   # the row the token was chosen from

  @property
  def logprob(self) -> float | None:
    """log p(token) under the model's distribution (the logits before any processor)."""
    if self.token is None or self.logits is None: return None
    x = self.logits.astype(np.float64)
    m = x.max()
    return float(x[self.token] - m - np.log(np.exp(x - m).sum()))


class Timer:
  """Prefill and decode rates and the time to the first token, as every generation loop reports them."""

  def __init__(self, prompt_tokens: int):
    self.prompt_tokens, self.start = prompt_tokens, time.perf_counter()
    self.prefilled = self.first_token = None

  def prefill_done(self) -> None: self.prefilled = time.perf_counter()

  def token_chosen(self) -> None:
    if self.first_token is None: self.first_token = time.perf_counter()

  def rates(self, decoded: int) -> dict[str, float]:
    """`decoded`: tokens that came out of decode steps (each row's first token comes from the prefill)."""
    now, prefilled = time.perf_counter(), self.prefilled or self.start
    return dict(prefill_tokens_per_s=self.prompt_tokens / max(prefilled - self.start, 1e-9),
                decode_tokens_per_s=decoded / (now - prefilled) if decoded > 0 else 0.0,
                time_to_first_token_s=(self.first_token or now) - self.start)


@dataclass
class Stopping:
  """When a sequence ends: an eos id, a stop string in its text, max_new_tokens, or the end of the context."""
  eos_ids: set[int]
  max_new_tokens: int
  max_seq_len: int
  stop: list[str] = field(default_factory=list)
  tokenizer: Tokenizer | None = None

  def __post_init__(self):
    if self.stop and self.tokenizer is None: raise ValueError("stop strings need a tokenizer")

  def reason(self, prompt: Sequence[int], new: Sequence[int]) -> str | None:
    """Why the sequence prompt + new ends now (new's last token just chosen, eos not included), or None."""
    if self.stop and stop_index(decode_continuation(self.tokenizer, prompt, new), self.stop) >= 0: return "stop"
    if len(new) >= self.max_new_tokens or len(prompt) + len(new) >= self.max_seq_len: return "length"
    return None


class Constraint(Protocol):
  """What a sequence's output must match (a grammar): which tokens may come next, and the one that did."""
  def mask(self, logits: np.ndarray) -> np.ndarray: ...   # logits with every token that cannot continue at -inf
  def advance(self, token: int) -> None: ...
  def done(self) -> bool: ...   # the output is complete: nothing but eos may follow


class Continuation:
  """One sequence being generated: what it has produced so far, how it chooses its next token (the processors and
  sampler of sampling.py with its own random stream) and when it ends. The engine keeps one per request; each
  `choose` turns the logits after the sequence into a `TokenStep`."""

  def __init__(self, row: int, prompt: list[int], cfg: GenerationConfig, stopping: Stopping,
               rng: np.random.Generator | None = None, constraint: Constraint | None = None):
    self.row, self.prompt, self.cfg, self.stopping = row, list(prompt), cfg, stopping
    self.constraint = constraint
    self.rng = rng or np.random.Generator(np.random.PCG64(cfg.seed))
    self.new: list[int] = []
    self.timer, self.decoded, self.finish_reason = Timer(len(prompt)), 0, None
    self._eos = sorted(stopping.eos_ids)

  @property
  def sequence(self) -> list[int]: return self.prompt + self.new

  def choose(self, logits: np.ndarray, from_decode: bool) -> TokenStep:
    """The next token from the logits after the sequence (from_decode: a decode step's, not the prefill's)."""
    allowed = logits if self.constraint is None else self.constraint.mask(logits)
    token = choose(process(allowed, self.cfg, self.prompt + self.new, len(self.new), self._eos), self.cfg, self.rng)
    self.timer.token_chosen()
    self.decoded += from_decode
    if token in self.stopping.eos_ids:
      self.finish_reason = "stop"
      return TokenStep(self.row, None, "stop", **self.timer.rates(self.decoded), logits=logits)
    self.new.append(token)
    if self.constraint is not None: self.constraint.advance(token)
    self.finish_reason = self.stopping.reason(self.prompt, self.new)
    if self.finish_reason is None and self.constraint is not None and self.constraint.done(): self.finish_reason = "stop"

    return TokenStep(self.row, token, self.finish_reason, **self.timer.rates(self.decoded), logits=logits)

  def nothing_to_generate(self) -> TokenStep:
    """The only step of a request for max_new_tokens=0."""
    self.finish_reason = "length"
    return TokenStep(self.row, None, "length", **self.timer.rates(0))


def generations(steps: Iterator[TokenStep], prompts: list[list[int]], tokenizer: Tokenizer | None,
                stop: Sequence[str]) -> list[Generation]:
  """The records of `token_steps` collected into one Generation per prompt (text cut before a stop string)."""
  new: list[list[int]] = [[] for _ in prompts]
  out: list[Generation | None] = [None] * len(prompts)
  for s in steps:
    if s.token is not None: new[s.row].append(s.token)
    if s.finish_reason is not None:
      text = decode_continuation(tokenizer, prompts[s.row], new[s.row])
      if (cut := stop_index(text, stop)) >= 0: text = text[:cut]
      out[s.row] = Generation(text=text, tokens=new[s.row], prompt_tokens=list(prompts[s.row]),
                              finish_reason=s.finish_reason, prefill_tokens_per_s=s.prefill_tokens_per_s,
                              decode_tokens_per_s=s.decode_tokens_per_s, time_to_first_token_s=s.time_to_first_token_s)
  return out


def eos_id_set(eos: int | Sequence[int] | None) -> set[int]:
  if eos is None: return set()
  return {int(eos)} if isinstance(eos, (int, np.integer)) else {int(e) for e in eos}


def stop_index(text: str, stops: Sequence[str]) -> int:
  """Where the earliest stop string begins in text, or -1."""
  return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def decode_continuation(tokenizer: Tokenizer | None, prompt: Sequence[int], new: Sequence[int]) -> str:
  """The text of `new` as it continues the prompt: decoded with the last prompt token as context, so
  SentencePiece keeps the leading space it would drop at the start of a text."""
  if tokenizer is None: return ""
  ctx = list(prompt[-1:])
  head = tokenizer.decode(ctx)
  full = tokenizer.decode(ctx + list(new))
  return full[len(head):] if full.startswith(head) else tokenizer.decode(list(new))


class TextPieces:
  """The text of one sequence as its steps arrive: `add(step)` returns the piece that became final with it.

  Text is decoded from the whole new-token list each step (with the last prompt token as context, so
  SentencePiece's leading space survives), and a piece is released only when it is complete UTF-8 and can no
  longer turn into a stop string, so the pieces always concatenate to the final text.
  """

  def __init__(self, prompt: list[int], tokenizer: Tokenizer | None, stop: Sequence[str]):
    self.prompt, self.tokenizer, self.stop = prompt, tokenizer, list(stop)
    self.new: list[int] = []
    self.emitted, self.last = 0, None

  def text(self) -> str:
    """The text so far, cut before a stop string."""
    text = decode_continuation(self.tokenizer, self.prompt, self.new)
    return text[:cut] if (cut := stop_index(text, self.stop)) >= 0 else text

  def _held_back(self, text: str) -> int:
    """Characters at the end of text that might be the start of a stop string or of a multi-byte character."""
    hold = 0
    for s in self.stop:
      for n in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:n]): hold = max(hold, n); break
    return hold

  def add(self, step: TokenStep) -> str:
    self.last = step
    if step.token is not None: self.new.append(step.token)
    text = self.text()
    ready = len(text) if step.finish_reason else len(text) - self._held_back(text)
    if not step.finish_reason:   # hold back an incomplete UTF-8 sequence
      while ready > self.emitted and text[ready - 1] == "\ufffd": ready -= 1
    piece = text[self.emitted:ready] if ready > self.emitted else ""
    self.emitted = max(self.emitted, ready)
    return piece

  def generation(self) -> Generation:
    last = self.last
    timings = {k: getattr(last, k) for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s")} \
      if last else {}
    return Generation(text=self.text(), tokens=list(self.new), prompt_tokens=list(self.prompt),
                      finish_reason=(last.finish_reason if last else None) or "length", **timings)


class TextStream:
  """Iterates the generated text of one sequence in pieces (see TextPieces); `.generation` holds the result once
  iteration is done. Breaking out of the iteration closes the token steps."""

  def __init__(self, steps: Iterator[TokenStep], prompt: list[int], tokenizer: Tokenizer | None, stop: list[str]):
    self._steps, self.prompt = steps, prompt
    self._pieces = TextPieces(prompt, tokenizer, stop)
    self.text, self.generation = "", None

  @property
  def new(self) -> list[int]: return self._pieces.new

  def __iter__(self) -> Iterator[str]:
    try:
      for step in self._steps:
        if piece := self._pieces.add(step): yield piece
        if step.finish_reason: break
    finally:
      if close := getattr(self._steps, "close", None): close()
    self.generation = self._pieces.generation()
    self.text = self.generation.text
