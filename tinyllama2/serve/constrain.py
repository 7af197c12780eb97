"""Constrained decoding for OpenAI's `response_format`, with llguidance.

  grammar = json_grammar(request["response_format"])     # None for {"type": "text"}; ValueError if malformed
  c = Constraint(tokenizer, grammar)                      # one per generated sequence (it holds the parser state)
  while not c.done():
    token = sample(c.mask(logits))                         # forbidden tokens (and rows past the vocab) are -inf
    if token == tokenizer.eos_id: break
    c.advance(token)                                       # ValueError if the grammar does not allow it
    logits = model(token)

When the JSON is complete only EOS is allowed, so `done()` turning true and sampling EOS both end the text; the
decoded tokens then parse as JSON (and validate against the schema, within what llguidance implements of JSON
Schema: https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md).
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np

import llguidance
import llguidance.numpy as llnp

from ..tokenizer import piece_bytes

# llguidance's JSON options for a schema without its own "x-guidance" options: whitespace between tokens stays
# allowed (so indented JSON is possible) but each run of it is bounded, so a model cannot loop on whitespace forever
# (llguidance's default allows any amount). A schema's "x-guidance" replaces them, e.g. {"whitespace_flexible": false}
# for compact JSON (a whitespace_pattern here would win over that flag, so these are not merged).
JSON_DEFAULTS: dict[str, Any] = {"whitespace_pattern": r"[ \t\n\r]{0,24}"}

def json_grammar(response_format: dict | None) -> str | None:
  """The llguidance grammar for an OpenAI `response_format`: None for None or {"type": "text"}; any JSON object for
  {"type": "json_object"}; the schema's language for {"type": "json_schema", "json_schema": {"name": ..., "schema":
  {...}, "strict": ...}} (a missing schema means any JSON value; `strict` is accepted, and the schema is always
  enforced). Raises ValueError (one line) for a malformed response_format or a schema llguidance cannot compile."""
  if response_format is None: return None
  if not isinstance(response_format, dict):
    raise ValueError(f"response_format must be an object, got {_kind(response_format)}")
  kind = response_format.get("type")
  if kind == "text": return None
  if kind == "json_object": schema: Any = {"type": "object"}
  elif kind == "json_schema":
    spec = response_format.get("json_schema", {})
    if not isinstance(spec, dict): raise ValueError(f"response_format.json_schema must be an object, got {_kind(spec)}")
    if "name" in spec and not isinstance(spec["name"], str):
      raise ValueError(f"response_format.json_schema.name must be a string, got {_kind(spec['name'])}")
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
      raise ValueError(f"response_format.json_schema.strict must be a boolean, got {_kind(spec['strict'])}")
    schema = spec.get("schema", {})
    if schema is None or schema is True: schema = {}
    if schema is False: raise ValueError("response_format.json_schema.schema is false, which no output satisfies")
    if not isinstance(schema, dict):
      raise ValueError(f"response_format.json_schema.schema must be a JSON Schema object, got {_kind(schema)}")
  else: raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
  try:
    text = json.dumps(schema, allow_nan=False)
    defaults = None if "x-guidance" in schema else JSON_DEFAULTS
    grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=defaults)  # type: ignore[arg-type]
  except (TypeError, ValueError) as e: raise ValueError(f"response_format: invalid JSON schema: {_line(e)}") from None
  err = llguidance.LLMatcher.validate_grammar(grammar)
  if err: raise ValueError(f"response_format: unsupported JSON schema: {_line(err)}")
  return grammar


def token_bytes(sp: Any) -> list[bytes]:
  """Every piece of a SentencePiece model as the bytes it stands for, as llguidance wants them: a byte-fallback
  piece `<0xHH>` that byte, '▁' a space, and control and unknown pieces (<s>, </s>, <unk>) the special-token
  marker 0xFF followed by their name (so no text can produce them)."""
  out = []
  for i in range(sp.vocab_size()):
    piece = sp.IdToPiece(i)
    if sp.IsControl(i) or sp.IsUnknown(i): out.append(b"\xff" + piece.encode("utf-8"))
    elif sp.IsUnused(i): out.append(b"\xff<unused" + str(i).encode() + b">")
    else: out.append(piece_bytes(piece))
  return out


class _SentencePieceWrapper:
  """What llguidance.TokenizerWrapper expects: eos/bos ids, the token bytes, the special ids, and a call that
  tokenizes bytes. The call tokenizes the bytes as they are, without SentencePiece's dummy-prefix space (a copy of
  the model with add_dummy_prefix off), so the tokens' bytes join to exactly the input."""

  def __init__(self, sp: Any):
    import sentencepiece as spm
    self.tokens = token_bytes(sp)
    self.eos_token_id, self.bos_token_id = sp.eos_id(), (sp.bos_id() if sp.bos_id() >= 0 else None)
    self.special_token_ids = [i for i in range(sp.vocab_size()) if sp.IsControl(i) or sp.IsUnknown(i)]
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(_without_dummy_prefix(sp.serialized_model_proto()))

  def __call__(self, text: bytes | str) -> list[int]:
    if isinstance(text, bytes): text = text.decode("utf-8", errors="replace")
    return self._sp.EncodeAsIds(text)


def _without_dummy_prefix(proto: bytes) -> bytes:
  """A serialized SentencePiece ModelProto with NormalizerSpec.add_dummy_prefix (field 3 of field 3) set false."""
  from tinyllama2 import spm_proto
  pieces, rest = spm_proto.parse_model(proto)
  out = []
  for num, wire, val in rest:
    if num == 3 and wire == 2:
      spec = [f for f in spm_proto.fields(bytes(val)) if f[0] != 3] + [(3, 0, 0)]
      val = b"".join(spm_proto.encode_field(*f) for f in spec)
    out.append((num, wire, val))
  return spm_proto.serialize_model(pieces, out)


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def lltokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
  """The llguidance tokenizer for a tinyllama2 Tokenizer (or a bare SentencePieceProcessor), built once per
  tokenizer object (about a second for Llama-2's 32000 pieces) and kept while the tokenizer lives."""
  with _cache_lock:
    if (hit := _cache.get(tokenizer)) is not None: return hit
    sp = getattr(tokenizer, "sp", tokenizer)
    llt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceWrapper(sp)))
    _cache[tokenizer] = llt
    return llt


class Constraint:
  """The parser state of one constrained sequence: which token may come next.

  mask(logits) before sampling each token, advance(token) after choosing it, done() to know the output is
  complete. Not thread-safe; make one per sequence (they share the cached LLTokenizer)."""

  def __init__(self, tokenizer: Any, grammar: str):
    self.lltokenizer = lltokenizer(tokenizer)
    self.eos_id: int = self.lltokenizer.eos_token
    self.vocab_size: int = self.lltokenizer.vocab_size
    self._matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
    if self._matcher.is_error(): raise ValueError(f"invalid grammar: {_line(self._matcher.get_error())}")
    self._bits = llnp.allocate_token_bitmask(1, self.vocab_size)

  def allowed(self) -> np.ndarray:
    """The tokens that may come next, as a bool vector over the tokenizer's vocabulary."""
    llnp.fill_next_token_bitmask(self._matcher, self._bits)
    if self._matcher.is_error(): raise RuntimeError(f"constraint failed: {_line(self._matcher.get_error())}")
    words = self._bits[0].astype("<i4", copy=False)   # bit j of word k is token 32k + j
    return np.unpackbits(words.view(np.uint8), count=self.vocab_size, bitorder="little").view(bool)

  def mask(self, logits: np.ndarray) -> np.ndarray:
    """A copy of `logits` (shape [vocab], or [..., vocab] for one row per candidate) with every token the grammar
    forbids set to -inf, and every row past the tokenizer's vocabulary (a model's padding rows) too. Once the output
    is complete only EOS is left."""
    logits = np.asarray(logits)
    if not np.issubdtype(logits.dtype, np.floating): logits = logits.astype(np.float32)
    keep = self.allowed()
    width = logits.shape[-1]
    if width < keep.size: keep = keep[:width]
    elif width > keep.size: keep = np.concatenate([keep, np.zeros(width - keep.size, dtype=bool)])
    return np.where(keep, logits, logits.dtype.type(-np.inf))

  def advance(self, token: int) -> None:
    """Consume the chosen token. ValueError if the grammar does not allow it; the state is then unchanged (the
    constraint still wants a token it allows)."""
    token = int(token)
    # validate_tokens never counts EOS, even where the grammar allows it: EOS is allowed when the output is valid
    ok = self._matcher.is_accepting() if token == self.eos_id else \
      0 <= token < self.vocab_size and self._matcher.validate_tokens([token]) == 1
    if not ok:
      raise ValueError(f"token {token} {self._show(token)} is not allowed here by the response format")
    if not self._matcher.consume_token(token):
      raise RuntimeError(f"constraint failed on token {token}: {_line(self._matcher.get_error())}")

  def done(self) -> bool:
    """True once the output is complete: nothing but EOS may follow (and after EOS has been consumed)."""
    return self._matcher.is_stopped() and not self._matcher.is_error()

  def accepting(self) -> bool:
    """True when the output so far is already valid (EOS allowed), even if it could also go on (e.g. a number)."""
    return self._matcher.is_accepting()

  def _show(self, token: int) -> str:
    return self.lltokenizer.dbg_tokens([token]) if 0 <= token < self.vocab_size else "(outside the vocabulary)"


def _kind(v: Any) -> str: return type(v).__name__ if v is not None else "null"


def _line(e: Any) -> str:
  """An error of llguidance's in one line: its first (the rest is parser state and the grammar), or for a regex
  error (which spans lines) the pattern and the reason."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  if not lines: return type(e).__name__
  reason = next((ln for ln in lines[2:] if ln.startswith("error:")), None)
  if lines[0].endswith(":") and reason: return f"{lines[0][:-1]} in {lines[1]!r}: {reason[6:].strip()}"
  return lines[0]
