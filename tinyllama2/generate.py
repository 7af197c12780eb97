"""Prefill + JIT decode loop: greedy and seeded sampling, stop strings, streaming text, timings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from tinygrad import Context, Tensor, dtypes
from tinygrad.uop.ops import Ops

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
  num_beams: int = 1
  length_penalty: float = 1.0
  early_stopping: bool | str = False            # True, False or "never", as in Hugging Face
  num_return_sequences: int = 1

  def validate(self) -> None:
    self.sampling.validate()
    if self.max_new_tokens < 0: raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
    if self.num_beams < 1: raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if self.early_stopping not in (True, False, "never"):
      raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
    limit = self.num_beams if self.num_beams > 1 or not self.sampling.do_sample else None
    if self.num_return_sequences < 1 or (limit is not None and self.num_return_sequences > limit):
      raise ValueError(f"num_return_sequences={self.num_return_sequences} must be between 1 and num_beams={self.num_beams}"
                       " (greedy search returns one sequence; sampling may return any number)")
    if self.num_beams > 1 and self.sampling.do_sample:
      raise ValueError("beam search with do_sample=True (beam sampling) is not supported; use one or the other")


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


def to_numpy(t: Tensor) -> np.ndarray:
  """A realized tensor's values as a new numpy array. Host-memory devices (the CPU) are read in place after a
  synchronize: Tensor.numpy() schedules a copy program for every call, which on the CPU costs about as much as
  decoding a small model's token (~2 ms for stories15M's logits)."""
  if t.dtype != dtypes.float32 or not isinstance(t.device, str) or t.device.split(":")[0] != "CPU": return t.numpy()
  base = t.uop.src[0] if t.uop.op is Ops.RESHAPE else t.uop   # a reshape keeps the buffer's order
  whole = base.op is Ops.BUFFER and base.is_realized and base.buffer.size == t.numel()
  buf = base.buffer if whole else t._buffer()
  return np.frombuffer(buf.as_memoryview(force_zero_copy=True), dtype=np.float32).reshape(t.shape).copy()


class Decoder:
  """Runs a Transformer over a token stream: chunked prefill, then one JIT-compiled step per token.

  `beam` > 0 compiles the decode step with tinygrad's BEAM search. Its results live in tinygrad's on-disk cache,
  so a `tinyllama2 tune` run pays the search once; without a tuned cache the first step searches (slowly).
  """

  def __init__(self, model: Transformer, prefill_chunk: int = 256, beam: int = 0):
    self.model, self.prefill_chunk, self.beam = model, prefill_chunk, beam
    self._bias: Tensor | None = None   # [rows, max_seq_len] key bias of the batched rows (left padding)

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
    return to_numpy(logits)[0]

  def step(self, token: int, pos: int) -> np.ndarray:
    """Feed `token` at position `pos`; logits for the next position [vocab]."""
    self._check_len(pos + 1)
    rt = self.model._runtime
    with Context(BEAM=self.beam):
      return to_numpy(rt.decode(int(token), pos))[0]

  # ---- batched rows (beam search, batches of prompts) -------------------------------------------------
  PAD_BIAS = -1e9   # finite, so a padding query (which sees only padding) still gets a finite softmax

  def prefill_rows(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Prompts left-padded to one length into one cache row each; the logits of each row's last token [B, vocab].
    RoPE is relative, so a row shifted right by its padding attends exactly as it would alone."""
    if any(not len(r) for r in rows): raise ValueError("a prompt is empty: at least one token (e.g. BOS) is needed")
    length = max(len(r) for r in rows)
    self._check_len(length)
    rt, dev, logits = self.model._runtime, self.model.device, None
    rt.caches(len(rows))
    bias = np.zeros((len(rows), self.model.max_seq_len), dtype=np.float32)
    for b, r in enumerate(rows): bias[b, :length - len(r)] = self.PAD_BIAS
    self._bias = Tensor(bias, device=dev).realize()
    padded = [[0] * (length - len(r)) + list(r) for r in rows]
    for start in range(0, length, self.prefill_chunk):
      chunk = Tensor([p[start:start + self.prefill_chunk] for p in padded], dtype="int32", device=dev)
      h = self.model.forward_hidden(self.model.embed(chunk), rt.pos_var.bind(start), key_bias=self._bias)
      logits = self.model.logits_from_hidden(h[:, -1:, :]).realize()
    return logits.numpy()[:, 0, :]

  def step_rows(self, tokens: Sequence[int], pos: int, parents: Sequence[int] | None = None) -> np.ndarray:
    """Cache rows are first reordered to `parents` (beam search: every row holds the same prompt, so the padding
    bias needs no reordering), then row b is fed tokens[b] at cache column `pos`; logits [rows, vocab]."""
    self._check_len(pos + 1)
    rt, dev = self.model._runtime, self.model.device
    if parents is not None and list(parents) != list(range(len(parents))):
      rt.reorder_jit(Tensor(list(parents), dtype="int32", device=dev))
    with Context(BEAM=self.beam):
      toks = Tensor([[int(t)] for t in tokens], dtype="int32", device=dev)
      return to_numpy(rt.batch_jit(toks, rt.pos_var.bind(pos), self._bias))


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@dataclass
class _Hypotheses:
  """The best finished beams, as Hugging Face's BeamHypotheses keeps them."""
  num_beams: int
  length_penalty: float
  early_stopping: bool | str
  items: list = field(default_factory=list)   # (score, tokens, finish_reason)

  def add(self, tokens: list[int], sum_logprobs: float, generated_len: int, reason: str) -> None:
    score = sum_logprobs / (generated_len ** self.length_penalty)
    if len(self.items) < self.num_beams or score > self.worst:
      self.items.append((score, tokens, reason))
      if len(self.items) > self.num_beams: self.items.remove(min(self.items, key=lambda h: h[0]))

  @property
  def worst(self) -> float: return min(h[0] for h in self.items) if self.items else float("inf")

  def is_done(self, best_sum_logprobs: float, generated_len: int, max_generated: int) -> bool:
    if len(self.items) < self.num_beams: return False
    if self.early_stopping is True: return True
    length = max_generated if self.early_stopping == "never" and self.length_penalty > 0 else generated_len
    return self.worst >= best_sum_logprobs / (length ** self.length_penalty)


def beam_search(decoder: Decoder, prompt: list[int], cfg: GenerationConfig, eos_ids: set[int]) -> list[tuple[float, list[int], str]]:
  """Hugging Face beam search: (score, new tokens, finish reason) best first, num_return_sequences of them.

  Processors see log-probabilities (as in HF); a finished beam scores sum_logprobs / generated_len ** length_penalty
  with generated_len counting its eos. The beams run as one batch; surviving beams' cache rows are reordered on device."""
  nb, plen, V = cfg.num_beams, len(prompt), decoder.model.args.vocab_size
  if cfg.max_new_tokens == 0: return [(0.0, [], "length")]
  hyps = _Hypotheses(nb, cfg.length_penalty, cfg.early_stopping)
  seqs = [list(prompt) for _ in range(nb)]
  scores = np.array([0.0] + [-1e9] * (nb - 1))     # only the first beam expands at the first step
  logits = decoder.prefill_rows([prompt] * nb)
  done = False
  eos = sorted(eos_ids)
  for step in range(cfg.max_new_tokens):
    gen_len = step + 1                              # tokens generated once this step's token is chosen
    cand = np.stack([process(lp, cfg.sampling, seq, step, eos) for lp, seq in zip(_log_softmax(logits), seqs)])
    flat = (cand + scores[:, None]).reshape(-1)
    top = np.argsort(-flat, kind="stable")[:max(2, 1 + len(eos)) * nb]
    nxt = []
    for rank, idx in enumerate(top):
      beam, tok = divmod(int(idx), V)
      if tok in eos_ids:
        if rank < nb: hyps.add(seqs[beam][plen:], float(flat[idx]), gen_len, "stop")
      else: nxt.append((beam, tok, float(flat[idx])))
      if len(nxt) == nb: break
    done = hyps.is_done(float(flat[top[0]]), gen_len, cfg.max_new_tokens)
    parents = [b for b, _, _ in nxt]
    seqs = [seqs[b] + [t] for b, t, _ in nxt]
    scores = np.array([s for _, _, s in nxt])
    if done or step == cfg.max_new_tokens - 1 or plen + gen_len >= decoder.model.max_seq_len: break
    logits = decoder.step_rows([t for _, t, _ in nxt], plen + step, parents)
  if not done:
    for seq, s in zip(seqs, scores): hyps.add(seq[plen:], float(s), len(seq) - plen, "length")
  return sorted(hyps.items, key=lambda h: -h[0])[:cfg.num_return_sequences]


def generate_batch(decoder: Decoder, prompts: list[list[int]], cfg: GenerationConfig, eos_ids: set[int],
                   tokenizer: Tokenizer | None) -> list[Generation]:
  """Several prompts at once, left-padded into one batch; each row stops on its own (eos, stop string, length)
  and gets the tokens it would get alone (sampling: each row draws from its own stream seeded with cfg.seed)."""
  cfg.validate()
  B, length = len(prompts), max(len(p) for p in prompts)
  rngs = [np.random.Generator(np.random.PCG64(cfg.seed)) for _ in prompts]
  eos = sorted(eos_ids)
  new: list[list[int]] = [[] for _ in prompts]
  reasons: list[str | None] = [None] * B
  t0 = time.perf_counter()
  logits = decoder.prefill_rows(prompts)
  t_first = time.perf_counter()
  limit = min(cfg.max_new_tokens, decoder.model.max_seq_len - length)
  for step in range(limit):
    feed = []
    for b in range(B):
      if reasons[b] is not None:
        feed.append(0)
        continue
      seen = prompts[b] + new[b]
      tok = choose(process(logits[b], cfg.sampling, seen, len(new[b]), eos), cfg.sampling, rngs[b])
      feed.append(tok)
      if tok in eos_ids:
        reasons[b] = "stop"
        continue
      new[b].append(tok)
      if cfg.stop:
        if stop_index(decode_continuation(tokenizer, prompts[b], new[b]), cfg.stop) >= 0: reasons[b] = "stop"
    if all(r is not None for r in reasons) or step == limit - 1: break
    logits = decoder.step_rows(feed, length + step)
  t_end = time.perf_counter()
  out = []
  n_decoded = sum(len(n) for n in new)
  for b in range(B):
    text = decode_continuation(tokenizer, prompts[b], new[b])
    if (cut := stop_index(text, cfg.stop)) >= 0: text = text[:cut]
    out.append(Generation(text=text, tokens=new[b], prompt_tokens=list(prompts[b]), finish_reason=reasons[b] or "length",
                          prefill_tokens_per_s=sum(map(len, prompts)) / max(t_first - t0, 1e-9),
                          decode_tokens_per_s=n_decoded / max(t_end - t_first, 1e-9), time_to_first_token_s=t_first - t0))
  return out


def _eos_ids(eos: int | Sequence[int] | None) -> set[int]:
  if eos is None: return set()
  return {int(eos)} if isinstance(eos, (int, np.integer)) else {int(e) for e in eos}


def stop_index(text: str, stops: Sequence[str]) -> int:
  """Where the earliest stop string begins in text, or -1."""
  return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def decode_continuation(tokenizer: Tokenizer | None, prompt: list[int], new: list[int]) -> str:
  """The text of `new` as it continues the prompt: decoded with the last prompt token as context, so
  SentencePiece keeps the leading space it would drop at the start of a text."""
  if tokenizer is None: return ""
  ctx = prompt[-1:]
  head = tokenizer.decode(ctx)
  full = tokenizer.decode(ctx + new)
  return full[len(head):] if full.startswith(head) else tokenizer.decode(new)


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

  def _decode(self) -> str: return decode_continuation(self.tokenizer, self.prompt, self.new)

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
      cut = stop_index(text, self.stop)
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
                    finish: dict, rng: np.random.Generator | None = None) -> Iterator[int]:
  """Yields new token ids; records the finish reason and timings in `finish`. Sampling draws from `rng`
  (default: a PCG64 generator seeded with cfg.seed, so a seed gives the same tokens in every process)."""
  cfg.validate()
  rng = rng or np.random.Generator(np.random.PCG64(cfg.seed))
  t0 = time.perf_counter()
  t_first, ttft, n_new = t0, 0.0, 0
  finish["reason"] = "length"
  if cfg.max_new_tokens == 0: return
  eos = sorted(eos_ids)
  try:
    seen = list(prompt)
    logits = decoder.prefill(prompt)
    t_first = time.perf_counter()
    while True:
      token = choose(process(logits, cfg.sampling, seen, n_new, eos), cfg.sampling, rng)
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
