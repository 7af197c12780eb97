"""Serving benchmark: requests/s and aggregate tokens/s of `tinyllama2 serve` at several numbers of concurrent
clients, beside llama.cpp's own `llama-server` on the same weights (one GGUF file), threads and slots, measured in
the same run; and the server's memory before and after many requests.

  python bench/serve_bench.py --llama-server /path/to/llama-server [--shapes stories15M,stories110M]
                              [--dtypes f32,q8_0] [--clients 1,4,8,16] [--slots 4] [--memory-requests 1000]

Each client sends `--requests` completions one after another (greedy, ignore_eos, exactly `--max-tokens` tokens
each; prompts of 8 to 64 tokens in turn); requests/s and tokens/s count all of them over the wall time of the level.
Both servers get a warm-up round first (our prefill graphs compile on first use). Weights are seeded random ones of
the named shape, with the Llama-2 tokenizer embedded (`--tokenizer`). This is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinyllama2.devices import USER_DEV, child_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA_TOK = REPO.parent / "shared" / "tokenizers" / "llama2_tokenizer.model"
WORDS = ("once upon a time there was a little girl named lily who loved to play in the park with her dog and "
         "one day they found a big red ball under a tree").split()


def prompts(n: int) -> list[str]:
  """Prompts of about 8, 16, 32 and 64 tokens in turn."""
  lengths = [6, 14, 30, 60]
  return [" ".join((WORDS * 4)[i % 5:i % 5 + lengths[i % 4]]) for i in range(n)]


def rss_mib(pid: int) -> float:
  text = Path(f"/proc/{pid}/status").read_text()
  return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


class Process:
  def __init__(self, cmd: list[str], url: str | None = None, env: dict | None = None):
    self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=env or child_env(USER_DEV or "CPU"))   # not the DEV tinygrad wrote here
    if url is None:   # ours prints its address
      line = self.proc.stdout.readline()
      url = re.search(r"(http://[\d.]+:\d+)", line).group(1)
    self.url = url
    threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
    deadline = time.time() + 600
    while time.time() < deadline:
      try:
        if httpx.get(url + "/health", timeout=5).status_code == 200: return
      except httpx.HTTPError: pass
      if self.proc.poll() is not None: raise RuntimeError(f"{cmd[0]} exited")
      time.sleep(0.5)
    raise RuntimeError(f"{cmd} did not become ready")

  def stop(self) -> None:
    self.proc.send_signal(signal.SIGTERM)
    try: self.proc.wait(30)
    except subprocess.TimeoutExpired: self.proc.kill()


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
  """(requests/s, completion tokens/s) of `clients` threads each sending `requests` completions in turn."""
  texts, tokens, errors = prompts(clients * requests), [0], []
  lock = threading.Lock()
  def client(c: int) -> None:
    with httpx.Client(timeout=600) as http:
      for r in range(requests):
        body = {"model": model, "prompt": texts[c * requests + r], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        resp = http.post(url + "/v1/completions", json=body)
        if resp.status_code != 200: errors.append(resp.text[:200]); continue
        with lock: tokens[0] += resp.json()["usage"]["completion_tokens"]
  t0 = time.perf_counter()
  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  for t in threads: t.start()
  for t in threads: t.join()
  wall = time.perf_counter() - t0
  if errors: raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
  return clients * requests / wall, tokens[0] / wall


def memory_growth(server: Process, model: str, n: int) -> tuple[float, float]:
  before = rss_mib(server.proc.pid)
  per_client = max(1, n // 8)
  run_level(server.url, model, 8, per_client, 8)
  return before, rss_mib(server.proc.pid)


def make_gguf(shape: str, dtype: str, tokenizer: Path, folder: str) -> str:
  from tinyllama2.benchmark import build_model
  from tinyllama2.checkpoint import gguf
  from tinyllama2.quantize import float_weights
  from tinyllama2.tokenizer import Tokenizer
  llm = build_model(shape, None, "float32", 512)
  path = os.path.join(folder, f"{shape}-{dtype}.gguf")
  gguf.save(path, llm.model.args, float_weights(llm.model), Tokenizer(tokenizer), dtype=dtype)
  return path


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--llama-server", help="llama.cpp's llama-server binary (the reference; omitted: ours alone)")
  p.add_argument("--shapes", default="stories15M,stories110M")
  p.add_argument("--dtypes", default="f32,q8_0")
  p.add_argument("--clients", default="1,4,8,16")
  p.add_argument("--requests", type=int, default=4, help="requests per client per level")
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--slots", type=int, default=4)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--memory-requests", type=int, default=1000)
  p.add_argument("--tokenizer", default=str(LLAMA_TOK))
  p.add_argument("--json", help="also write the rows here")
  a = p.parse_args()
  levels = [int(c) for c in a.clients.split(",")]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for shape in a.shapes.split(","):
      for dtype in a.dtypes.split(","):
        path = make_gguf(shape, dtype, Path(a.tokenizer), tmp)
        ctx = 512
        servers = {"tinyllama2": lambda: Process([sys.executable, "-m", "tinyllama2.cli", "serve", "--model", path,
                                                  "--port", "0", "--slots", str(a.slots), "--max-seq-len", str(ctx),
                                                  "--threads", str(a.threads), "--model-alias", "m"])}
        if a.llama_server:
          port = 18000 + len(rows)
          servers["llama.cpp"] = lambda: Process([a.llama_server, "-m", path, "--host", "127.0.0.1", "--port", str(port),
                                                  "-t", str(a.threads), "-tb", str(a.threads), "-np", str(a.slots),
                                                  "-c", str(ctx * a.slots), "--alias", "m", "--no-webui"],
                                                 url=f"http://127.0.0.1:{port}")
        for name, start in servers.items():   # one server at a time: two cores
          server = start()
          try:
            run_level(server.url, "m", a.slots, 2, 8)   # warm-up: every prompt length on every slot
            for c in levels:
              rps, tps = run_level(server.url, "m", c, a.requests, a.max_tokens)
              rows.append(dict(shape=shape, dtype=dtype, server=name, clients=c, requests_s=rps, tokens_s=tps))
              print(json.dumps(rows[-1]), flush=True)
            before, after = memory_growth(server, "m", a.memory_requests)
            rows.append(dict(shape=shape, dtype=dtype, server=name, memory_before_mib=before, memory_after_mib=after,
                             requests=a.memory_requests))
            print(json.dumps(rows[-1]), flush=True)
          finally: server.stop()
  print(table(rows))
  if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))


def table(rows: list[dict]) -> str:
  lines = ["| shape | dtype | clients | ours req/s | ours tok/s | llama.cpp req/s | llama.cpp tok/s | ours / llama.cpp |",
           "|---|---|---|---|---|---|---|---|"]
  ours = [r for r in rows if r["server"] == "tinyllama2" and "clients" in r]
  for r in ours:
    ref = next((x for x in rows if x["server"] == "llama.cpp" and x.get("clients") == r["clients"]
                and x["shape"] == r["shape"] and x["dtype"] == r["dtype"]), None)
    cells = [f"{ref['requests_s']:.2f}", f"{ref['tokens_s']:.1f}", f"{r['tokens_s'] / ref['tokens_s']:.2f}"] if ref else ["", "", ""]
    lines.append(f"| {r['shape']} | {r['dtype']} | {r['clients']} | {r['requests_s']:.2f} | {r['tokens_s']:.1f} | " + " | ".join(cells) + " |")
  for r in rows:
    if "memory_before_mib" in r:
      lines.append(f"\n{r['server']} {r['shape']} {r['dtype']}: RSS {r['memory_before_mib']:.0f} MiB before, "
                   f"{r['memory_after_mib']:.0f} MiB after {r['requests']} more requests")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
