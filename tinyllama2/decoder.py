"""`Decoder`: runs a Transformer over token streams — the owner of its KV caches and compiled steps.

Prefill runs in chunks padded to a power of two, each length one captured graph; decoding one token is one
captured graph with the token and the position as bound Variables, so generating never recompiles. The one-token
step goes through the fused kernels of `ops.fused_decode` where the model's layers allow (opt-in, on by default),
else through `Transformer.decode_step`. Graphs are recaptured when the model says its weights changed
(`Transformer.weights_changed`). The decoder remembers which tokens its one-row cache holds, so a prompt that shares
a prefix with them (the next turn of a chat, the same prompt again) prefills only the rest, as llama.cpp's
`cache_prompt` does.
"""
from __future__ import annotations

import threading
import warnings
from typing import Sequence

import numpy as np
from tinygrad import Context, Tensor, TinyJit, Variable

from .model import KVCache, Transformer
from .ops import cpu, fused_decode
from .runtime.readback import to_numpy
from .runtime.replay import Replay


class Decoder:
  """`beam` > 0 compiles the decode step with tinygrad's BEAM search. Its results live in tinygrad's on-disk cache,
  so a `tinyllama2 tune` run pays the search once; without a tuned cache the first step searches (slowly).
  `fused=False` keeps the decode step in tinygrad's layer-by-layer graph; `replay=False` leaves a captured step to
  TinyJit's own replay. One sequence at a time: callers that share a decoder between threads or interleaved
  streams take `lock` around each call and check `holds` before continuing a sequence."""

  PAD_BIAS = -1e9   # finite, so a padding query (which sees only padding) still gets a finite softmax

  def __init__(self, model: Transformer, prefill_chunk: int = 256, beam: int = 0, fused: bool = True,
               replay: bool = True):
    self.model, self.prefill_chunk, self.beam, self.fused, self.replay = model, prefill_chunk, beam, fused, replay
    self.pos_var = Variable("start_pos", 0, model.max_seq_len - 1)
    self.tok_var = Variable("token", 0, model.args.vocab_size - 1)
    self.last_var = Variable("last", 0, model.max_seq_len - 1)
    self._caches: list[KVCache] | None = None
    self.held: list[int] = []      # tokens whose keys and values cache row 0 holds, from position 0
    self._reusable = True          # False while they were rotated for one prompt's length (dynamic NTK)
    self.prefilled = 0             # tokens run through prefill so far (padding not counted)
    self.lock = threading.RLock()
    self._bias: Tensor | None = None   # [rows, max_seq_len] key bias of the batched rows (left padding)
    self._version = model.version
    self._decode_jit = TinyJit(lambda tok, pos: self.decode_graph(tok, pos).realize())
    self._replay: Replay | None | bool = None   # False: the captured step is not one Replay handles
    self._batch_jit = TinyJit(lambda toks, pos, bias: model.decode_batch(toks, pos, bias, self._caches).realize())
    self._reorder_jit = TinyJit(self._reorder)
    self._prefill_jits: dict[int, TinyJit] = {}

  # ---- caches and compiled graphs ----------------------------------------------------------------
  def caches(self, batch: int) -> list[KVCache]:
    """The KV caches for `batch` rows (allocated anew, and graphs recaptured, when the batch size changes)."""
    if self._caches is None or self._caches[0].k.shape[0] != batch:
      self._caches = self.model.new_caches(batch)
      self.invalidate()
    return self._caches

  def invalidate(self) -> None:
    """Forget every captured graph (the next call of each captures it again) and what the cache holds."""
    self._decode_jit.reset()
    self._replay = None
    self._batch_jit.reset()
    self._reorder_jit.reset()
    self._prefill_jits.clear()
    self._version = self.model.version
    self.held = []   # keys and values of older weights

  def _fresh(self) -> None:
    if self._version != self.model.version: self.invalidate()

  def decode_graph(self, token: Variable, start_pos: Variable) -> Tensor:
    """The one-token step as a lazy graph (logits [1, vocab]): fused kernels where the model allows, else the model's
    own decode_step. Runs outside any JIT too (a kernel-by-kernel step for profiles and kernel counts)."""
    caches = self.caches(1)
    if self.fused and (plan := fused_decode.plan(self.model)) is not None:
      if (logits := fused_decode.decode_step(self.model, plan, token, start_pos, caches)) is not None: return logits
    return self.model.decode_step(token, start_pos, caches)

  @property
  def replaying(self) -> bool:
    """Whether the captured one-token step runs through `Replay`."""
    return bool(self._replay)

  def decode_logits(self, token: int, pos: int) -> Tensor:
    """Logits [1, vocab] of `token` at `pos`: the compiled step, replayed through `Replay` once captured where it
    can be (less host Python per token)."""
    self._fresh()
    self.caches(1)
    if self._replay is None and self._decode_jit.captured is not None and self.replay:
      self._replay = Replay.of(self._decode_jit, (self.tok_var, self.pos_var)) or False
    if self._replay: return self._replay(token, pos)
    args = (self.tok_var.bind(token), self.pos_var.bind(pos))
    try: return self._decode_jit(*args)
    except Exception as e:   # the GPU kernels are ours, tinygrad's graph is not: a device that can't build ours decodes
      if self._decode_jit.captured is not None or not self.fused or cpu.available(self.model.device): raise
      warnings.warn(f"the fused decode kernels failed on {self.model.device} ({type(e).__name__}: {str(e)[:300]}); "
                    "decoding with tinygrad's generic kernels instead (slower)", stacklevel=3)
      self.fused = False
      self._decode_jit.reset()
      return self._decode_jit(*args)

  def _prefill_jit(self, length: int) -> TinyJit:
    if length not in self._prefill_jits:
      prefill = lambda toks, pos, last: self.model.prefill_last(toks, pos, last, self._caches).realize()
      self._prefill_jits[length] = TinyJit(prefill)
    return self._prefill_jits[length]

  def _reorder(self, rows: Tensor) -> None:
    """Row b of every KV cache becomes old row rows[b] (beam search keeps the surviving beams' histories)."""
    for c in self._caches:
      c.k.assign(c.k[rows].contiguous())
      c.v.assign(c.v[rows].contiguous())
    Tensor.realize(*[t for c in self._caches for t in (c.k, c.v)])

  # ---- one sequence ----------------------------------------------------------------------------
  def check_length(self, n: int) -> None:
    if n > self.model.max_seq_len:
      raise ValueError(f"sequence of {n} tokens is longer than max_seq_len {self.model.max_seq_len}; shorten the "
                       "prompt or load the model with a larger max_seq_len")

  def forget(self) -> None:
    """Forget what the cache holds: the next prefill runs every token (a benchmark's prefill, for one)."""
    self.held = []

  def holds(self, ids: Sequence[int]) -> bool:
    """Whether cache row 0 holds the keys and values of exactly these tokens (and perhaps more after them), computed
    with the model's current weights."""
    self._fresh()
    return len(self.held) >= len(ids) and self.held[:len(ids)] == list(ids)

  def prefill(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
    """Fill the cache with ids; logits of the last token [vocab]. What the cache already holds of ids' prefix is
    kept (at least the last token is run). all_logits: a full forward from position 0, logits of every token
    [T, vocab]."""
    if not len(ids): raise ValueError("the prompt is empty: at least one token (e.g. BOS) is needed")
    self.check_length(len(ids))
    self._fresh()
    caches, ids = self.caches(1), [int(i) for i in ids]
    rope = self.model.prompt_rope(len(ids))   # dynamic NTK past the trained context: all chunks rotate alike
    if not all_logits and rope is None:
      logits = self._prefill_compiled(ids, self._common_prefix(ids) if self._reusable else 0)
      self._reusable = True
      return logits
    out = []
    for start in range(0, len(ids), self.prefill_chunk):
      chunk = Tensor([ids[start:start + self.prefill_chunk]], dtype="int32", device=self.model.device)
      out.append(self.model.prefill(chunk, self.pos_var.bind(start), caches, rope=rope).realize().numpy()[0])
    # keys rotated for this prompt's length alone are continued by decode steps, never reused by another prompt
    self.held, self.prefilled, self._reusable = ids, self.prefilled + len(ids), rope is None
    return np.concatenate(out) if all_logits else out[-1][-1]

  def _common_prefix(self, ids: list[int]) -> int:
    """How many leading tokens of ids the cache holds already, at most len(ids) - 1."""
    n, limit = 0, min(len(self.held), len(ids) - 1)
    while n < limit and self.held[n] == ids[n]: n += 1
    return n

  def _prefill_compiled(self, ids: list[int], begin: int) -> np.ndarray:
    """ids[begin:] at positions begin.., in chunks padded to a power of two that run as captured graphs. Padding is
    harmless: padded positions come after every real token (the causal mask hides them) and are not held."""
    logits = None
    for start in range(begin, len(ids), self.prefill_chunk):
      piece = ids[start:start + self.prefill_chunk]
      length = min(self.prefill_chunk, 1 << (len(piece) - 1).bit_length())
      if start + length > self.model.max_seq_len: length = len(piece)
      toks = Tensor([piece + [0] * (length - len(piece))], dtype="int32", device=self.model.device)
      logits = self._prefill_jit(length)(toks, self.pos_var.bind(start), self.last_var.bind(len(piece) - 1))
    self.held, self.prefilled = ids, self.prefilled + len(ids) - begin
    return to_numpy(logits)[0]

  def step(self, token: int, pos: int) -> np.ndarray:
    """Feed `token` at position `pos` (after the pos tokens the cache holds); logits for the next position [vocab]."""
    self.check_length(pos + 1)
    self._fresh()
    if pos > len(self.held):
      raise ValueError(f"cannot feed position {pos}: the cache holds {len(self.held)} tokens; prefill the sequence first")
    with Context(BEAM=self.beam):
      logits = to_numpy(self.decode_logits(int(token), pos))[0]
    del self.held[pos:]
    self.held.append(int(token))
    return logits

  # ---- batched rows (beam search, batches of prompts) -------------------------------------------------
  def prefill_rows(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Prompts left-padded to one length into one cache row each; the logits of each row's last token [B, vocab].
    RoPE is relative, so a row shifted right by its padding attends exactly as it would alone."""
    if any(not len(r) for r in rows): raise ValueError("a prompt is empty: at least one token (e.g. BOS) is needed")
    length = max(len(r) for r in rows)
    self.check_length(length)
    self._fresh()
    dev, logits = self.model.device, None
    caches = self.caches(len(rows))
    bias = np.zeros((len(rows), self.model.max_seq_len), dtype=np.float32)
    for b, r in enumerate(rows): bias[b, :length - len(r)] = self.PAD_BIAS
    self._bias = Tensor(bias, device=dev).realize()
    padded = [[0] * (length - len(r)) + list(r) for r in rows]
    rope = self.model.prompt_rope(length)
    for start in range(0, length, self.prefill_chunk):
      chunk = Tensor([p[start:start + self.prefill_chunk] for p in padded], dtype="int32", device=dev)
      h = self.model.forward_hidden(self.model.embed(chunk), self.pos_var.bind(start), caches, key_bias=self._bias,
                                    rope=rope)
      logits = self.model.logits_from_hidden(h[:, -1:, :]).realize()
    return logits.numpy()[:, 0, :]

  def step_rows(self, tokens: Sequence[int], pos: int, parents: Sequence[int] | None = None) -> np.ndarray:
    """Cache rows are first reordered to `parents` (beam search: every row holds the same prompt, so the padding
    bias needs no reordering), then row b is fed tokens[b] at cache column `pos`; logits [rows, vocab]."""
    self.check_length(pos + 1)
    self._fresh()
    dev = self.model.device
    if parents is not None and list(parents) != list(range(len(parents))):
      self._reorder_jit(Tensor(list(parents), dtype="int32", device=dev))
    with Context(BEAM=self.beam):
      toks = Tensor([[int(t)] for t in tokens], dtype="int32", device=dev)
      return to_numpy(self._batch_jit(toks, self.pos_var.bind(pos), self._bias))
