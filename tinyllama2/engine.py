"""`Engine`: many generations through one model at once — slots, a request queue, continuous batching, prefix reuse.

Each request gets a slot: a row of the decoder's KV caches, with its own position and its own sampling state (a
`generate.Continuation`). A worker thread runs while there is work: between decode steps it admits waiting
requests into free slots (the slot whose cached tokens share the longest prefix with the prompt, so a chat's next
turn prefills only its new message, as llama.cpp's `cache_prompt` does), prefills one chunk of one prompt (so a long
prompt stalls the others for one chunk at a time), then runs one decode step for every slot that is generating.
A finished or cancelled request frees its slot at once. Each request's tokens are what it would get alone: the
batched step computes every row as the single-row step does, and every request samples from its own seeded stream.

Callers iterate a `Request` for its `TokenStep`s from any thread; breaking out of the iteration (or `cancel()`)
frees the slot. Work that needs the model to itself (beam search, full-sequence logits) takes `exclusive()`.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from typing import Callable, Iterator, Sequence

import numpy as np

from .decoder import Decoder
from .generate import Constraint, Continuation, GenerationConfig, Stopping, TokenStep
from .model import Transformer
from .runtime.threads import share_compile_cache

KV_BUDGET_BYTES = 1 << 30   # default slots: as many (up to 4) as fit their KV caches in this


def default_slots(model: Transformer, at_most: int = 4) -> int:
  """Slots for `model`: `at_most`, fewer when their KV caches would pass KV_BUDGET_BYTES (a 7B model with a
  4096-token context needs 2 GiB of cache per slot in float16), never fewer than one."""
  a = model.args
  per_slot = 2 * a.n_layers * a.n_kv_heads * a.head_dim * model.max_seq_len * model.dtype.itemsize
  return max(1, min(at_most, KV_BUDGET_BYTES // per_slot))


class Request:
  """One generation submitted to an Engine. Iterating it yields its TokenSteps as they are made (blocking until the
  next is ready; an error in the engine is raised here); the last one carries the finish reason. With `on_step`,
  each step (or error) is handed to that function instead, on the engine's thread (an asyncio server passes
  one that hands it to its event loop)."""

  def __init__(self, engine: Engine, continuation: Continuation,
               on_step: Callable[[TokenStep | BaseException], None] | None = None):
    self.engine, self.continuation = engine, continuation
    self._deliver = on_step
    self.slot: int | None = None
    self.prefilled = False   # the whole prompt is in the slot: the request is decoding
    self.cancelled = False
    self._steps: queue.SimpleQueue = queue.SimpleQueue()
    self._ended = False
    self.made_at: list[float] = []   # time.perf_counter() when each step was made (latency figures)

  @property
  def prompt(self) -> list[int]: return self.continuation.prompt

  def __iter__(self) -> Iterator[TokenStep]: return self

  def __next__(self) -> TokenStep:
    if self._ended: raise StopIteration
    step = self._steps.get()
    if isinstance(step, BaseException):
      self._ended = True
      raise step
    if step.finish_reason is not None: self._ended = True
    return step

  def cancel(self) -> None:
    """Stop generating: the slot is freed before the engine's next step (nothing more is yielded)."""
    self._ended = True
    self.engine._cancel(self)

  close = cancel   # TextStream and generators close what they iterate when a caller breaks out

  def _emit(self, step: TokenStep | BaseException) -> None:
    self.made_at.append(time.perf_counter())
    (self._deliver or self._steps.put)(step)


class Engine:
  """The owner of a model's decoder (KV caches and compiled steps) for generation from many threads at once."""

  def __init__(self, model: Transformer, slots: int | None = None, prefill_chunk: int = 256):
    share_compile_cache()   # the worker thread compiles too
    self.model = model
    self.decoder = Decoder(model, slots or default_slots(model), prefill_chunk)
    self._cv = threading.Condition()
    self._waiting: deque[Request] = deque()
    self._running: list[Request] = []   # holding a slot
    self._reserved: set[int] = set()    # slots lent out by `exclusive_slot`
    self._worker: threading.Thread | None = None

  @property
  def slots(self) -> int: return self.decoder.slots

  def occupancy(self) -> tuple[int, int]:
    """(requests holding a slot, requests waiting for one)."""
    with self._cv: return sum(not r.cancelled for r in self._running), len(self._waiting)

  # ---- requests -----------------------------------------------------------------------------------
  def submit(self, prompt: Sequence[int], cfg: GenerationConfig, stopping: Stopping,
             rng: np.random.Generator | None = None, row: int = 0,
             on_step: Callable[[TokenStep | BaseException], None] | None = None,
             constraint: Constraint | None = None) -> Request:
    """Queue a generation of `prompt` (token ids); iterate the returned Request for its steps (or get them
    through `on_step`)."""
    if not len(prompt): raise ValueError("the prompt is empty: at least one token (e.g. BOS) is needed")
    self.decoder.check_length(len(prompt))
    request = Request(self, Continuation(row, list(prompt), cfg, stopping, rng, constraint), on_step)
    if cfg.max_new_tokens == 0:
      request._emit(request.continuation.nothing_to_generate())
      return request
    with self._cv:
      self._waiting.append(request)
      if self._worker is None:
        self._worker = threading.Thread(target=self._work, name="tinyllama2-engine", daemon=True)
        self._worker.start()
      self._cv.notify_all()
    return request

  def _cancel(self, request: Request) -> None:
    with self._cv:
      request.cancelled = True
      if request in self._waiting: self._waiting.remove(request)

  @contextlib.contextmanager
  def exclusive(self) -> Iterator[Decoder]:
    """The decoder to oneself (the engine pauses between steps meanwhile): beam search uses its own cache rows."""
    with self.decoder.lock: yield self.decoder

  @contextlib.contextmanager
  def exclusive_slot(self, wait: bool = True) -> Iterator[tuple[Decoder, int | None]]:
    """The decoder to oneself and a slot no request holds (waiting for one to free up if all are busy; with
    wait=False the slot is None then)."""
    with self._cv:
      while not (free := self._free_slots()) and wait: self._cv.wait()
      slot = free[-1] if free else None   # the highest-numbered: the one requests take last
      if slot is not None: self._reserved.add(slot)
    if slot is None:
      with self.decoder.lock: yield self.decoder, None
      return
    try:
      with self.decoder.lock: yield self.decoder, slot
    finally:
      with self._cv:
        self._reserved.discard(slot)
        self._cv.notify_all()

  # ---- the worker -----------------------------------------------------------------------------------
  def _free_slots(self) -> list[int]:
    used = {r.slot for r in self._running} | self._reserved
    return [s for s in range(self.slots) if s not in used]

  def _work(self) -> None:
    while True:
      with self._cv:
        self._running = [r for r in self._running if not r.cancelled]
        self._admit()
        self._cv.notify_all()   # slots may have freed (exclusive_slot waits for one)
        if not self._running and not self._waiting:
          self._worker = None
          return
        running = list(self._running)
      if not running:   # requests are waiting for a slot lent out by exclusive_slot
        with self._cv: self._cv.wait(0.05)
        continue
      try:
        with self.decoder.lock: self._advance(running)
      except BaseException as e:   # the requests in flight end with the error; the engine goes on
        with self._cv:
          for r in running:
            r._emit(e)
            r.cancelled = True

  def _admit(self) -> None:
    """Give waiting requests free slots, first come first served: each the slot holding the longest prefix of its
    prompt (more than the BOS token every prompt shares), else the lowest-numbered free one, so that one user's
    requests keep to one slot and its compiled prefill graphs."""
    while self._waiting and (free := self._free_slots()):
      request = self._waiting.popleft()
      shared = lambda s: n if (n := self.decoder.reusable(request.prompt, s)) > 1 else 0
      request.slot = max(free, key=lambda s: (shared(s), -s))
      self._running.append(request)

  def _advance(self, running: list[Request]) -> None:
    """One chunk of one prompt's prefill, then one decode step of every request that is generating."""
    filling = next((r for r in running if not r.prefilled and not r.cancelled), None)
    if filling is not None: self._prefill_chunk(filling)
    decoding = [r for r in running if r.prefilled and r.continuation.finish_reason is None and not r.cancelled
                and r is not filling]
    if decoding:
      feeds = [(r.slot, r.continuation.new[-1], len(r.continuation.sequence) - 1) for r in decoding]
      for r, logits in zip(decoding, self.decoder.step_slots(feeds)): self._chosen(r, logits, from_decode=True)

  def _prefill_chunk(self, r: Request) -> None:
    """Prefill the next chunk of r's prompt; after its last chunk, r chooses its first token. A prompt whose RoPE
    depends on its length (dynamic NTK past the trained context) is prefilled whole."""
    prompt, dec = r.prompt, self.decoder
    done = dec.reusable(prompt, r.slot)
    end = len(prompt) if self.model.prompt_rope(len(prompt)) is not None else min(len(prompt), done + dec.prefill_chunk)
    logits = dec.prefill(prompt[:end], slot=r.slot)
    if end < len(prompt): return
    r.prefilled = True
    r.continuation.timer.prefill_done()
    self._chosen(r, logits, from_decode=False)

  def _chosen(self, r: Request, logits: np.ndarray, from_decode: bool) -> None:
    """r's next token from its logits; an error in choosing it (its own constraint or settings) ends r alone."""
    try: step = r.continuation.choose(logits, from_decode)
    except Exception as e:   # noqa: BLE001  (delivered to the request's reader)
      if not r.cancelled: r._emit(e)
      with self._cv: r.cancelled = True
      return
    if not r.cancelled: r._emit(step)
    if step.finish_reason is not None:
      with self._cv: r.cancelled = True   # done: the slot frees at the next admission


def generate_steps(engine: Engine, prompts: list[list[int]], cfg: GenerationConfig, stopping: Stopping,
                   rngs: list[np.random.Generator] | None = None) -> Iterator[TokenStep]:
  """The steps of several prompts run together on the engine (row b: prompts[b]), request by request; a caller
  breaking out cancels them all."""
  requests = [engine.submit(p, cfg, stopping, rngs[b] if rngs else None, row=b) for b, p in enumerate(prompts)]
  try:
    for r in requests: yield from r
  finally:
    for r in requests: r.cancel()
