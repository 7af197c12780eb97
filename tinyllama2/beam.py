"""Hugging Face beam search over a Decoder's batched rows (its own loop; stopping and timing as in generate.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .decoder import Decoder
from .generate import Generation, GenerationConfig, Stopping, Timer, decode_continuation, stop_index
from .sampling import process
from .tokenizer import Tokenizer


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


def beam_search(decoder: Decoder, prompt: list[int], cfg: GenerationConfig,
                stopping: Stopping) -> list[tuple[float, list[int], str]]:
  """Hugging Face beam search: (score, new tokens, finish reason) best first, num_return_sequences of them.

  Processors see log-probabilities (as in HF); a finished beam scores sum_logprobs / generated_len ** length_penalty
  with generated_len counting its eos. The beams run as one batch; surviving beams' cache rows are reordered on
  the device."""
  nb, plen, V = cfg.num_beams, len(prompt), decoder.model.args.vocab_size
  if cfg.max_new_tokens == 0: return [(0.0, [], "length")]
  hyps = _Hypotheses(nb, cfg.length_penalty, cfg.early_stopping)
  seqs = [list(prompt) for _ in range(nb)]
  scores = np.array([0.0] + [-1e9] * (nb - 1))     # only the first beam expands at the first step
  logits = decoder.prefill_rows([prompt] * nb)
  done = False
  eos = sorted(stopping.eos_ids)
  for step in range(cfg.max_new_tokens):
    gen_len = step + 1                              # tokens generated once this step's token is chosen
    cand = np.stack([process(lp, cfg, seq, step, eos) for lp, seq in zip(_log_softmax(logits), seqs)])
    flat = (cand + scores[:, None]).reshape(-1)
    top = np.argsort(-flat, kind="stable")[:max(2, 1 + len(eos)) * nb]
    nxt = []
    for rank, idx in enumerate(top):
      beam, tok = divmod(int(idx), V)
      if tok in stopping.eos_ids:
        if rank < nb: hyps.add(seqs[beam][plen:], float(flat[idx]), gen_len, "stop")
      else: nxt.append((beam, tok, float(flat[idx])))
      if len(nxt) == nb: break
    done = hyps.is_done(float(flat[top[0]]), gen_len, cfg.max_new_tokens)
    parents = [b for b, _, _ in nxt]
    seqs = [seqs[b] + [t] for b, t, _ in nxt]
    scores = np.array([s for _, _, s in nxt])
    if done or step == cfg.max_new_tokens - 1 or plen + gen_len >= stopping.max_seq_len: break
    logits = decoder.step_rows([t for _, t, _ in nxt], plen + step, parents)
  if not done:
    for seq, s in zip(seqs, scores): hyps.add(seq[plen:], float(s), len(seq) - plen, "length")
  return sorted(hyps.items, key=lambda h: -h[0])[:cfg.num_return_sequences]


def beam_generations(decoder: Decoder, prompt: list[int], cfg: GenerationConfig, stopping: Stopping,
                     tokenizer: Tokenizer | None) -> list[Generation]:
  """`beam_search` as Generations, best first; text cut before a stop string (finish reason "stop" then)."""
  timer = Timer(len(prompt) * cfg.num_beams)
  out = []
  for score, tokens, reason in beam_search(decoder, prompt, cfg, stopping):
    text = decode_continuation(tokenizer, prompt, tokens)
    if (cut := stop_index(text, stopping.stop)) >= 0: text, reason = text[:cut], "stop"
    out.append(Generation(text=text, tokens=tokens, prompt_tokens=list(prompt), finish_reason=reason, score=score))
  decode_rate = timer.rates(cfg.num_beams * max(len(g.tokens) for g in out))["decode_tokens_per_s"]
  for g in out: g.decode_tokens_per_s = decode_rate
  return out
