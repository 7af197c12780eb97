"""`Decoder`: runs a Transformer over token streams — the owner of its KV caches and compiled steps.

The caches have a row per slot, one sequence each (the engine's slots); each slot remembers the tokens whose keys
and values it holds, so a prompt that shares a prefix with them (the next turn of a chat, the same prompt again)
prefills only the rest, as llama.cpp's `cache_prompt` does. Prefill runs in chunks padded to a power of two, each
length one captured graph per slot; decoding one token of one slot is one captured graph with the token and the
position as bound Variables, so generating never recompiles. The one-token step goes through the fused kernels of
`ops.fused_decode` where the model's layers allow (opt-in, on by default), else through
`Transformer.decode_step`. Where the kernels have a batched step (`fused_decode.decode_rows`: the CPU), every
decode step, of one slot or several, runs through it instead: one captured graph per batch size (1, 2, 4, ... up to
the slots) serving every slot, whose tokens, positions and rows are written into a buffer the graph reads;
elsewhere the slots step one after another, each through its own one-slot graph. Graphs
are recaptured when the model says its weights changed (`Transformer.weights_changed`).
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tinygrad import Context, Tensor, TinyJit, UOp, Variable, dtypes

from .model import KVCache, Transformer
from .ops import cpu, fused_decode
from .runtime.readback import to_numpy, write_in_place
from .runtime.replay import Replay, capture_at_first_call


SHORT_PREFILL = 8   # prompts (or their unreused rest) shorter than this are fed as decode steps
HIDDEN_MIN_LENGTH = 64   # the shortest padded chunk hidden_states runs


@dataclass
class _RowsStep:
  """The captured step of one batch size: `feed` int32 [3, size] (tokens, positions, cache rows) is its input."""
  feed: Tensor
  jit: TinyJit
  replay: Replay | None | bool = None   # False: the captured step is not one Replay handles


def batch_sizes(slots: int) -> list[int]:
  """The batch sizes that get a compiled step: powers of two below `slots`, and `slots`."""
  return sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots})


class Decoder:
  """`slots`: sequences the caches hold at once. `beam` > 0 compiles the decode step with tinygrad's BEAM search.
  Its results live in tinygrad's on-disk cache, so a `tinyllama2 tune` run pays the search once; without a tuned
  cache the first step searches (slowly). `fused=False` keeps the decode step in tinygrad's layer-by-layer graph;
  `replay=False` leaves a captured step to TinyJit's own replay. Not thread-safe by itself: its owner (the engine)
  takes `lock` around each call."""

  PAD_BIAS = -1e9   # finite, so a padding query (which sees only padding) still gets a finite softmax

  def __init__(self, model: Transformer, slots: int = 1, prefill_chunk: int = 256, beam: int = 0, fused: bool = True,
               replay: bool = True):
    if slots < 1: raise ValueError(f"slots must be at least 1, got {slots}")
    self.model, self.slots, self.prefill_chunk = model, slots, prefill_chunk
    self.beam, self.fused, self.replay = beam, fused, replay
    self.pos_var = Variable("start_pos", 0, model.max_seq_len - 1)
    self.tok_var = Variable("token", 0, model.args.vocab_size - 1)
    self.last_var = Variable("last", 0, model.max_seq_len - 1)
    self.slot_var = Variable("slot", 0, slots - 1)   # the cache row a prefill graph writes: one graph for every slot
    self._caches: list[KVCache] | None = None       # a row per slot
    self._row_caches: list[KVCache] | None = None   # beam search's rows (one prompt, several continuations)
    self.held: list[list[int]] = [[] for _ in range(slots)]   # tokens whose keys and values each slot holds
    self._reusable = [True] * slots   # False while they were rotated for one prompt's length (dynamic NTK)
    self.prefilled = 0                # tokens run through prefill so far (padding not counted)
    self.decode_steps = 0             # compiled decode steps run (a batched step counts once)
    self.lock = threading.RLock()
    self._bias: Tensor | None = None  # [rows, max_seq_len] key bias of beam search's rows
    self._version = model.version
    self._decode_jits = [TinyJit(self._one_step(slot)) for slot in range(slots)]
    self._replays: list[Replay | None | bool] = [None] * slots
    self._rows_steps: dict[int, _RowsStep | None] = {}   # by batch size; None: no batched kernels here
    self._batch_jit = TinyJit(lambda toks, pos, bias: model.decode_batch(toks, pos, bias, self._row_caches).realize())
    self._reorder_jit = TinyJit(self._reorder)
    self._prefill_jits: dict[int, TinyJit] = {}      # by padded chunk length
    self._hidden_jits: dict[int, TinyJit] = {}   # prefills returning hidden states, by padded length
    self._free_hidden_jits: dict[int, TinyJit] = {}   # cache-free forward passes, by padded length

  # ---- caches and compiled graphs ----------------------------------------------------------------
  def slot_caches(self) -> list[KVCache]:
    """The KV caches with a row per slot (allocated on first use)."""
    if self._caches is None: self._caches = self.model.new_caches(self.slots)
    return self._caches

  def _slot_view(self, slot: int) -> list[KVCache]:
    if not 0 <= slot < self.slots: raise ValueError(f"slot {slot} does not exist (the decoder has {self.slots})")
    return [c.row(slot) for c in self.slot_caches()]

  def row_caches(self, batch: int) -> list[KVCache]:
    """Caches of `batch` rows for beam search (allocated anew, and its graphs recaptured, when the width changes)."""
    if self._row_caches is None or self._row_caches[0].k.shape[0] != batch:
      self._row_caches = self.model.new_caches(batch)
      self._batch_jit.reset()
      self._reorder_jit.reset()
    return self._row_caches

  def invalidate(self) -> None:
    """Forget every captured graph (the next call of each captures it again) and what the caches hold."""
    for jit in self._decode_jits: jit.reset()
    self._replays = [None] * self.slots
    self._rows_steps.clear()
    self._batch_jit.reset()
    self._reorder_jit.reset()
    self._prefill_jits.clear()
    self._hidden_jits.clear()
    self._free_hidden_jits.clear()
    self._version = self.model.version
    self.held = [[] for _ in range(self.slots)]   # keys and values of older weights
    self._reusable = [True] * self.slots

  def _fresh(self) -> None:
    if self._version != self.model.version: self.invalidate()

  def _one_step(self, slot: int):
    return lambda tok, pos: self.decode_graph(tok, pos, slot).realize()

  def decode_graph(self, token: Variable, start_pos: Variable, slot: int = 0) -> Tensor:
    """The one-token step of one slot as a lazy graph (logits [1, vocab]): fused kernels where the model allows,
    else the model's own decode_step. Runs outside any JIT too (a kernel-by-kernel step for profiles and kernel
    counts)."""
    caches = self._slot_view(slot)
    if self.fused and (plan := fused_decode.plan(self.model)) is not None:
      if (logits := fused_decode.decode_step(self.model, plan, token, start_pos, caches)) is not None: return logits
    return self.model.decode_step(token, start_pos, caches)

  @property
  def replaying(self) -> bool:
    """Whether the captured one-token step (of slot 0) runs through `Replay`."""
    return bool(self._replays[0])

  def decode_logits(self, token: int, pos: int, slot: int = 0) -> Tensor:
    """Logits [1, vocab] of `token` at `pos` in `slot`: the compiled step, replayed through `Replay` once captured
    where it can be (less host Python per token)."""
    self._fresh()
    jit = self._decode_jits[slot]
    if self._replays[slot] is None and jit.captured is not None and self.replay:
      self._replays[slot] = Replay.of(jit, (self.tok_var, self.pos_var)) or False
    if self._replays[slot]: return self._replays[slot](token, pos)
    args = (self.tok_var.bind(token), self.pos_var.bind(pos))
    try: return jit(*args)
    except Exception as e:   # the GPU kernels are ours, tinygrad's graph is not: a device that can't build ours decodes
      if jit.captured is not None or not self.fused or not isinstance(self.model.device, str) or \
         cpu.available(self.model.device): raise
      warnings.warn(f"the fused decode kernels failed on {self.model.device} ({type(e).__name__}: {str(e)[:300]}); "
                    "decoding with tinygrad's generic kernels instead (slower)", stacklevel=3)
      self.fused = False
      for j in self._decode_jits: j.reset()
      return jit(*args)

  def _rows_step(self, size: int) -> _RowsStep | None:
    """The compiled step for `size` slots at once, or None where the kernels have no batched step."""
    if size not in self._rows_steps:
      plan = fused_decode.plan(self.model) if self.fused else None
      feed = Tensor.zeros(3, size, dtype=dtypes.int32, device=self.model.device).contiguous().realize()
      caches = self.slot_caches()
      graph = lambda: fused_decode.decode_rows(self.model, plan, feed, caches)
      self._rows_steps[size] = None if plan is None or graph() is None else _RowsStep(feed, TinyJit(lambda: graph().realize()))
    return self._rows_steps[size]

  def _prefill_jit(self, length: int) -> TinyJit:
    if length not in self._prefill_jits:
      def prefill(toks: Tensor, pos: UOp, last: UOp, slot: UOp) -> Tensor:
        return self.model.prefill_last(toks, pos, last, [c.row(slot) for c in self.slot_caches()]).realize()
      self._prefill_jits[length] = capture_at_first_call(TinyJit(prefill))
    return self._prefill_jits[length]

  def _reorder(self, rows: Tensor) -> None:
    """Row b of every beam cache becomes old row rows[b] (beam search keeps the surviving beams' histories)."""
    for c in self._row_caches:
      c.k.assign(c.k[rows].contiguous())
      c.v.assign(c.v[rows].contiguous())
    Tensor.realize(*[t for c in self._row_caches for t in (c.k, c.v)])

  # ---- one sequence per slot -------------------------------------------------------------------
  def check_length(self, n: int) -> None:
    if n > self.model.max_seq_len:
      raise ValueError(f"sequence of {n} tokens is longer than max_seq_len {self.model.max_seq_len}; shorten the "
                       "prompt or load the model with a larger max_seq_len")

  def forget(self, slot: int | None = None) -> None:
    """Forget what a slot (default: every slot) holds: its next prefill runs every token (a benchmark's, for one)."""
    for s in range(self.slots) if slot is None else [slot]: self.held[s] = []

  def reusable(self, ids: Sequence[int], slot: int) -> int:
    """How many leading tokens of ids `slot` holds already and a prefill of ids keeps, at most len(ids) - 1."""
    self._fresh()
    held, n = self.held[slot], 0
    if not self._reusable[slot]: return 0
    limit = min(len(held), len(ids) - 1)
    while n < limit and held[n] == ids[n]: n += 1
    return n

  def prefill(self, ids: Sequence[int], all_logits: bool = False, slot: int = 0) -> np.ndarray:
    """Fill `slot` with ids; logits of the last token [vocab]. What the slot already holds of ids' prefix is kept
    (at least the last token is run). all_logits: a full forward from position 0, logits of every token
    [T, vocab]."""
    if not len(ids): raise ValueError("the prompt is empty: at least one token (e.g. BOS) is needed")
    self.check_length(len(ids))
    self._fresh()
    caches, ids = self._slot_view(slot), [int(i) for i in ids]
    rope = self.model.prompt_rope(len(ids))   # dynamic NTK past the trained context: all chunks rotate alike
    if not all_logits and rope is None:
      logits = self._prefill_compiled(ids, self.reusable(ids, slot), slot)
      self._reusable[slot] = True
      return logits
    out = []
    for start in range(0, len(ids), self.prefill_chunk):
      chunk = Tensor([ids[start:start + self.prefill_chunk]], dtype="int32", device=self.model.device)
      out.append(self.model.prefill(chunk, self.pos_var.bind(start), caches, rope=rope).realize().numpy()[0])
    # keys rotated for this prompt's length alone are continued by decode steps, never reused by another prompt
    self.held[slot], self.prefilled, self._reusable[slot] = ids, self.prefilled + len(ids), rope is None
    return np.concatenate(out) if all_logits else out[-1][-1]

  def _prefill_compiled(self, ids: list[int], begin: int, slot: int) -> np.ndarray:
    """ids[begin:] at positions begin.., in chunks padded to a power of two that run as captured graphs. Padding is
    harmless: padded positions come after every real token (the causal mask hides them) and are not held. Fewer
    than SHORT_PREFILL tokens run as decode steps instead: capturing a graph for them would take seconds."""
    if len(ids) - begin < SHORT_PREFILL: return self._prefill_by_steps(ids, begin, slot)
    logits = None
    for start in range(begin, len(ids), self.prefill_chunk):
      piece = ids[start:start + self.prefill_chunk]
      length = min(self.prefill_chunk, 1 << (len(piece) - 1).bit_length())
      if start + length > self.model.max_seq_len: length = len(piece)
      toks = Tensor([piece + [0] * (length - len(piece))], dtype="int32", device=self.model.device)
      logits = self._prefill_jit(length)(toks, self.pos_var.bind(start), self.last_var.bind(len(piece) - 1),
                                         self.slot_var.bind(slot))
    self.held[slot], self.prefilled = ids, self.prefilled + len(ids) - begin
    return to_numpy(logits)[0]

  def hidden_states(self, ids: Sequence[int], slot: int | None) -> np.ndarray:
    """The final-norm hidden states [len(ids), dim] float32 of ids from position 0, prefilled into `slot` (which
    then holds them) in chunks padded to a power of two (at least HIDDEN_MIN_LENGTH: fewer graphs to capture
    when many texts are embedded), each a captured graph as in a prefill. slot None: a cache-free forward pass
    padded alike (tinygrad's graph, ~4x slower; the caches are untouched) for when requests hold every slot."""
    if not len(ids): raise ValueError("the input is empty: at least one token (e.g. BOS) is needed")
    self.check_length(len(ids))
    self._fresh()
    ids = [int(i) for i in ids]
    if slot is None: return self._cache_free_hidden(ids)
    rope = self.model.prompt_rope(len(ids))
    self._slot_view(slot)   # checks the slot
    out = []
    for start in range(0, len(ids), self.prefill_chunk):
      piece = ids[start:start + self.prefill_chunk]
      if rope is not None:   # dynamic NTK past the trained context: eager, as prefill does
        toks = Tensor([piece], dtype="int32", device=self.model.device)
        h = self.model.forward_hidden(self.model.embed(toks), self.pos_var.bind(start), self._slot_view(slot), rope=rope)
      else:
        length = min(self._padded(len(piece)), self.model.max_seq_len - start)
        toks = Tensor([piece + [0] * (length - len(piece))], dtype="int32", device=self.model.device)
        h = self._hidden_jit(length)(toks, self.pos_var.bind(start), self.slot_var.bind(slot))
      out.append(to_numpy(h.float())[0, :len(piece)])
    self.held[slot], self.prefilled, self._reusable[slot] = ids, self.prefilled + len(ids), rope is None
    return np.concatenate(out)

  def _padded(self, n: int) -> int:
    return min(self.prefill_chunk, max(HIDDEN_MIN_LENGTH, 1 << (n - 1).bit_length()))

  def _hidden_jit(self, length: int) -> TinyJit:
    if length not in self._hidden_jits:
      def hidden(toks: Tensor, pos: UOp, slot: UOp) -> Tensor:
        caches = [c.row(slot) for c in self.slot_caches()]
        return self.model.forward_hidden(self.model.embed(toks), pos, caches).float().realize()
      self._hidden_jits[length] = capture_at_first_call(TinyJit(hidden))
    return self._hidden_jits[length]

  def _cache_free_hidden(self, ids: list[int]) -> np.ndarray:
    """Padded to a power of two so that one captured graph serves every length up to it (attention is causal:
    padding after the tokens changes nothing before them)."""
    size = min(max(HIDDEN_MIN_LENGTH, 1 << (len(ids) - 1).bit_length()), self.model.max_seq_len)
    if size not in self._free_hidden_jits:
      forward = lambda toks: self.model.forward_hidden(self.model.embed(toks), 0, None).float().realize()
      self._free_hidden_jits[size] = capture_at_first_call(TinyJit(forward))
    toks = Tensor([ids + [0] * (size - len(ids))], dtype="int32", device=self.model.device)
    return to_numpy(self._free_hidden_jits[size](toks))[0, :len(ids)]

  def _check_feed(self, token: int, pos: int, slot: int) -> None:
    self.check_length(pos + 1)
    if not 0 <= slot < self.slots: raise ValueError(f"slot {slot} does not exist (the decoder has {self.slots})")
    if pos > len(self.held[slot]):
      raise ValueError(f"cannot feed position {pos}: slot {slot} holds {len(self.held[slot])} tokens; prefill the "
                       "sequence first")

  def _fed(self, token: int, pos: int, slot: int) -> None:
    del self.held[slot][pos:]
    self.held[slot].append(int(token))

  def step(self, token: int, pos: int, slot: int = 0) -> np.ndarray:
    """Feed `token` at position `pos` of `slot` (after the pos tokens it holds); logits for the next position [vocab]."""
    return self.step_slots([(slot, token, pos)])[0]

  def _prefill_by_steps(self, ids: list[int], begin: int, slot: int) -> np.ndarray:
    self.held[slot] = ids[:begin]
    for pos in range(begin, len(ids)): logits, _ = self._steps([(slot, ids[pos], pos)])
    self.prefilled += len(ids) - begin
    return logits[0]

  def step_slots(self, feeds: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Feed (slot, token, pos) for each of a few slots at once (each as `step` would); logits [len(feeds), vocab].
    One compiled step for all of them where the kernels have a batched step (each row computed exactly as alone;
    one graph per batch size serves every slot), else the one-slot step of each in turn."""
    logits, steps = self._steps(feeds)
    self.decode_steps += steps
    return logits

  def _steps(self, feeds: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, int]:
    """step_slots' work; also the compiled steps it took."""
    self._fresh()
    if len({slot for slot, _, _ in feeds}) != len(feeds): raise ValueError("step_slots feeds each slot at most once")
    for slot, token, pos in feeds: self._check_feed(token, pos, slot)
    size = next(b for b in batch_sizes(self.slots) if b >= len(feeds))
    with Context(BEAM=self.beam):
      if (compiled := self._rows_step(size)) is not None: logits = self._run_rows(compiled, feeds)
      else: logits = np.stack([to_numpy(self.decode_logits(int(t), pos, slot))[0] for slot, t, pos in feeds])
    for slot, token, pos in feeds: self._fed(token, pos, slot)
    return logits, 1 if compiled is not None else len(feeds)

  def _run_rows(self, compiled: _RowsStep, feeds: Sequence[tuple[int, int, int]]) -> np.ndarray:
    write_in_place(compiled.feed, self._feed_rows(feeds, compiled.feed.shape[1]))
    if compiled.replay is None and compiled.jit.captured is not None and self.replay:
      compiled.replay = Replay.of(compiled.jit, ()) or False
    return to_numpy(compiled.replay() if compiled.replay else compiled.jit())[:len(feeds)]

  @staticmethod
  def _feed_rows(feeds: Sequence[tuple[int, int, int]], size: int) -> np.ndarray:
    """The int32 [3, size] input of a batched step: tokens, positions, cache rows (-1 for the padding rows)."""
    feed = np.zeros((3, size), dtype=np.int32)
    feed[2, :] = -1
    for b, (slot, token, pos) in enumerate(feeds): feed[:, b] = (token, pos, slot)
    return feed

  def eager_step(self, token: int, pos: int, slot: int = 0) -> None:
    """The step `step` runs, outside any JIT: kernel by kernel, for profiles and kernel counts (the cache is written
    but what the slot holds is not recorded)."""
    if (compiled := self._rows_step(1)) is not None:
      write_in_place(compiled.feed, self._feed_rows([(slot, token, pos)], 1))
      fused_decode.decode_rows(self.model, fused_decode.plan(self.model), compiled.feed, self.slot_caches()).realize()
    else: self.decode_graph(self.tok_var.bind(token), self.pos_var.bind(pos), slot).realize()

  # ---- beam search's rows -------------------------------------------------------------------------
  def prefill_rows(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Prompts left-padded to one length into one beam-cache row each; the logits of each row's last token
    [B, vocab]. RoPE is relative, so a row shifted right by its padding attends exactly as it would alone."""
    if any(not len(r) for r in rows): raise ValueError("a prompt is empty: at least one token (e.g. BOS) is needed")
    length = max(len(r) for r in rows)
    self.check_length(length)
    self._fresh()
    dev, logits = self.model.device, None
    caches = self.row_caches(len(rows))
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
    """Beam-cache rows are first reordered to `parents` (beam search: every row holds the same prompt, so the padding
    bias needs no reordering), then row b is fed tokens[b] at cache column `pos`; logits [rows, vocab]."""
    self.check_length(pos + 1)
    self._fresh()
    dev = self.model.device
    if parents is not None and list(parents) != list(range(len(parents))):
      self._reorder_jit(Tensor(list(parents), dtype="int32", device=dev))
    with Context(BEAM=self.beam):
      toks = Tensor([[int(t)] for t in tokens], dtype="int32", device=dev)
      return to_numpy(self._batch_jit(toks, self.pos_var.bind(pos), self._bias))
