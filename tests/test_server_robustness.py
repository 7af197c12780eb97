"""The server under bad input and bad clients: malformed and hostile requests get OpenAI error objects with a 4xx
status, clients that leave cancel their work, many clients at once get what they would get alone, and SIGTERM
stops the server cleanly (exit code 0)."""
import json
import re
import threading
import time

import pytest

from serving import Server, need_serve_extra

need_serve_extra()
import httpx  # noqa: E402

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "Once upon a time"}]
BAD_VALUES = {   # field → values that must be refused, for both generation endpoints
  "max_tokens": ["x", -1, 0, 1.5, True, [], {}],
  "temperature": ["hot", -0.1, 2.5, [], True],
  "top_p": [-1, 1.5, "all"],
  "n": [0, -3, 17, "2", 1.5],
  "stop": ["", [""], [1], ["a", "b", "c", "d", "e"], {"x": 1}, 5],
  "seed": ["x", 1.5, [1]],
  "frequency_penalty": [3, -3, "x"],
  "presence_penalty": [2.5, "x"],
  "stream": ["yes", 1, []],
  "stream_options": ["x", [], {"include_usage": "yes"}],
  "response_format": ["json", {"type": "xml"}, {"type": "json_schema", "json_schema": {"schema": 5}}, []],
  "top_k": ["x", -1, 1.5],
  "min_p": [2, -0.5, "x"],
  "repetition_penalty": [0, -1, "x"],
  "typical_p": [0, 2],
  "no_repeat_ngram_size": [-1, "x"],
  "penalty_last_n": [-5],
  "min_tokens": [-1, "x"],
  "logit_bias": [{"1": 5}],
  "not_a_field": [1, "x"],
}
CHAT_BAD = {
  "messages": [None, [], "hi", [1], [{"role": "bot", "content": "x"}], [{"role": "user"}],
               [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
               [{"role": "user", "content": None}], [{"role": 5, "content": "x"}]],
  "logprobs": ["yes", 1],
  "top_logprobs": [50, -1, "3"],
  "tools": [[{"type": "function", "function": {"name": "f"}}]],
  "max_completion_tokens": [0, "x", -5],
}
COMPLETION_BAD = {"prompt": [None, {}, [], [[]], [-1], [10 ** 9], [1.5], [True, 2], [["a"]]],
                  "logprobs": [6, -1, "x"], "echo": ["yes"], "best_of": [2], "suffix": ["x"]}


def hostile_requests() -> list[tuple[str, str, bytes | dict, dict]]:
  """(method, path, body, headers) of requests a server must refuse with a 4xx."""
  out = []
  for path, base, extra in ((CHAT, {"messages": MSG}, CHAT_BAD), (COMPLETIONS, {"prompt": "Hi"}, COMPLETION_BAD)):
    for field, values in {**BAD_VALUES, **extra}.items():
      out += [("POST", path, {**base, "max_tokens": 4, field: v}, {}) for v in values]
    out += [("POST", path, raw, {"content-type": "application/json"}) for raw in
            (b"", b"{", b'{"messages": [', b"null", b"[]", b'"text"', b"\xff\xfe\x00garbage", b"{'single': 1}",
             b'{"max_tokens": NaN}', b"\x00" * 64, b"1e999", b'{"a":')]
    out += [("POST", path, {**base, "model": "no-such-model"}, {}), ("GET", path, b"", {}),
            ("POST", path, {**base, "max_tokens": 4, "temperature": float("nan")}, {})]
  long = " ".join(["and then the dog ran"] * 120)   # past the bundled model's 256-token context
  out += [("POST", CHAT, {"messages": [{"role": "user", "content": long}]}, {}),
          ("POST", COMPLETIONS, {"prompt": long}, {}),
          ("POST", CHAT, {"messages": [{"role": "user", "content": "\ud800 lone surrogate"}], "max_tokens": 2}, {}),
          ("POST", "/v1/embeddings", {"input": []}, {}), ("POST", "/v1/embeddings", {"input": "x", "dimensions": 3}, {}),
          ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "hex"}, {}),
          ("POST", "/tokenize", {"content": 5}, {}), ("POST", "/detokenize", {"tokens": [-5]}, {}),
          ("POST", "/detokenize", {"tokens": "abc"}, {}), ("GET", "/v1/models/nope", b"", {}),
          ("GET", "/no/such/route", b"", {}), ("DELETE", "/v1/models", b"", {}),
          ("POST", CHAT, b"x" * (10 << 20), {"content-type": "application/json"})]   # 10 MB
  return out


def _send(url: str, method: str, path: str, body, headers: dict) -> httpx.Response:
  content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
  return httpx.request(method, url + path, content=content or None, headers=headers, timeout=60)


def test_hostile_requests_get_openai_errors(bundled_server):
  cases = hostile_requests()
  assert len(cases) >= 200
  for method, path, body, headers in cases:
    r = _send(bundled_server.url, method, path, body, headers)
    what = f"{method} {path} {str(body)[:80]!r}"
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in r.text, what
    assert set(error) == {"message", "type", "param", "code"}, what
  too_long = _send(bundled_server.url, "POST", COMPLETIONS, {"prompt": " ".join(["and then"] * 200)}, {})
  assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
  assert _send(bundled_server.url, "POST", CHAT, b"x" * (10 << 20), {}).status_code == 413
  deep = _send(bundled_server.url, "POST", CHAT, b"[" * 100_000, {})
  assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
  for form in ("text/plain", "application/x-www-form-urlencoded"):   # what a web page elsewhere could send us
    r = _send(bundled_server.url, "POST", COMPLETIONS, {"prompt": "Hi", "max_tokens": 2}, {"content-type": form})
    assert r.status_code == 415, form
  rebound = httpx.get(bundled_server.url + "/v1/models", headers={"host": "evil.example"})
  assert rebound.status_code == 400   # a loopback server answers only to its own names (DNS rebinding)
  # still healthy, and still right
  assert httpx.get(bundled_server.url + "/health").json()["status"] == "ok"
  from tinyllama2 import DEFAULT_MODEL, Llama
  want = Llama.from_pretrained(DEFAULT_MODEL, slots=1).generate("The dog", max_new_tokens=16).text
  r = httpx.post(bundled_server.url + COMPLETIONS, json={"prompt": "The dog", "max_tokens": 16, "temperature": 0},
                 timeout=120)
  assert r.json()["choices"][0]["text"] == want


def test_huge_max_tokens_ends_at_the_context(bundled_server):
  r = httpx.post(bundled_server.url + COMPLETIONS, timeout=120,
                 json={"prompt": "Once", "max_tokens": 10 ** 9, "temperature": 0, "ignore_eos": "no"})
  assert r.status_code == 400
  r = httpx.post(bundled_server.url + COMPLETIONS, timeout=120,
                 json={"prompt": "Once", "max_tokens": 10 ** 9, "temperature": 0.8, "seed": 1})
  body = r.json()
  assert r.status_code == 200 and body["usage"]["total_tokens"] <= 256


@pytest.fixture(scope="module")
def long_server():
  """The bundled model with a 4096-token context, so that one answer takes seconds."""
  server = Server("--max-seq-len", "4096", "--slots", "2", "--max-waiting", "1")
  yield server
  assert server.stop() == 0, "".join(server.stderr)


def _generated(url: str) -> float:
  m = re.search(r'tinyllama2_tokens_total\{kind="generated"\} ([\d.e+]+)', httpx.get(url + "/metrics").text)
  return float(m.group(1)) if m else 0.0


def _settles(url: str) -> tuple[float, dict]:
  """Wait until nothing is generating; (tokens generated so far, /health)."""
  for _ in range(50):
    health = httpx.get(url + "/health").json()
    if health["slots_busy"] == 0 and health["waiting"] == 0: break
    time.sleep(0.1)
  a = _generated(url)
  time.sleep(0.5)
  assert _generated(url) == a, "generation went on after the client left"
  return a, health


def test_clients_that_leave_cancel_their_request(long_server):
  url = long_server.url
  body = {"prompt": "Once upon a time", "max_tokens": 3800, "temperature": 0.8, "seed": 3, "min_tokens": 3800}
  before = _generated(url)
  with httpx.stream("POST", url + COMPLETIONS, json={**body, "stream": True}, timeout=60) as r:
    lines = r.iter_lines()
    got = [next(lines) for _ in range(6)]   # a few events, then the client goes away
  assert any(line.startswith("data: {") for line in got)
  after, health = _settles(url)
  assert health["slots_busy"] == 0 and after - before < 3000
  with pytest.raises(httpx.ReadTimeout):   # not streaming: the client gives up waiting
    httpx.post(url + COMPLETIONS, json=body, timeout=1.0)
  again, health = _settles(url)
  assert health["slots_busy"] == 0 and again - after < 3000
  # the server still answers, right
  r = httpx.post(url + COMPLETIONS, json={"prompt": "The dog", "max_tokens": 8, "temperature": 0}, timeout=60)
  assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_a_slow_client_gets_a_whole_stream(bundled_server):
  events = []
  with httpx.stream("POST", bundled_server.url + CHAT, timeout=60,
                    json={"messages": MSG, "max_tokens": 40, "temperature": 0, "stream": True}) as r:
    for line in r.iter_lines():
      if line.startswith("data: "): events.append(line[6:])
      time.sleep(0.02)
  assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def _stream_text(url: str, prompt: str) -> str:
  text, finish, done = "", None, False
  with httpx.stream("POST", url + COMPLETIONS, timeout=300,
                    json={"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}) as r:
    assert r.status_code == 200
    for line in r.iter_lines():
      if not line.startswith("data: "): continue
      if line == "data: [DONE]": done = True; continue
      choice = json.loads(line[6:])["choices"][0]
      text += choice["text"]
      finish = choice["finish_reason"] or finish
  assert done and finish in ("stop", "length")
  return text


def test_32_concurrent_streams_equal_one_at_a_time(bundled_server):
  prompts = [f"{name} {verb}" for name in ("Lily", "Tom", "Sue", "Max") for verb in
             ("ran", "saw a", "said", "liked", "found a", "had a", "was", "went")]
  alone = [_stream_text(bundled_server.url, p) for p in prompts]
  together: list[str | None] = [None] * len(prompts)
  def run(i: int) -> None: together[i] = _stream_text(bundled_server.url, prompts[i])
  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
  for t in threads: t.start()
  for t in threads: t.join(300)
  assert together == alone and len(set(alone)) > 16


def test_sigterm_stops_cleanly():
  server = Server("--max-seq-len", "2048", "--shutdown-timeout", "2")
  events = []
  def stream() -> None:
    try:
      with httpx.stream("POST", server.url + COMPLETIONS, timeout=60,
                        json={"prompt": "Once", "max_tokens": 2000, "min_tokens": 2000, "stream": True}) as r:
        for line in r.iter_lines(): events.append(line)
    except httpx.HTTPError: events.append("closed")
  t = threading.Thread(target=stream)
  t.start()
  while not events: time.sleep(0.05)
  t0 = time.time()
  assert server.stop() == 0 and time.time() - t0 < 20
  t.join(10)
  assert not t.is_alive()


def test_a_full_queue_answers_503(long_server):
  body = {"prompt": "Once upon a time", "max_tokens": 3800, "temperature": 0.8, "ignore_eos": True, "stream": True}
  streams = []
  try:
    for _ in range(3):   # two slots and one waiting place
      cm = httpx.stream("POST", long_server.url + COMPLETIONS, json=body, timeout=60)
      streams.append(cm)
      assert cm.__enter__().status_code == 200
    while (h := httpx.get(long_server.url + "/health").json())["slots_busy"] + h["waiting"] < 3: time.sleep(0.02)
    r = httpx.post(long_server.url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy"
  finally:
    for cm in streams: cm.__exit__(None, None, None)
  _settles(long_server.url)
  assert httpx.post(long_server.url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200


def test_health_is_503_while_loading():
  server = Server(ready=False)
  try:
    statuses = []
    while not statuses or statuses[-1][0] != 200:
      r = httpx.get(server.url + "/health", timeout=30)
      statuses.append((r.status_code, r.json()["status"]))
      if r.status_code == 503:
        models = httpx.post(server.url + COMPLETIONS, json={"prompt": "x"}, timeout=30)
        assert models.status_code in (503, 200)
      time.sleep(0.05)
    assert statuses[0] == (503, "loading") and statuses[-1] == (200, "ok")
    assert all(s == (503, "loading") for s in statuses[:-1])
  finally:
    assert server.stop() == 0


def test_one_requests_failure_leaves_the_others_alone(bundled_server):
  """A constrained request whose own settings leave it no token (the schema wants forty a's, and
  no_repeat_ngram_size=1 lets no token come twice) fails alone, with a 400; a stream running beside it is unharmed."""
  want = _stream_text(bundled_server.url, "Lily saw a big")
  texts, failed = [], []
  def stream() -> None: texts.append(_stream_text(bundled_server.url, "Lily saw a big"))
  def doomed() -> None:
    schema = {"const": "a" * 40}
    failed.append(httpx.post(bundled_server.url + CHAT, timeout=120, json={
      "messages": MSG, "max_tokens": 40, "temperature": 0, "no_repeat_ngram_size": 1,
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}))
  threads = [threading.Thread(target=stream), threading.Thread(target=doomed)]
  for t in threads: t.start()
  for t in threads: t.join(120)
  assert failed[0].status_code == 400 and "not allowed" in failed[0].json()["error"]["message"]
  assert texts == [want]
