"""Benchmark of many simultaneous requests on one engine: aggregate decode tokens/s and per-request latency.

For each concurrency c, c requests of different prompt lengths are submitted at once (greedy, no end-of-sequence,
so each makes exactly new_tokens tokens); the engine notes when it made each token.
Aggregate decode throughput counts the tokens that arrive while all c are decoding (from the moment the last one
got its first token to the moment the first one finished), so prefill does not dilute it; time to first token is
from submission, inter-token latency the gaps between one request's tokens. Every figure is compared with c = 1
measured in the same run (the command line is `tinyllama2 bench --concurrency`, cli/bench.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class ConcurrencyResult:
  model: str
  dtype: str
  concurrency: int
  decode_tok_s: float        # aggregate, while all requests decode
  ttft_p50_s: float
  ttft_max_s: float
  itl_p50_ms: float          # inter-token latency of one request
  itl_p95_ms: float
  vs_single: float = 1.0     # decode_tok_s / the c = 1 figure of the same run


def prompt_lengths(concurrency: int, prompt_len: int) -> list[int]:
  """Different prompt lengths for the requests: a quarter, half, three quarters and all of prompt_len in turn."""
  return [max(1, prompt_len * (1 + i % 4) // 4) for i in range(concurrency)]


def _run_once(llm, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[float]]]:
  """Submit all prompts at once; (submission time, the times their tokens were made) per request. The requests
  are read after they are done (their steps wait in their queues), so no reader thread takes a core from the
  engine: the times are the engine's (`Request.made_at`)."""
  from .generate import GenerationConfig, Stopping
  cfg = GenerationConfig.of(max_new_tokens=new_tokens)
  stopping = Stopping(set(), new_tokens, llm.model.max_seq_len)
  llm.decoder.forget()   # every prompt prefilled in full, as a new request's would be
  submitted, requests = [], []
  for p in prompts:
    submitted.append(time.perf_counter())
    requests.append(llm.engine.submit(p, cfg, stopping))
  for r in requests:
    for _ in r: pass
  return submitted, [r.made_at for r in requests]


def _measure(submitted: list[float], arrivals: list[list[float]]) -> tuple[float, list[float], list[float]]:
  """(aggregate decode tokens/s, times to first token, inter-token gaps) of one run."""
  start, end = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)
  inside = sum(sum(start < t <= end for t in a) for a in arrivals)
  if end <= start:   # one request finished before another's first token: no common window; the whole run instead
    start, end = min(a[0] for a in arrivals), max(a[-1] for a in arrivals)
    inside = sum(len(a) - 1 for a in arrivals)
  rate = inside / (end - start)
  gaps = [b - a for arr in arrivals for a, b in zip(arr, arr[1:])]
  return rate, [a[0] - s for a, s in zip(arrivals, submitted)], gaps


def bench_concurrency(model: str, device: str | None, dtype: str, levels: list[int], prompt_len: int = 128,
                      new_tokens: int = 64, quantize: str | None = None, repeats: int = 2) -> list[ConcurrencyResult]:
  """One row per concurrency level for one model × dtype × quantization; the engine has max(levels) slots. Each
  level runs twice to capture its graphs, then `repeats` times; the best aggregate rate counts (with its latencies)."""
  from .benchmark import build_model
  if min(levels) < 1: raise ValueError(f"--concurrency levels must be at least 1, got {levels}")
  if new_tokens < 4: raise ValueError(f"new_tokens must be at least 4 for inter-token latencies, got {new_tokens}")
  llm = build_model(model, device, dtype, prompt_len + new_tokens + 1, quantize=quantize, slots=max(levels))
  rng = np.random.default_rng(0)
  name = {"float": "float32", "half": "float16"}.get(llm.model.dtype.name, llm.model.dtype.name) + \
    (f"+{quantize}" if quantize else "")
  rows = []
  for c in levels:
    prompts = [[1] + rng.integers(3, llm.args.vocab_size, n - 1).tolist() for n in prompt_lengths(c, prompt_len)]
    for _ in range(2): _run_once(llm, prompts, new_tokens)   # captures this level's graphs, then replays them once
    best = max((_measure(*_run_once(llm, prompts, new_tokens)) for _ in range(repeats)), key=lambda r: r[0])
    rate, ttft, gaps = best
    rows.append(ConcurrencyResult(model, name, c, rate, float(np.median(ttft)), max(ttft),
                                  float(np.percentile(gaps, 50)) * 1e3, float(np.percentile(gaps, 95)) * 1e3))
  single = next((r.decode_tok_s for r in rows if r.concurrency == 1), None)
  for r in rows: r.vs_single = r.decode_tok_s / single if single else float("nan")
  return rows


def format_concurrency_table(rows: list[ConcurrencyResult]) -> str:
  head = ("model", "dtype", "concurrent requests", "aggregate decode tok/s", "x single stream", "TTFT p50 s",
          "TTFT max s", "inter-token p50 ms", "inter-token p95 ms")
  lines = [" | ".join(head), " | ".join("---" for _ in head)]
  for r in rows:
    lines.append(" | ".join([r.model, r.dtype, str(r.concurrency), f"{r.decode_tok_s:.1f}", f"{r.vs_single:.2f}",
                             f"{r.ttft_p50_s:.3f}", f"{r.ttft_max_s:.3f}", f"{r.itl_p50_ms:.1f}", f"{r.itl_p95_ms:.1f}"]))
  return "\n".join(lines)
