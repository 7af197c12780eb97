"""`Llama`: the user-facing object tying a Transformer, its tokenizer and generation together."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType

from .beam import beam_generations
from .checkpoint import load_checkpoint
from .config import ModelArgs, warn_if_beyond_trained
from .devices import resolve_device
from . import ops, reward
from .engine import Engine, Request, generate_steps
from .generate import (Constraint, Generation, GenerationConfig, Stopping, TextStream, TokenStep, eos_id_set,
                       generations)
from .layers import Linear
from .model import Transformer
from .rope import RopeScaling
from .tokenizer import ChatTemplate, Llama2ChatTemplate, Tokenizer

DTYPES = {"float32": dtypes.float32, "f32": dtypes.float32, "fp32": dtypes.float32, "float16": dtypes.float16,
          "f16": dtypes.float16, "fp16": dtypes.float16, "half": dtypes.float16, "bfloat16": dtypes.bfloat16,
          "bf16": dtypes.bfloat16}


def resolve_dtype(dtype: str | DType | None, stored: np.dtype | None = None) -> DType:
  """An explicit dtype, else the stored float dtype (fp32 / fp16); bf16 is read as fp32 unless asked for."""
  if isinstance(dtype, DType): return dtype
  if dtype is None: return dtypes.float16 if stored == np.float16 else dtypes.float32
  if dtype not in DTYPES: raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
  return DTYPES[dtype]


def sequence_rngs(seed: int | None, n: int) -> list[np.random.Generator]:
  """Random streams for n sampled sequences of one prompt, generated together: the first is the stream of `seed`
  itself (so it equals a single generation with that seed), the others independent streams spawned from it."""
  first = np.random.SeedSequence(seed)
  return [np.random.Generator(np.random.PCG64(s)) for s in [first, *first.spawn(n - 1)]]


class Llama:
  """A model with its tokenizer and an `Engine` that runs its generations (`slots` of them at once; default: see
  engine.default_slots)."""

  def __init__(self, model: Transformer, tokenizer: Tokenizer | None, chat_template: ChatTemplate | None = None,
               slots: int | None = None, score: Linear | None = None):
    self.model, self._tokenizer = model, tokenizer
    self.score = score   # a reward model's head (then this Llama scores texts and does not generate)
    self.args: ModelArgs = model.args
    self.chat_template = chat_template or Llama2ChatTemplate()
    self.engine = Engine(model, slots)

  @property
  def decoder(self):
    """The engine's decoder (its KV caches and compiled steps)."""
    return self.engine.decoder

  @classmethod
  def from_pretrained(cls, path: str | Path, tokenizer: str | Path | None = None, device: str | None = None,
                      dtype: str | DType | None = None, max_seq_len: int | None = None,
                      rope_scaling: dict | None = None, quantize: str | None = None, adapter: str | None = None,
                      slots: int | None = None, devices: Sequence[str] | str | None = None) -> Llama:
    """`devices` (two or more, e.g. ["CPU:0", "CPU:1"]): the model split over them, tensor parallel (parallel.py)."""
    from .quantize import MODES, load_prequantized, quantize_model
    if quantize is not None and quantize not in MODES:
      raise ValueError(f"unknown quantize={quantize!r}; use one of {', '.join(MODES)}")
    if adapter is not None and quantize is not None:
      raise ValueError("adapter= with quantize= is not supported: merge the adapter first (tinyllama2 merge)")
    if max_seq_len is not None and (not isinstance(max_seq_len, (int, np.integer)) or max_seq_len <= 0):
      raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if slots is not None and (not isinstance(slots, (int, np.integer)) or slots <= 0):
      raise ValueError(f"slots must be a positive integer (sequences generated at once), got {slots!r}")
    if dtype is not None: resolve_dtype(dtype)
    if devices is not None:
      from .parallel import parse_devices
      if device is not None: raise ValueError("pass device= or devices=, not both")
      devices = parse_devices(devices)
      device = devices[0]
    device = resolve_device(device)   # a device that does not work here fails before the weights are read
    if adapter is not None:
      from .lora import check_adapter_dir
      check_adapter_dir(adapter)
    ckpt = load_checkpoint(path)
    args = ckpt.args
    tok_path = tokenizer if tokenizer is not None else ckpt.tokenizer_path
    if tok_path is not None: tok = Tokenizer(tok_path)   # checked before the (slow) weights reach the device
    elif ckpt.tokenizer_proto is not None: tok = Tokenizer.from_proto(ckpt.tokenizer_proto, path)
    else: tok = None
    if tok is not None and tok.vocab_size > args.vocab_size:
      raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model only {args.vocab_size} rows")
    if rope_scaling is not None: args = args.replace(rope_scaling=RopeScaling.from_dict(rope_scaling))
    if max_seq_len is not None: warn_if_beyond_trained(args, max_seq_len)
    floats = {k: v for k, v in ckpt.weights.items() if isinstance(v, np.ndarray)}
    stored = floats["tok_embeddings.weight"].dtype if "tok_embeddings.weight" in floats else None
    score_w = floats.pop(reward.SCORE, None)
    if score_w is not None:   # a reward model has no LM head: the embedding table stands in (never used)
      if quantize is not None: raise ValueError("quantize= is for generation; a reward model is loaded unquantized")
      args = args.replace(tie_embeddings=True)
    model = Transformer(args, max_seq_len=max_seq_len, dtype=resolve_dtype(dtype, stored), device=device)
    model.load_weights(floats, expected=set(ckpt.weights) - {reward.SCORE})
    if len(floats) + (score_w is not None) < len(ckpt.weights):   # quantized blocks go into QuantLinear as they are
      load_prequantized(model, ckpt.weights)
      model.quantization = "mixed" if quantize is None else quantize
    if adapter is not None:   # folded into the weights: decoding costs what the base model costs
      from . import lora
      lora.load_adapter(model, adapter)
      lora.merge(model)
    if quantize is not None: quantize_model(model, quantize)
    if devices is not None:
      if score_w is not None: raise ValueError("a reward model runs on one device: use device=, not devices=")
      from .parallel import shard_model
      shard_model(model, devices)
    score = None
    if score_w is not None:
      if score_w.shape != (1, args.dim):
        raise ValueError(f"{path}: score.weight has shape {score_w.shape}; a reward model's is [1, {args.dim}] (num_labels 1)")
      score = Linear(Tensor(np.array(score_w, dtype=np.float32), device=device).contiguous().realize())
    return cls(model, tok, slots=slots, score=score)

  @property
  def tokenizer(self) -> Tokenizer:
    if self._tokenizer is None:
      raise ValueError("this model has no tokenizer: pass tokenizer='path/to/tokenizer.model' (or --tokenizer), "
                       "or work with token ids")
    return self._tokenizer

  @property
  def eos_ids(self) -> set[int]:
    ids = eos_id_set(self.args.eos_id)
    if self._tokenizer is not None and self._tokenizer.eos_id >= 0: ids.add(self._tokenizer.eos_id)
    return ids

  def _check_language_model(self) -> None:
    if self.score is not None:
      raise ValueError("this is a reward model (LlamaForSequenceClassification): it scores texts with reward() and "
                       "has no language-model head to generate with")

  def logits(self, ids: Sequence[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits of a full forward pass from position 0."""
    self._check_language_model()
    with self.engine.exclusive_slot() as (decoder, slot):
      return decoder.prefill([int(i) for i in ids], all_logits=True, slot=slot)

  def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str): return self.tokenizer.encode(prompt, bos=True)
    ids = [int(i) for i in prompt]
    bad = [i for i in ids if not 0 <= i < self.args.vocab_size]
    if bad: raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.args.vocab_size - 1})")
    return ids

  def generate(self, prompt: str | Sequence[int] | list, config: GenerationConfig | None = None, *,
               stream: bool = False, **settings) -> Generation | TextStream | list[Generation]:
    """Hugging Face-style generation: `config` (default: GenerationConfig()) with `settings` replaced, by the names
    of GenerationConfig's fields (max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
    num_beams, stop, seed, ...). stream=True returns a TextStream: iterate it for text pieces.

    A list of prompts returns one Generation per prompt (decoded as one batch); num_return_sequences > 1 returns
    that many (best first for beam search). `Generation.tokens` holds the new ids without the eos that ended
    generation (as OpenAI/llama.cpp report).

    Safe to call from several threads: generations (and streams) run together on the engine, each getting the
    tokens it would get alone; more of them than the engine has slots wait for one. Breaking out of a stream
    frees its slot."""
    return self._generate(prompt, GenerationConfig.of(config, **settings), stream)

  def _generate(self, prompt: str | Sequence[int] | list, cfg: GenerationConfig,
                stream: bool) -> Generation | TextStream | list[Generation]:
    self._check_language_model()
    if cfg.stop and self._tokenizer is None: raise ValueError("stop strings need a tokenizer")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list, tuple)):
      if stream: raise ValueError("stream=True takes a single prompt")
      if cfg.num_beams > 1 or cfg.num_return_sequences > 1: return [self.generate(p, cfg) for p in prompt]
      ids = [self._prompt_ids(p) for p in prompt]
      return generations(generate_steps(self.engine, ids, cfg, self._stopping(cfg)), ids, self._tokenizer, cfg.stop)
    if stream and (cfg.num_beams > 1 or cfg.num_return_sequences > 1):
      raise ValueError("stream=True returns one sequence: use num_beams=1 and num_return_sequences=1")
    ids = self._prompt_ids(prompt)
    self.decoder.check_length(len(ids))
    if cfg.num_beams > 1:
      with self.engine.exclusive() as decoder:
        out = beam_generations(decoder, ids, cfg, self._stopping(cfg), self._tokenizer)
      return out[0] if cfg.num_return_sequences == 1 else out
    if stream: return TextStream(self.engine.submit(ids, cfg, self._stopping(cfg)), ids, self._tokenizer, cfg.stop)
    n = cfg.num_return_sequences
    out = generations(generate_steps(self.engine, [ids] * n, cfg, self._stopping(cfg), sequence_rngs(cfg.seed, n)),
                      [ids] * n, self._tokenizer, cfg.stop)
    return out[0] if n == 1 else out

  def submit(self, ids: Sequence[int], cfg: GenerationConfig, rng: np.random.Generator | None = None,
             on_step: Callable[[TokenStep | BaseException], None] | None = None,
             constraint: Constraint | None = None) -> Request:
    """One sequence's generation queued on the engine, for callers that handle the steps themselves (the server):
    iterate the Request for its TokenSteps, or get them through `on_step`; `cancel()` frees its slot."""
    self._check_language_model()
    return self.engine.submit(self._prompt_ids(ids), cfg, self._stopping(cfg), rng, on_step=on_step,
                              constraint=constraint)

  def rollouts(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
               rngs: Sequence[np.random.Generator]) -> list[Generation]:
    """Sampled completions of many prompts generated together on the engine, prompt i drawing from rngs[i] (its
    tokens do not depend on what else is in the batch): RL rollouts."""
    self._check_language_model()
    ids = [self._prompt_ids(p) for p in prompts]
    return generations(generate_steps(self.engine, ids, cfg, self._stopping(cfg), list(rngs)), ids, self._tokenizer,
                       cfg.stop)

  def embed(self, inputs: Sequence[str | Sequence[int]]) -> np.ndarray:
    """Sentence embeddings [len(inputs), dim] float32: the final-norm hidden states of each input (text or ids)
    averaged over its tokens and L2-normalised. Computed in a free slot between decode steps, or without one
    (slower) when requests hold every slot."""
    out = np.zeros((len(inputs), self.args.dim), dtype=np.float32)
    for i, x in enumerate(inputs):
      ids = self._prompt_ids(x)
      if not ids: raise ValueError(f"input {i} is empty")
      self.decoder.check_length(len(ids))
      with self.engine.exclusive_slot(wait=False) as (decoder, slot): out[i] = decoder.hidden_states(ids, slot).mean(0)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

  def reward(self, inputs: Sequence[str | Sequence[int] | list[dict]], batch_size: int = 8) -> np.ndarray:
    """A reward model's scores [len(inputs)] float32, each read at the input's last token: a conversation (messages
    ending with the assistant's answer) is rendered with the chat template as in training (ending with EOS), a text
    is encoded as BOS text EOS, token ids are scored as they are."""
    if self.score is None:
      raise ValueError("not a reward model: reward() needs a LlamaForSequenceClassification checkpoint (train one "
                       "with `tinyllama2 rm`)")
    if isinstance(inputs, str): raise ValueError("reward() takes a list of inputs: reward([text]) scores one text")
    rows = [self._reward_ids(x, i) for i, x in enumerate(inputs)]
    out = np.zeros(len(rows), dtype=np.float32)
    for lo in range(0, len(rows), batch_size):
      batch = rows[lo:lo + batch_size]
      width = min(self.model.max_seq_len, -(-max(map(len, batch)) // 32) * 32)   # a few padded shapes, compiled once
      tokens = np.full((len(batch), width), reward.PAD_ID, dtype=np.int32)
      for r, ids in enumerate(batch): tokens[r, :len(ids)] = ids
      last = np.array([len(ids) - 1 for ids in batch], dtype=np.int32)
      with self.engine.exclusive(), ops.training_graph():   # the graph the reward model was trained with
        dev = self.model.device
        out[lo:lo + len(batch)] = reward.last_token_scores(self.model, self.score, Tensor(tokens, device=dev),
                                                           Tensor(last, device=dev)).numpy()
    return out

  def _reward_ids(self, x: str | Sequence[int] | list[dict], i: int) -> list[int]:
    if isinstance(x, str): ids = self.tokenizer.encode(x, bos=True, eos=True)
    elif isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
      ids = self.chat_template.encode_for_training(list(x), self.tokenizer)[0]
    else: ids = self._prompt_ids(x)
    if not ids: raise ValueError(f"input {i} is empty")
    self.decoder.check_length(len(ids))
    return ids

  def _stopping(self, cfg: GenerationConfig) -> Stopping:
    eos = self.eos_ids if cfg.eos_token_id is None else eos_id_set(cfg.eos_token_id)
    return Stopping(eos, cfg.max_new_tokens, self.model.max_seq_len, cfg.stop, self._tokenizer)

  def chat(self, messages: list[dict], **generate_kwargs) -> Generation | TextStream:
    ids = self.chat_template.encode(messages, self.tokenizer)
    return self.generate(ids, **generate_kwargs)
