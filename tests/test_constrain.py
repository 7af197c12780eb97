"""Constrained decoding for response_format (tinyllama2/serve/constrain.py): whatever the logits, the text parses as
JSON and validates against the schema; the llguidance tokenizer sees SentencePiece's pieces as their exact bytes."""
import json

import numpy as np
import pytest

from conftest import LLAMA_TOK, need
from tinyllama2 import DEFAULT_MODEL

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test extra: pip install -e '.[dev]'")
pytest.importorskip("llguidance", reason="llguidance is in the serve extra: pip install -e '.[serve]'")
from tinyllama2.serve.constrain import Constraint, json_grammar, lltokenizer, token_bytes  # noqa: E402
from tinyllama2.tokenizer import Tokenizer

BUNDLED_TOK = DEFAULT_MODEL / "tokenizer.model"


@pytest.fixture(scope="module")
def llama_tok() -> Tokenizer:
  need(LLAMA_TOK)
  return Tokenizer(LLAMA_TOK)


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
  if not BUNDLED_TOK.is_file(): pytest.skip(f"bundled tokenizer not found: {BUNDLED_TOK}")
  return Tokenizer(BUNDLED_TOK)


def schema_format(schema: dict, name: str = "answer") -> dict:
  return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "color", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}
ADDRESS = {"type": "object", "required": ["city"],
           "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}
NESTED = {"type": "object", "required": ["id", "owner", "items"],
          "properties": {"id": {"type": "integer"}, "active": {"type": "boolean"},
                         "owner": {"type": "object", "required": ["name", "address"],
                                   "properties": {"name": {"type": "string", "minLength": 1}, "address": ADDRESS}},
                         "items": {"type": "array", "minItems": 1,
                                   "items": {"type": "object", "required": ["sku", "qty"], "additionalProperties": False,
                                             "properties": {"sku": {"type": "string"}, "qty": {"type": "number"}}}}}}
DEFS = {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "required": ["kind", "points"],
        "properties": {"kind": {"type": "string", "enum": ["line", "polygon"]},
                       "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 2, "maxItems": 4},
                       "label": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]}}}
TOP_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 6}
SCHEMAS = {"person": PERSON, "nested": NESTED, "defs": DEFS, "top_array": TOP_ARRAY}


_closers: dict[int, np.ndarray] = {}


def closers(tok: Tokenizer) -> np.ndarray:
  """1.0 on the tokens holding a quote or a closing bracket. Pure random logits pick among the ~32000 string tokens
  for hundreds of steps before a quote, so the driver adds a bias to these that grows with the step."""
  if id(tok) not in _closers:
    _closers[id(tok)] = np.array([any(c in t for c in b'"}]') for t in token_bytes(tok.sp)], dtype=np.float32)
  return _closers[id(tok)]


def drive(tok: Tokenizer, grammar: str, seed: int, width: int | None = None,
          limit: int = 1500) -> tuple[list[int], Constraint]:
  """Greedy argmax over masked random logits until the constraint is done or EOS comes; the chosen tokens."""
  c, rng, bias = Constraint(tok, grammar), np.random.default_rng(seed), closers(tok)
  width = width or tok.vocab_size
  ids: list[int] = []
  while not c.done():
    assert len(ids) < limit, f"no end after {limit} tokens: {tok.decode(ids)[:200]!r}"
    logits = rng.standard_normal(width).astype(np.float32)
    logits[:tok.vocab_size] += bias * 0.03 * len(ids)
    logits[tok.vocab_size:] += 100.0   # padding rows of a bigger model vocabulary, masked whatever their value
    masked = c.mask(logits)
    assert masked.shape == logits.shape and np.isfinite(masked).any()
    token = int(np.argmax(masked))
    assert token < tok.vocab_size
    if token == tok.eos_id: break
    c.advance(token)
    ids.append(token)
  assert c.accepting()
  return ids, c


def text_of(tok: Tokenizer, ids: list[int]) -> str:
  text = tok.decode(ids)
  assert lltokenizer(tok).decode_bytes(ids).decode("utf-8") == text   # llguidance's bytes are SentencePiece's text
  return text


# the tokenizer


def test_token_bytes_are_sentencepiece_bytes(llama_tok):
  sp, toks = llama_tok.sp, token_bytes(llama_tok.sp)
  assert len(toks) == 32000
  assert toks[0] == b"\xff<unk>" and toks[1] == b"\xff<s>" and toks[2] == b"\xff</s>"
  assert [toks[3 + b] for b in range(256)] == [bytes([b]) for b in range(256)]   # <0x00>..<0xFF>
  assert toks[sp.PieceToId("<0x0A>")] == b"\n"
  assert toks[sp.PieceToId("\u2581world")] == b" world" and toks[sp.PieceToId("\u2581")] == b" "
  assert all(b"\xff" not in t for i, t in enumerate(toks) if i > 3 + 255)
  for i in range(259, 32000, 997):   # a normal piece's bytes are its decoded text after another token
    assert toks[i].decode("utf-8") == sp.DecodeIds([13, i])[1:]


@pytest.mark.parametrize("text", ["hello", " hello world", '{"a": [1, 2.5e-3, null]}', "\n\ttabs\n", "héllo 日本語 🙂",
                                  "  two spaces", "\x01\x7f bytes"])
def test_lltokenizer_tokenizes_exact_bytes(llama_tok, text):
  llt = lltokenizer(llama_tok)
  ids = llt.tokenize_str(text)
  assert llt.decode_bytes(ids) == text.encode("utf-8")   # no dummy-prefix space
  assert llt.decode_bytes(llama_tok.sp.EncodeAsIds(text)) == b" " + text.encode("utf-8")
  if text.startswith(" "): assert ids == llama_tok.sp.EncodeAsIds(text[1:])   # SentencePiece's own tokens


def test_lltokenizer_is_built_once_per_tokenizer(llama_tok, small_tok):
  llt = lltokenizer(llama_tok)
  assert lltokenizer(llama_tok) is llt and lltokenizer(small_tok) is not llt
  assert llt.vocab_size == 32000 and llt.eos_token == llama_tok.eos_id == 2
  assert lltokenizer(small_tok).vocab_size == 512
  assert all(llt.is_special_token(i) for i in (0, 1, 2)) and not llt.is_special_token(13)


# generation with random logits


@pytest.mark.parametrize("seed", range(6))
def test_json_object_with_random_logits(llama_tok, seed):
  ids, c = drive(llama_tok, json_grammar({"type": "json_object"}), seed, width=32064)
  assert isinstance(json.loads(text_of(llama_tok, ids)), dict)
  assert c.done()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_with_random_logits(llama_tok, name, seed):
  ids, _ = drive(llama_tok, json_grammar(schema_format(SCHEMAS[name], name)), seed)
  jsonschema.validate(json.loads(text_of(llama_tok, ids)), SCHEMAS[name])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["json_object", "person", "defs"])
def test_bundled_tokenizer_with_random_logits(small_tok, name, seed):
  rf = {"type": "json_object"} if name == "json_object" else schema_format(SCHEMAS[name], name)
  ids, _ = drive(small_tok, json_grammar(rf), seed)
  value = json.loads(text_of(small_tok, ids))
  if name == "json_object": assert isinstance(value, dict)
  else: jsonschema.validate(value, SCHEMAS[name])


def test_model_greedy_through_the_engine_makes_valid_json():
  """The bundled story model (it knows no JSON, so the mask does all the work) generating on the engine with the
  constraint; the schema's own x-guidance turns whitespace off, which keeps the output to a few tokens. Each token
  must be the most likely one the grammar allowed at its step (checked with a second Constraint replaying them)."""
  from tinyllama2 import GenerationConfig, Llama
  llm = Llama.from_pretrained(DEFAULT_MODEL, slots=1)
  schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
  grammar = json_grammar(schema_format(schema))
  ids = llm.tokenizer.encode("Once upon a time, the answer was", bos=True)
  steps = list(llm.submit(ids, GenerationConfig.of(max_new_tokens=16), constraint=Constraint(llm.tokenizer, grammar)))
  assert steps[-1].finish_reason == "stop"
  replay = Constraint(llm.tokenizer, grammar)
  for s in steps:
    if s.token is None: break
    assert s.token == int(np.argmax(replay.mask(s.logits)))
    replay.advance(s.token)
  assert replay.done()
  assert text_of(llm.tokenizer, [s.token for s in steps if s.token is not None]) in ('{"ok":true}', '{"ok":false}')


# the constraint's contract


def test_complete_output_allows_only_eos(llama_tok):
  llt = lltokenizer(llama_tok)
  c = Constraint(llama_tok, json_grammar(schema_format({"type": "object", "properties": {"a": {"type": "integer"}},
                                                        "required": ["a"], "additionalProperties": False})))
  assert not c.done() and not c.accepting()
  for t in llt.tokenize_str('{"a":12'): c.advance(t)
  assert not c.accepting()
  with pytest.raises(ValueError, match="not allowed"): c.advance(llama_tok.eos_id)
  c.advance(llt.tokenize_str("}")[0])
  assert c.done() and c.accepting()
  assert np.flatnonzero(c.allowed()).tolist() == [llama_tok.eos_id]
  masked = c.mask(np.zeros(32003, dtype=np.float32))
  assert np.flatnonzero(np.isfinite(masked)).tolist() == [llama_tok.eos_id]
  with pytest.raises(ValueError, match="not allowed"): c.advance(13)
  c.advance(llama_tok.eos_id)
  assert c.done()


def test_rejected_token_leaves_the_state_alone(llama_tok):
  llt = lltokenizer(llama_tok)
  c = Constraint(llama_tok, json_grammar({"type": "json_object"}))
  before = c.allowed().copy()
  assert before.sum() < 10 and not before[llama_tok.eos_id]   # only '{' tokens at first
  for bad in (llt.tokenize_str("hello")[0], llama_tok.eos_id, llama_tok.bos_id, 0, 32000, -1):
    with pytest.raises(ValueError, match="not allowed"): c.advance(bad)
  assert np.array_equal(c.allowed(), before)
  for t in llt.tokenize_str('{"k": [true, null]}'): c.advance(t)
  assert c.done()


def test_mask_shapes_and_dtypes(llama_tok):
  c = Constraint(llama_tok, json_grammar({"type": "json_object"}))
  allowed = c.allowed()
  logits = np.random.default_rng(0).standard_normal((3, 32000)).astype(np.float16)
  masked = c.mask(logits)
  assert masked.dtype == np.float16 and masked.shape == (3, 32000)
  assert np.array_equal(np.isfinite(masked), np.broadcast_to(allowed, (3, 32000)))
  assert np.array_equal(masked[:, allowed], logits[:, allowed])
  assert np.isfinite(c.mask(np.zeros(32000, dtype=np.int64))).sum() == allowed.sum()
  short = c.mask(np.zeros(300, dtype=np.float32))   # fewer rows than pieces: the pieces past them can't be chosen
  assert short.shape == (300,) and np.array_equal(np.isfinite(short), allowed[:300])
  logits = np.zeros(32000, dtype=np.float32)
  c.mask(logits)
  assert (logits == 0).all()   # the input is not modified


# bad response formats


def test_text_and_none_have_no_grammar():
  assert json_grammar(None) is None and json_grammar({"type": "text"}) is None
  for rf in ({"type": "json_object"}, {"type": "json_schema"}, schema_format({}), schema_format(PERSON),
             {"type": "json_schema", "json_schema": {"name": "x", "schema": True}}):
    assert isinstance(json_grammar(rf), str)


@pytest.mark.parametrize("rf, message", [
  ("json", "must be an object"),
  ([{"type": "json_object"}], "must be an object"),
  ({}, "response_format.type"),
  ({"type": "xml"}, "response_format.type"),
  ({"type": "json_schema", "json_schema": None}, "json_schema must be an object"),
  ({"type": "json_schema", "json_schema": "{}"}, "json_schema must be an object"),
  ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "name must be a string"),
  ({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes", "schema": {}}}, "strict must be a boolean"),
  (schema_format([{"type": "string"}]), "must be a JSON Schema object"),
  (schema_format(False), "no output satisfies"),
  (schema_format({"type": "foo"}), "Invalid type"),
  (schema_format({"type": "string", "pattern": "("}), "regex parse error"),
  (schema_format({"$ref": "#/$defs/missing"}), "does not exist"),
  (schema_format({"type": "string", "minLength": "a"}), "minLength"),
  (schema_format({"type": "integer", "minimum": 5, "maximum": 1}), "Unsatisfiable"),
  (schema_format({"type": "number", "minimum": float("nan")}), "invalid JSON schema"),
  (schema_format({"type": "string", "format": "nonsense"}), "Unknown format"),
  (schema_format({"type": "array", "uniqueItems": True}), "Unimplemented keys"),
  (schema_format({"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False}),
   "Unsatisfiable"),
])
def test_bad_response_format_raises_one_line(rf, message):
  with pytest.raises(ValueError, match=message) as e: json_grammar(rf)
  assert "\n" not in str(e.value) and len(str(e.value)) < 300
