"""Prefill + JIT decode loop: greedy and seeded sampling, stop strings, streaming text, timings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from tinygrad import Context, Tensor

from .model import Transformer
from .sampling import SamplingParams, choose, process
from .tokenizer import Tokenizer


@dataclass
class GenerationConfig:
  """Defaults and meanings follow Hugging Face's GenerationConfig."""
  max_new_tokens: int = 256
  sampling: SamplingParams = field(default_factory=SamplingParams)
  eos_token_id: int | list[int] | None = None   # None: the model's own
  stop: list[str] = field(default_factory=list)
  seed: int | None = None

  def validate(self) -> None:
    self.sampling.validate()
    if self.max_new_tokens < 0: raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class Generation:
  text: str
  tokens: list[int]                  # the new ids, without the eos that ended generation
  prompt_tokens: list[int]
  finish_reason: str                 # "stop" (eos or stop string) or "length"
  prefill_tokens_per_s: float = 0.0
  decode_tokens_per_s: float = 0.0
  time_to_first_token_s: float = 0.0


class Decoder:
  """Runs a Transformer over a token stream: chunked prefill, then one JIT-compiled step per token.

  `beam` > 0 compiles the decode step with tinygrad's BEAM search. Its results live in tinygrad's on-disk cache,
  so a `tinyllama2 tune` run pays the search once; without a tuned cache the first step searches (slowly).
  """

  def __init__(self, model: Transformer, prefill_chunk: int = 256, beam: int = 0):
    self.model, self.prefill_chunk, self.beam = model, prefill_chunk, beam

  def _check_len(self, n: int) -> None:
    if n > self.model.max_seq_len:
      raise ValueError(f"sequence of {n} tokens is longer than max_seq_len {self.model.max_seq_len}; shorten the "
                       "prompt or load the model with a larger max_seq_len")

  def prefill(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
    """Fill the cache from position 0; logits of the last token [vocab] (or of every token [T, vocab])."""
    if not len(ids): raise ValueError("the prompt is empty: at least one token (e.g. BOS) is needed")
    self._check_len(len(ids))
    if not all_logits: return self._prefill_compiled(list(ids))
    rt, out = self.model._runtime, []
    for start in range(0, len(ids), self.prefill_chunk):
      chunk = Tensor([list(ids[start:start + self.prefill_chunk])], dtype="int32", device=self.model.device)
      out.append(self.model.prefill(chunk, rt.pos_var.bind(start)).realize().numpy()[0])
    return np.concatenate(out)

  def _prefill_compiled(self, ids: list[int]) -> np.ndarray:
    """Chunks padded to a power of two run as captured graphs. Padding is harmless: padded positions come
    after every real token (the causal mask hides them) and decoding overwrites their cache rows first."""
    rt, logits = self.model._runtime, None
    for start in range(0, len(ids), self.prefill_chunk):
      piece = ids[start:start + self.prefill_chunk]
      length = min(self.prefill_chunk, 1 << (len(piece) - 1).bit_length())
      if start + length > self.model.max_seq_len: length = len(piece)
      toks = Tensor([piece + [0] * (length - len(piece))], dtype="int32", device=self.model.device)
      logits = rt.prefill_jit(length)(toks, rt.pos_var.bind(start), rt.last_var.bind(len(piece) - 1))
    return logits.numpy()[0]

  def step(self, token: int, pos: int) -> np.ndarray:
    """Feed `token` at position `pos`; logits for the next position [vocab]."""
    self._check_len(pos + 1)
    rt = self.model._runtime
    with Context(BEAM=self.beam):
      return rt.decode_jit(rt.tok_var.bind(int(token)), rt.pos_var.bind(pos)).numpy()[0]


def _eos_ids(eos: int | Sequence[int] | None) -> set[int]:
  if eos is None: return set()
  return {int(eos)} if isinstance(eos, (int, np.integer)) else {int(e) for e in eos}


class TextStream:
  """Iterates the generated text in pieces; `.generation` holds the result once the iteration is done.

  Text is decoded from the whole new-token list each step (with the last prompt token as context, so
  SentencePiece's leading space survives), and a piece is released only when it is complete UTF-8 and can no
  longer turn into a stop string, so the pieces always concatenate to the final text.
  """

  def __init__(self, tokens: Iterator[int], prompt: list[int], tokenizer: Tokenizer | None, stop: list[str],
               finish: dict):
    self._tokens, self.prompt, self.tokenizer, self.stop, self._finish = tokens, prompt, tokenizer, stop, finish
    self.new: list[int] = []
    self.text, self.generation = "", None

  def _decode(self) -> str:
    if self.tokenizer is None: return ""
    ctx = self.prompt[-1:]
    head = self.tokenizer.decode(ctx)
    full = self.tokenizer.decode(ctx + self.new)
    return full[len(head):] if full.startswith(head) else self.tokenizer.decode(self.new)

  def _held_back(self, text: str) -> int:
    """Characters at the end of text that might be the start of a stop string or of a multi-byte character."""
    hold = 0
    for s in self.stop:
      for n in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:n]): hold = max(hold, n); break
    return hold

  def __iter__(self) -> Iterator[str]:
    emitted, reason = 0, "length"
    for tok in self._tokens:
      self.new.append(tok)
      text = self._decode()
      cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
      if cut >= 0:
        text, reason = text[:cut], "stop"
        if emitted < len(text): yield text[emitted:]
        emitted = len(text)
        self._tokens.close()   # finish the generator so it records its timings
        break
      ready = len(text) - self._held_back(text)
      while ready > 0 and text[ready - 1] == "\ufffd": ready -= 1   # an incomplete UTF-8 sequence
      if ready > emitted:
        yield text[emitted:ready]
        emitted = ready
    else:
      reason = self._finish.get("reason", "length")
      text = self._decode()
      if emitted < len(text): yield text[emitted:]
    self.text = text
    self.generation = Generation(text=text, tokens=list(self.new), prompt_tokens=list(self.prompt), finish_reason=reason,
                                 **self._finish.get("timings", {}))


def generate_tokens(decoder: Decoder, prompt: list[int], cfg: GenerationConfig, eos_ids: set[int],
                    finish: dict) -> Iterator[int]:
  """Yields new token ids; records the finish reason and timings in `finish`."""
  cfg.validate()
  rng = np.random.Generator(np.random.PCG64(cfg.seed))
  t0 = time.perf_counter()
  t_first, ttft, n_new = t0, 0.0, 0
  finish["reason"] = "length"
  if cfg.max_new_tokens == 0: return
  try:
    seen = list(prompt)
    logits = decoder.prefill(prompt)
    t_first = time.perf_counter()
    while True:
      token = choose(process(logits, cfg.sampling, seen), cfg.sampling, rng)
      if n_new == 0: ttft = time.perf_counter() - t0
      n_new += 1
      seen.append(token)
      if token in eos_ids:
        finish["reason"] = "stop"
        break
      yield token
      if n_new >= cfg.max_new_tokens or len(seen) >= decoder.model.max_seq_len: break
      logits = decoder.step(token, len(seen) - 1)
  finally:   # also when the consumer stops early (a stop string) and closes this generator
    t_end = time.perf_counter()
    finish["timings"] = dict(prefill_tokens_per_s=len(prompt) / max(t_first - t0, 1e-9),
                             decode_tokens_per_s=(n_new - 1) / (t_end - t_first) if n_new > 1 else 0.0,
                             time_to_first_token_s=ttft)
