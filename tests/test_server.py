"""The OpenAI-compatible server, driven by the official `openai` client against a real `tinyllama2 serve` process;
answers checked against the library in-process and against the numpy reference forward pass."""
import base64
import json

import numpy as np
import pytest

import reference_numpy
from conftest import STORIES, TOK512, need
from serving import Server

openai = pytest.importorskip("openai", reason="the official openai client is a test extra: pip install -e '.[dev]'")

MESSAGES = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def llm():
  from tinyllama2 import DEFAULT_MODEL, Llama
  from tinyllama2.tokenizer import PlainTemplate
  llm = Llama.from_pretrained(DEFAULT_MODEL, slots=2)
  llm.chat_template = PlainTemplate()   # what the server picks for a base (non-chat) model
  return llm


@pytest.fixture(scope="module")
def client(bundled_server):
  return openai.OpenAI(base_url=bundled_server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_greedy_equals_the_library(client, llm):
  r = client.chat.completions.create(model="bundled", messages=MESSAGES, max_tokens=24, temperature=0)
  g = llm.chat(MESSAGES, max_new_tokens=24)
  assert r.choices[0].message.content == g.text and r.choices[0].message.role == "assistant"
  assert r.choices[0].finish_reason == g.finish_reason == "length"
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(g.prompt_tokens), len(g.tokens))
  assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_chunks(client, llm):
  chunks = list(client.chat.completions.create(model="bundled", messages=MESSAGES, max_tokens=20, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == llm.chat(MESSAGES, max_new_tokens=20).text
  finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  assert finals == ["length"]
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
  assert all(c.usage is None for c in chunks[:-1])


def test_completions_text_ids_and_batches(client, llm):
  ids = llm.tokenizer.encode("The dog")
  want = llm.generate(ids, max_new_tokens=12).text
  r = client.completions.create(model="bundled", prompt="The dog", max_tokens=12, temperature=0)
  assert r.choices[0].text == want and r.object == "text_completion"
  assert client.completions.create(model="bundled", prompt=ids, max_tokens=12, temperature=0).choices[0].text == want
  r = client.completions.create(model="bundled", prompt=["The dog", "Lily"], max_tokens=12, temperature=0)
  assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [want, llm.generate("Lily", max_new_tokens=12).text]
  streamed = client.completions.create(model="bundled", prompt="The dog", max_tokens=12, temperature=0, stream=True)
  assert "".join(c.choices[0].text for c in streamed if c.choices) == want
  echo = client.completions.create(model="bundled", prompt="The dog", max_tokens=12, temperature=0, echo=True)
  assert echo.choices[0].text == "The dog" + want


def test_n_and_seed_reproducible(client, llm):
  kw = dict(model="bundled", messages=MESSAGES, max_tokens=16, temperature=0.9, top_p=0.95, n=2)
  a = client.chat.completions.create(seed=7, **kw)
  b = client.chat.completions.create(seed=7, **kw)
  texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
  assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)] and len(texts) == 2
  lib = llm.chat(MESSAGES, max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95, top_k=0, seed=7,
                 num_return_sequences=2)
  assert texts == [g.text for g in lib]
  c = client.chat.completions.create(seed=8, **kw)
  assert [x.message.content for x in c.choices] != texts


def test_ignore_eos_makes_exactly_max_tokens(client):
  r = client.completions.create(model="bundled", prompt="The end.", max_tokens=200, temperature=0,
                                extra_body={"ignore_eos": True})
  assert r.usage.completion_tokens == 200 and r.choices[0].finish_reason == "length"


def test_stop_strings(client, llm):
  full = llm.generate("Once upon a time", max_new_tokens=40).text
  stop = full.split()[4]   # a word a few tokens in
  r = client.completions.create(model="bundled", prompt="Once upon a time", max_tokens=40, temperature=0,
                                stop=[stop, "zzzz"])
  assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
  s = client.completions.create(model="bundled", prompt="Once upon a time", max_tokens=40, temperature=0, stop=stop,
                                stream=True)
  assert "".join(c.choices[0].text for c in s if c.choices) == full[:full.index(stop)]


def test_logprobs_match_the_numpy_forward(client, llm):
  r = client.chat.completions.create(model="bundled", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                     top_logprobs=3)
  prompt = llm.chat_template.encode(MESSAGES, llm.tokenizer)
  new = llm.chat(MESSAGES, max_new_tokens=6).tokens
  weights = {k: v.numpy() for k, v in llm.model.state_dict().items()}
  logits = reference_numpy.forward(weights, llm.args, prompt + new)[len(prompt) - 1:-1]
  want = logits - logits.max(-1, keepdims=True)
  want = want - np.log(np.exp(want).sum(-1, keepdims=True))
  content = r.choices[0].logprobs.content
  assert len(content) == len(new)
  for row, entry, token in zip(want, content, new):
    assert entry.logprob == pytest.approx(row[token], abs=1e-3)
    assert [t.logprob for t in entry.top_logprobs] == pytest.approx(sorted(row)[::-1][:3], abs=1e-3)
    assert entry.top_logprobs[0].token == entry.token   # greedy: the chosen token is the most likely
  c = client.completions.create(model="bundled", prompt="The dog", max_tokens=5, temperature=0, logprobs=2)
  lp = c.choices[0].logprobs
  assert len(lp.tokens) == 5 and "".join(lp.tokens) == c.choices[0].text
  assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_embeddings_float_and_base64(client, bundled_server, llm):
  texts = ["The dog ran.", "Lily"]
  floats = client.embeddings.create(model="bundled", input=texts, encoding_format="float")
  b64 = client.embeddings.create(model="bundled", input=texts)   # the client asks for base64 and decodes it
  weights = {k: v.numpy() for k, v in llm.model.state_dict().items()}
  for text, f, b in zip(texts, floats.data, b64.data):
    h = reference_numpy.forward(weights, llm.args, llm.tokenizer.encode(text), hidden=True).mean(0)
    np.testing.assert_allclose(f.embedding, h / np.linalg.norm(h), atol=1e-4)
    assert f.embedding == b.embedding
  assert floats.usage.prompt_tokens == sum(len(llm.tokenizer.encode(t)) for t in texts)
  import httpx
  raw = httpx.post(bundled_server.url + "/v1/embeddings", json={"input": "Lily", "encoding_format": "base64"},
                   timeout=60).json()
  assert np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4").tolist() == b64.data[1].embedding


def test_models_health_tokenize(client, bundled_server, llm):
  import httpx
  assert [m.id for m in client.models.list()] == ["bundled"]
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
  assert httpx.get(bundled_server.url + "/health").json()["status"] == "ok"
  ids = httpx.post(bundled_server.url + "/tokenize", json={"content": "The dog", "add_special": True}).json()["tokens"]
  assert ids == llm.tokenizer.encode("The dog")
  assert httpx.post(bundled_server.url + "/detokenize", json={"tokens": ids}).json()["content"] == "The dog"
  metrics = httpx.get(bundled_server.url + "/metrics").text
  assert 'tinyllama2_requests_total{route="/v1/chat/completions",status="200"}' in metrics
  assert "tinyllama2_slots 4.0" in metrics and "tinyllama2_queue_length 0.0" in metrics


def test_api_key(tmp_path):
  key = tmp_path / "key"
  key.write_text("s3cret\n")
  server = Server("--api-key-file", str(key))
  try:
    import httpx
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
    assert good.completions.create(model="default_model", prompt="Hi", max_tokens=2).choices
    for wrong in ("nope", ""):
      with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=wrong or "x", max_retries=0,
                      default_headers={} if wrong else {"Authorization": ""}).models.list()
    assert httpx.get(server.url + "/health").status_code == 200   # health and the page stay open
    assert httpx.get(server.url + "/").status_code == 200
  finally:
    assert server.stop() == 0


def test_stories260k(stories_server, stories):
  c = openai.OpenAI(base_url=stories_server.url + "/v1", api_key="x", max_retries=0)
  want = stories.generate("Once upon a time", max_new_tokens=30).text
  r = c.completions.create(model="stories260K.bin", prompt="Once upon a time", max_tokens=30, temperature=0)
  assert r.choices[0].text == want
  s = c.chat.completions.create(model="stories260K.bin", messages=MESSAGES, max_tokens=30, temperature=0, stream=True)
  assert "".join(x.choices[0].delta.content or "" for x in s if x.choices) == want


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["dog", "cat", "bird"]}},
          "x-guidance": {"whitespace_flexible": False}}   # compact: every part bounded, so it always completes


def test_json_response_formats(client):
  jsonschema = pytest.importorskip("jsonschema")
  ask = [{"role": "user", "content": "Lily had a dog. Tell me about her as JSON:"}]
  # a story model writes JSON only because it must: an object's strings may run to max_tokens, so of sixteen samples
  # every one that ends ("stop") must parse, every other one stops at max_tokens, and some end (here 5-7 of 16)
  r = client.chat.completions.create(model="bundled", messages=ask, max_tokens=200, temperature=0.8, seed=0, n=16,
                                     frequency_penalty=2, presence_penalty=1, response_format={"type": "json_object"})
  ended = [c.message.content for c in r.choices if c.finish_reason == "stop"]
  assert ended and all(isinstance(json.loads(text), dict) for text in ended)
  assert all(c.finish_reason in ("stop", "length") for c in r.choices)
  for seed in (1, 2):
    r = client.chat.completions.create(model="bundled", messages=ask, max_tokens=200, temperature=0.8, seed=seed,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
  with pytest.raises(openai.BadRequestError):   # a schema keyword the grammar library does not implement
    client.chat.completions.create(model="bundled", messages=ask, max_tokens=20, response_format={
      "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}})
