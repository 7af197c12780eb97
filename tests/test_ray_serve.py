"""`tinyllama2 serve --ray`: replicas of the bundled model on a local Ray instance behind Ray Serve's HTTP proxy,
driven by the official `openai` client — every answer equal to one `tinyllama2 serve`'s, conversations kept on the
replica that holds their prefix."""
import concurrent.futures

import pytest

from serving import Server

pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install -e '.[ray]'")
openai = pytest.importorskip("openai", reason="the serve extra is not installed: pip install -e '.[serve,dev]'")

REPLICA = "x-tinyllama2-replica"


def _requests() -> list[dict]:
  """20 different requests: chat and text completions, greedy, some streamed."""
  out = []
  for i in range(20):
    if i % 2: out.append({"kind": "chat", "messages": [{"role": "user", "content": f"Tell story {i} about a dog"}]})
    else: out.append({"kind": "text", "prompt": f"Story {i}: Once upon a time"})
    out[-1].update(max_tokens=12 + i % 5, stream=i % 4 == 0)
  return out


def _ask(client, r: dict) -> tuple[str, str | None]:
  """(the answer, the replica that gave it: None for a stream)."""
  kw = dict(model="bundled", max_tokens=r["max_tokens"], temperature=0)
  if r["kind"] == "chat":
    if r["stream"]:
      return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        messages=r["messages"], stream=True, **kw) if c.choices), None
    raw = client.chat.completions.with_raw_response.create(messages=r["messages"], **kw)
    return raw.parse().choices[0].message.content, raw.headers.get(REPLICA)
  if r["stream"]:
    return "".join(c.choices[0].text for c in client.completions.create(prompt=r["prompt"], stream=True, **kw)), None
  raw = client.completions.with_raw_response.create(prompt=r["prompt"], **kw)
  return raw.parse().choices[0].text, raw.headers.get(REPLICA)


@pytest.mark.slow
def test_two_replicas_on_ray_serve_answer_as_one_server(bundled_server):
  ray_server = Server("--ray", "--replicas", "2", "--model-alias", "bundled", "--shutdown-timeout", "2", timeout=300)
  try:
    client = openai.OpenAI(base_url=ray_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    one = openai.OpenAI(base_url=bundled_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    requests = _requests()
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
      answers = list(pool.map(lambda r: _ask(client, r), requests))
    for r, (text, _) in zip(requests, answers):
      assert text == _ask(one, r)[0], r
    assert len({replica for _, replica in answers if replica}) == 2   # both replicas served
    # a conversation's next turns go to the replica that served its earlier turns
    for opening in ("A cat sat on the mat", "Why is the sky blue", "Lily had a red ball"):
      messages, replicas = [{"role": "user", "content": opening}], []
      for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="bundled", messages=messages, max_tokens=8,
                                                               temperature=0)
        replicas.append(raw.headers.get(REPLICA))
        messages += [{"role": "assistant", "content": raw.parse().choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
      assert len(set(replicas)) == 1, replicas
    assert client.models.list().data[0].id == "bundled"
  finally:
    assert ray_server.stop(timeout=120) == 0, "".join(ray_server.stderr)[-3000:]


def test_a_missing_model_is_an_error_before_ray_starts(tmp_path):
  import subprocess
  import sys
  from tinyllama2.devices import child_env
  run = subprocess.run([sys.executable, "-m", "tinyllama2.cli", "serve", "--ray", "--model", str(tmp_path / "none"),
                        "--port", "0"], capture_output=True, text=True, env=child_env("CPU"), timeout=120)
  assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == f"error: model not found: {tmp_path / 'none'}"
  assert "Ray" not in run.stderr and "Traceback" not in run.stderr


def test_more_replicas_than_the_cluster_holds_is_an_error():
  """Ray would wait for them forever; a local cluster has this machine's CPUs."""
  import os
  import subprocess
  import sys
  from tinyllama2.devices import child_env
  replicas = (os.cpu_count() or 1) + 1
  run = subprocess.run([sys.executable, "-m", "tinyllama2.cli", "serve", "--ray", "--replicas", str(replicas),
                        "--port", "0"], capture_output=True, text=True, env=child_env("CPU"), timeout=300)
  assert run.returncode == 1, run.stderr[-2000:]
  assert run.stderr.strip().splitlines()[-1].startswith(f"error: --replicas {replicas} x --replica-cpus 1 needs")
