"""OpenAI's request and response shapes: request bodies checked and turned into `Job`s (our generation settings),
results and stream chunks built back in OpenAI's shapes, errors as OpenAI error objects.

Parameter names follow OpenAI (`max_tokens`, `stop`, `n`, `seed`, `logprobs`, ...); our own sampling knobs
(`top_k`, `min_p`, `repetition_penalty`, ... — the fields of sampling.SamplingParams) are accepted as extra body
fields, as llama.cpp's server does. A field we do not know is an error, as it is for OpenAI.
"""
from __future__ import annotations

import base64
import dataclasses
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..generate import GenerationConfig, TokenStep
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer

MAX_N = 16              # choices per request
MAX_STOP = 4            # stop strings per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20   # chat; completions allow 5, as OpenAI
OUR_KNOBS = {f.name for f in dataclasses.fields(SamplingParams)} - {"do_sample", "temperature", "top_p",
                                                                     "frequency_penalty", "presence_penalty"}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "model"}   # accepted, no effect here
COMMON = {"max_tokens", "temperature", "top_p", "n", "stop", "seed", "frequency_penalty", "presence_penalty",
          "stream", "stream_options", "logit_bias", "response_format", "min_tokens", "ignore_eos"} | IGNORED | OUR_KNOBS
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                        "functions", "function_call", "modalities", "audio", "prediction", "reasoning_effort"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "audio", "prediction", "suffix", "logit_bias"}


class APIError(Exception):
  """An error answered as OpenAI does: HTTP status and {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
  return APIError(400, message, param=param, code=code)


@dataclass
class Job:
  """One request's work: the prompts (token ids; n choices each), the generation settings and the answer's shape."""
  prompts: list[list[int]]
  cfg: GenerationConfig
  n: int = 1
  stream: bool = False
  include_usage: bool = False
  logprobs: int | None = None   # None: off; k: the chosen token's logprob and the k most likely
  echo: bool = False
  response_format: dict | None = None
  grammar: str | None = None    # response_format's constraint (serve.constrain), set by the server
  prompt_texts: list[str] = field(default_factory=list)   # for echo


# ---- reading a body --------------------------------------------------------------------------------------------
def _typed(body: dict, name: str, kinds: tuple, what: str, default: Any = None) -> Any:
  v = body.get(name, default)
  if v is None: return default
  if isinstance(v, bool) and bool not in kinds: raise bad(name, f"'{name}' must be {what}, got {v!r}")
  if not isinstance(v, kinds): raise bad(name, f"'{name}' must be {what}, got {type(v).__name__} {_short(v)}")
  return v


def _short(v: Any) -> str:
  text = repr(v)
  return text if len(text) <= 60 else text[:57] + "..."


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
  v = float(_typed(body, name, (int, float), "a number", default))
  if not (math.isfinite(v) and lo <= v <= hi): raise bad(name, f"'{name}' must be between {lo:g} and {hi:g}, got {v:g}")
  return v


def _integer(body: dict, name: str, lo: int, hi: int | None, default: int | None) -> int | None:
  v = _typed(body, name, (int,), "an integer", default)
  if v is not None and (v < lo or (hi is not None and v > hi)):
    raise bad(name, f"'{name}' must be {'at least ' + str(lo) if hi is None else f'between {lo} and {hi}'}, got {v}")
  return v


def _check_fields(body: Any, allowed: set[str]) -> dict:
  if not isinstance(body, dict): raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
  if unknown := sorted(set(body) - allowed): raise bad(unknown[0], f"unrecognized request argument: '{unknown[0]}'")
  for name in sorted(UNSUPPORTED & set(body)):
    if body[name] not in (None, [], {}): raise bad(name, f"'{name}' is not supported by this server")
  return body


def _stop(body: dict) -> list[str]:
  stop = body.get("stop")
  if stop is None: return []
  stops = [stop] if isinstance(stop, str) else stop
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
    raise bad("stop", "'stop' must be a non-empty string or a list of them")
  if len(stops) > MAX_STOP: raise bad("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}")
  return stops


def _response_format(body: dict) -> dict | None:
  rf = body.get("response_format")
  if rf is None: return None
  if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
    raise bad("response_format", "'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}")
  if rf["type"] == "json_schema" and not isinstance((rf.get("json_schema") or {}).get("schema", {}), dict):
    raise bad("response_format", "'response_format.json_schema.schema' must be a JSON Schema object")
  return None if rf["type"] == "text" else rf


def _settings(body: dict, max_tokens: int | None) -> GenerationConfig:
  """OpenAI's sampling parameters and our extra knobs as a GenerationConfig (temperature 0: greedy)."""
  temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
  knobs = {}
  for name in sorted(OUR_KNOBS & set(body)):
    if body[name] is None: continue
    integer = isinstance(getattr(SamplingParams, name), int)   # the field's default tells its type
    knobs[name] = _typed(body, name, (int,) if integer else (int, float), "an integer" if integer else "a number")
    if not math.isfinite(knobs[name]): raise bad(name, f"'{name}' must be a finite number, got {knobs[name]}")
  if (m := _integer(body, "min_tokens", 0, None, None)) is not None: knobs["min_new_tokens"] = m
  seed = _integer(body, "seed", -(2 ** 63), 2 ** 64 - 1, None)
  settings = dict(max_new_tokens=max_tokens if max_tokens is not None else 1 << 30, do_sample=temperature > 0,
                  temperature=temperature or 1.0, top_p=_number(body, "top_p", 0.0, 1.0, 1.0), top_k=0,
                  frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
                  presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
                  seed=None if seed is None else seed % (2 ** 64), stop=_stop(body))
  if _typed(body, "ignore_eos", (bool,), "true or false", False): settings["eos_token_id"] = []   # llama.cpp's knob
  try: return GenerationConfig.of(**(settings | knobs))   # top_k: off unless asked for, as in OpenAI's API
  except ValueError as e: raise bad(None, str(e)) from None


def _common(body: dict, max_tokens_names: tuple[str, ...]) -> dict:
  max_tokens = None
  for name in max_tokens_names: max_tokens = _integer(body, name, 1, None, max_tokens)
  options = _typed(body, "stream_options", (dict,), "an object", {})
  return dict(cfg=_settings(body, max_tokens), n=_integer(body, "n", 1, MAX_N, 1),
              stream=_typed(body, "stream", (bool,), "true or false", False),
              include_usage=bool(_typed(options, "include_usage", (bool,), "true or false", False)),
              response_format=_response_format(body))


def _message_text(m: Any, i: int) -> dict:
  if not isinstance(m, dict): raise bad("messages", f"messages[{i}] must be an object with 'role' and 'content'")
  role, content = m.get("role"), m.get("content")
  if role == "developer": role = "system"
  if role not in ("system", "user", "assistant"):
    raise bad("messages", f"messages[{i}].role must be 'system', 'user' or 'assistant', got {_short(role)}")
  if isinstance(content, list):   # content parts: only text ones
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
      raise bad("messages", f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported")
    content = "".join(p["text"] for p in content)
  if not isinstance(content, str): raise bad("messages", f"messages[{i}].content must be a string")
  return {"role": role, "content": content}


def chat_job(body: Any, encode_chat) -> Job:
  """A /v1/chat/completions body → Job; encode_chat(messages) gives the prompt ids (the model's chat template)."""
  body = _check_fields(body, CHAT_FIELDS)
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages: raise bad("messages", "'messages' must be a non-empty list")
  messages = [_message_text(m, i) for i, m in enumerate(messages)]
  try: ids = encode_chat(messages)
  except ValueError as e: raise bad("messages", str(e)) from None
  logprobs = _typed(body, "logprobs", (bool,), "true or false", False)
  top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
  if top is not None and not logprobs: raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
  return Job([ids], logprobs=(top or 0) if logprobs else None, **_common(body, ("max_tokens", "max_completion_tokens")))


def completion_job(body: Any, tokenizer: Tokenizer, vocab_size: int) -> Job:
  """A /v1/completions body → Job: `prompt` is a string, a list of strings, a list of token ids or a list of them."""
  body = _check_fields(body, COMPLETION_FIELDS)
  _integer(body, "best_of", 1, 1, 1)   # only 1: we return what we generate
  prompts, texts = _prompts(body.get("prompt"), tokenizer, vocab_size)
  n = _integer(body, "n", 1, MAX_N, 1)
  if len(prompts) * n > MAX_N:
    raise bad("prompt", f"{len(prompts)} prompts x n={n} is {len(prompts) * n} completions; at most {MAX_N} per request")
  return Job(prompts, logprobs=_integer(body, "logprobs", 0, 5, None),
             echo=_typed(body, "echo", (bool,), "true or false", False), prompt_texts=texts,
             **_common(body, ("max_tokens",)))


def _prompts(prompt: Any, tokenizer: Tokenizer, vocab_size: int) -> tuple[list[list[int]], list[str]]:
  is_ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
  if isinstance(prompt, str): items = [prompt]
  elif is_ids(prompt): items = [prompt]
  elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt): items = prompt
  else: raise bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of those")
  ids, texts = [], []
  for p in items:
    if isinstance(p, str):
      ids.append(tokenizer.encode(p, bos=True))
      texts.append(p)
    else:
      if bad_ids := [t for t in p if not 0 <= t < vocab_size]:
        raise bad("prompt", f"token ids {bad_ids[:5]} are outside the vocabulary (0..{vocab_size - 1})")
      ids.append(list(p))
      texts.append(tokenizer.decode(p))
  return ids, texts


def embedding_inputs(body: Any, tokenizer: Tokenizer, vocab_size: int) -> tuple[list[list[int]], str]:
  """A /v1/embeddings body → (token ids of each input, encoding format)."""
  body = _check_fields(body, {"input", "model", "encoding_format", "dimensions", "user"})
  fmt = body.get("encoding_format") or "float"
  if fmt not in ("float", "base64"): raise bad("encoding_format", "'encoding_format' must be 'float' or 'base64'")
  if body.get("dimensions") is not None: raise bad("dimensions", "'dimensions' is not supported (the model's width is fixed)")
  try: ids, _ = _prompts(body.get("input"), tokenizer, vocab_size)
  except APIError as e: raise bad("input", e.message.replace("'prompt'", "'input'")) from None
  return ids, fmt


# ---- building answers ------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str: return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def log_softmax(logits: np.ndarray) -> np.ndarray:
  x = logits.astype(np.float64)
  m = x.max()
  return x - m - np.log(np.exp(x - m).sum())


Entry = tuple[str, list[int], float, list]   # token text, its bytes, logprob, [(text, bytes, logprob)] of the top


def logprob_entry(tokenizer: Tokenizer, step: TokenStep, top: int) -> Entry:
  """The chosen token's logprob and the `top` most likely tokens' (the model's distribution, before sampling)."""
  lp = log_softmax(step.logits)
  best = np.argpartition(-lp, top - 1)[:top] if 0 < top < lp.size else np.arange(lp.size if top else 0)
  best = best[np.argsort(-lp[best], kind="stable")]
  def entry(t: int) -> tuple[str, list[int], float]:
    raw = tokenizer.piece_bytes(int(t))
    return raw.decode("utf-8", "replace"), list(raw), float(lp[t])
  return (*entry(step.token), [entry(t) for t in best])


def chat_logprobs(entries: list[Entry]) -> dict:
  return {"content": [{"token": t, "bytes": b, "logprob": lp,
                       "top_logprobs": [{"token": tt, "bytes": tb, "logprob": tl} for tt, tb, tl in top]}
                      for t, b, lp, top in entries], "refusal": None}


def completion_logprobs(entries: list[Entry], offset: int) -> dict:
  offsets, at = [], offset
  for t, _b, _lp, _top in entries:
    offsets.append(at)
    at += len(t)
  return {"tokens": [e[0] for e in entries], "token_logprobs": [e[2] for e in entries],
          "top_logprobs": [{tt: tl for tt, _tb, tl in e[3]} for e in entries], "text_offset": offsets}


def embedding_item(index: int, vector: np.ndarray, fmt: str) -> dict:
  v = np.asarray(vector, dtype="<f4")
  return {"object": "embedding", "index": index,
          "embedding": base64.b64encode(v.tobytes()).decode() if fmt == "base64" else [float(x) for x in v]}


def envelope(kind: str, rid: str, model: str, **rest) -> dict:
  return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "system_fingerprint": "tinyllama2",
          **rest}
