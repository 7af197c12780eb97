"""Benchmark: prefill and decode tokens/s, first-token latency (cold and warm), memory, bandwidth fraction.

Numbers are reported against the machine's own read bandwidth (measured with numpy in the same process),
so a decode figure reads as "fraction of what memory allows". The command line (`tinyllama2 bench`, bench/bench.py)
is cli/bench.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import threading
import time
from dataclasses import dataclass

import numpy as np

SHAPES = ("stories260K", "stories15M", "stories110M", "tinyllama-1.1b", "llama2-7b")


@dataclass
class BenchResult:
  model: str
  device: str
  dtype: str
  params_m: float
  weight_mb: float
  prefill_tok_s: float
  decode_tok_s: float
  ttft_cold_s: float
  ttft_warm_s: float
  peak_rss_mb: float
  device_mem_mb: float
  bandwidth_gb_s: float
  decode_frac_of_bw: float
  kernels_per_token: int
  threads: int = 1                 # threads per CPU decode kernel (runtime/cpu_threads.py)
  llama_cpp_prefill_tok_s: float | None = None   # llama.cpp on the same weights, prompt and threads (--llama-cpp)
  llama_cpp_decode_tok_s: float | None = None


def measure_read_bandwidth(n_bytes: int = 1 << 30, threads: int | None = None, repeats: int = 3) -> float:
  """GB/s of summing a large float32 array with one numpy thread per core (numpy releases the GIL)."""
  threads = threads or os.cpu_count() or 1
  a = np.ones(n_bytes // 4, dtype=np.float32)
  parts = np.array_split(a, threads)
  best = float("inf")
  for _ in range(repeats):
    ts = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
    t0 = time.perf_counter()
    for t in ts: t.start()
    for t in ts: t.join()
    best = min(best, time.perf_counter() - t0)
  return a.nbytes / best / 1e9


def measure_device_bandwidth(device: str, n_bytes: int = 1 << 30) -> float:
  """GB/s of a large copy on a tinygrad device, bytes read plus bytes written (for GPUs; the CPU uses numpy). A copy
  streams at the memory's practical limit; tinygrad's generic reduction over a large buffer does not."""
  from tinygrad import Device, Tensor, TinyJit
  x = Tensor.ones(n_bytes // 4, device=device).contiguous().realize()
  f = TinyJit(lambda: (x * 2).realize())
  for _ in range(3): f()
  Device[device].synchronize()
  t0 = time.perf_counter()
  for _ in range(10): f()
  Device[device].synchronize()
  return 2 * n_bytes * 10 / (time.perf_counter() - t0) / 1e9


def bytes_per_decode_step(model) -> int:
  """Parameter bytes one decode step reads: all of them, except the embedding table (one row is read)
  unless it doubles as the output head."""
  total = sum(p.nbytes() for p in model.state_dict().values())
  return total - (model.tok_embeddings.weight.nbytes() if model.output is not None else 0)


def _eager_decode_step(decoder, token: int, pos: int) -> None:
  """One decode step outside the JIT: kernel by kernel, so counts and DEBUG=2 times are per kernel (a GPU's JIT
  replays the step as a few CUDA graphs, which tinygrad counts and times as one kernel each)."""
  decoder.eager_step(token, pos)


def _kernels_per_decode_step(decoder, token: int, pos: int) -> int:
  from tinygrad import GlobalCounters
  _eager_decode_step(decoder, token, pos)   # the first eager run schedules and compiles
  GlobalCounters.reset()
  _eager_decode_step(decoder, token, pos)
  return GlobalCounters.kernel_count


def build_model(model: str, device: str | None, dtype: str, max_seq_len: int, tokenizer: str | None = None,
                quantize: str | None = None, slots: int | None = None):
  """A Llama from a path, or a named shape with seeded random weights."""
  from .config import PRESETS, preset
  from .llama import Llama, resolve_dtype
  from .model import Transformer
  from .quantize import quantize_model
  if model in PRESETS:
    args = preset(model)
    m = Transformer(args, max_seq_len=max(max_seq_len, 8), dtype=resolve_dtype(dtype), device=device)
    m.init_random(seed=0)
    if quantize: quantize_model(m, quantize)
    return Llama(m, None, slots=slots)
  return Llama.from_pretrained(model, tokenizer=tokenizer, device=device, dtype=dtype, max_seq_len=max_seq_len,
                               quantize=quantize, slots=slots)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_KERNEL_LINE = re.compile(r"\*\*\*\s+(\S+)\s+\d+\s+(.+?)\s+arg\s+\d+\s+mem.*?tm\s+([\d.]+)(us|ms|s)/.*?(\d+)\|(\d+)\s+GB/s")


def profile_kernels(fn) -> list[tuple[str, float, float]]:
  """(kernel, microseconds, GB/s) for each kernel fn() runs, from tinygrad's DEBUG=2 timing lines."""
  from tinygrad import Context
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf), Context(DEBUG=2): fn()
  rows = []
  for line in _ANSI.sub("", buf.getvalue()).splitlines():
    m = _KERNEL_LINE.search(line)
    if m is None: continue
    t = float(m.group(3)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(4)]
    name = m.group(2).strip()
    rows.append((name, t, _custom_kernel_gb_s(name, t) or float(m.group(5))))
  return rows


def _custom_kernel_gb_s(name: str, microseconds: float) -> float | None:
  """tinygrad has no byte count for our C matvec kernels; their names carry the weight shape and kind."""
  from .ops.cpu import BYTES_PER_WEIGHT
  m = re.fullmatch(r"(?:norm_)?(matvec\d?|swiglu)_(\w+?)_(\d+)_(\d+)(?:_res)?", name)   # norm_/_res: fused RMSNorm/residual
  if m is None or m.group(2) not in BYTES_PER_WEIGHT: return None
  matrices = 2 if m.group(1) == "swiglu" else 1
  return matrices * int(m.group(3)) * int(m.group(4)) * BYTES_PER_WEIGHT[m.group(2)] / (microseconds * 1e3)


def format_profile(rows: list[tuple[str, float, float]], top: int = 15) -> str:
  total = sum(t for _, t, _ in rows)
  lines = [f"{len(rows)} kernels, {total / 1e3:.2f} ms of kernel time; slowest:",
           "kernel | us | share | GB/s", "--- | --- | --- | ---"]
  for name, t, gbs in sorted(rows, key=lambda r: -r[1])[:top]:
    lines.append(f"{name} | {t:.0f} | {t / max(total, 1e-9):.0%} | {gbs:.0f}")
  by_kind: dict[str, list[float]] = {}
  for name, t, _ in rows: by_kind.setdefault(re.sub(r"(_\d+|_\(.*|_res)+$", "", name.split()[0]), []).append(t)
  lines.append("by kind: " + ", ".join(f"{k} {len(ts)}x {sum(ts) / 1e3:.2f} ms"
                                      for k, ts in sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))))
  return "\n".join(lines)


# Run by the Python that has llama-cpp-python (a separate environment: not a dependency of ours). It feeds the
# prompt as one batch, then one token at a time with greedy choice, the way bench_one measures us.
_LLAMA_CPP_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, prompt, new_tokens, threads, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=path, n_ctx=len(prompt) + new_tokens + 8, n_batch=len(prompt), n_threads=threads,
            n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()
last_logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))   # the last fed token's row
def run():
  llm.reset()
  t0 = time.perf_counter()
  llm.eval(prompt)
  prefill = len(prompt) / (time.perf_counter() - t0)
  tok, warmup = int(np.argmax(last_logits())), 3
  for i in range(new_tokens):
    if i == warmup: t1 = time.perf_counter()
    llm.eval([tok])
    tok = int(np.argmax(last_logits()))
  return prefill, (new_tokens - warmup) / (time.perf_counter() - t1)
run()
runs = [run() for _ in range(repeats)]
print(json.dumps({"prefill_tok_s": max(r[0] for r in runs), "decode_tok_s": max(r[1] for r in runs)}))
"""


def llama_cpp_reference(python: str, model, file_type: str, tokenizer: str, prompt: list[int], new_tokens: int,
                        threads: int, repeats: int = 1) -> tuple[float, float]:
  """(prefill, decode) tokens/s of llama.cpp (through llama-cpp-python run by `python`) on this model's weights,
  written to a temporary GGUF of `file_type` (f32, f16, q8_0, q4_0) with `tokenizer` embedded; the best of
  `repeats` runs after a warm-up, as for ours."""
  import subprocess
  import tempfile
  from .checkpoint import gguf
  from .quantize import float_weights
  from .tokenizer import Tokenizer
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.gguf")
    gguf.save(path, model.args, float_weights(model), Tokenizer(tokenizer), dtype=file_type)
    run = subprocess.run([python, "-c", _LLAMA_CPP_SCRIPT, path, json.dumps(prompt), str(new_tokens), str(threads),
                          str(repeats)],
                         capture_output=True, text=True)
  if run.returncode != 0: raise RuntimeError(f"llama.cpp reference run with {python} failed:\n{run.stderr[-2000:]}")
  r = json.loads(run.stdout.strip().splitlines()[-1])
  return r["prefill_tok_s"], r["decode_tok_s"]


def bench_one(model: str, device: str | None, dtype: str, prompt_len: int = 128, new_tokens: int = 128,
              bandwidth: float | None = None, tokenizer: str | None = None, quantize: str | None = None,
              profile: bool = False, beam: int = 0, threads: int | None = None,
              llama_cpp: str | None = None, repeats: int = 1) -> BenchResult:
  """One model × dtype × quantization. Prefill and decode are the best of `repeats` warm runs (and llama.cpp's
  too): on a shared 2-core machine one run of a small model varies by ±20%, mostly downwards."""
  from tinygrad import GlobalCounters
  from .ops import cpu as cpu_kernels
  from .runtime import cpu_threads, hcq2_enabled
  for name, v, lo, why in (("prompt_len", prompt_len, 1, ""), ("repeats", repeats, 1, ""),
                           ("new_tokens", new_tokens, 4, " (3 warm-up steps are not timed)")):
    if v < lo: raise ValueError(f"{name} must be at least {lo}{why}, got {v}")
  if threads is not None: cpu_threads.set_threads(threads)
  llm = build_model(model, device, dtype, prompt_len + new_tokens + 1, tokenizer, quantize)
  m, dec = llm.model, llm.decoder
  dec.beam = beam
  rng = np.random.default_rng(0)
  prompt = [1] + rng.integers(3, m.args.vocab_size, prompt_len - 1).tolist()

  def run() -> tuple[float, float, float, int]:
    dec.forget()   # a full prefill each run, not the cached prompt
    t0 = time.perf_counter()
    logits = dec.prefill(prompt)
    tok = int(np.argmax(logits))
    ttft = time.perf_counter() - t0
    warmup = 3  # the JIT runs, captures, then replays: time only the replays
    for i in range(warmup): tok = int(np.argmax(dec.step(tok, prompt_len + i)))
    t1 = time.perf_counter()
    for i in range(warmup, new_tokens): tok = int(np.argmax(dec.step(tok, prompt_len + i)))
    decode = (new_tokens - warmup) / (time.perf_counter() - t1)
    return ttft, prompt_len / ttft, decode, tok

  ttft_cold, _, _, _ = run()
  for _ in range(2):   # capture the prefill graph, then its first (slower) replay
    dec.forget()
    dec.prefill(prompt)
  runs = [run() for _ in range(repeats)]
  ttft_warm, prefill, decode, tok = min(r[0] for r in runs), max(r[1] for r in runs), max(r[2] for r in runs), runs[-1][3]
  kernels = _kernels_per_decode_step(dec, tok, prompt_len)
  if profile:
    if hcq2_enabled():
      print("note: HCQ2 is on: kernels run asynchronously and their DEBUG=2 times are not per kernel; use HCQ2=0")
    print(f"\n{model} {m.device} {dtype} {quantize or ''}: decode step\n" +
          format_profile(profile_kernels(lambda: _eager_decode_step(dec, tok, prompt_len))))
    print(f"{model} {m.device} {dtype} {quantize or ''}: prefill of {prompt_len} tokens\n" +
          format_profile(profile_kernels(lambda: dec.forget() or dec.prefill(prompt)), top=8))
  weight_bytes = bytes_per_decode_step(m)
  bw = (bandwidth or measure_read_bandwidth()) if m.device.startswith("CPU") else measure_device_bandwidth(m.device)
  dtype_name = {"float": "float32", "half": "float16"}.get(m.dtype.name, m.dtype.name)
  peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # ours, before the reference's GGUF
  reference = (None, None)
  file_type = {"int8": "q8_0", "int4": "q4_0"}.get(quantize or "", {"float32": "f32", "float16": "f16"}.get(dtype_name))
  if llama_cpp and m.device.startswith("CPU") and file_type:   # (no bf16 reference)
    reference = llama_cpp_reference(llama_cpp, m, file_type, _reference_tokenizer(tokenizer, m.args.vocab_size), prompt,
                                    new_tokens, cpu_threads.config.threads, repeats)
  return BenchResult(model=model, device=m.device, dtype=dtype_name + (f"+{quantize}" if quantize else ""), params_m=m.args.n_params() / 1e6,
                     weight_mb=weight_bytes / 1e6, prefill_tok_s=prefill, decode_tok_s=decode, ttft_cold_s=ttft_cold,
                     ttft_warm_s=ttft_warm, peak_rss_mb=peak_rss_mb,
                     device_mem_mb=GlobalCounters.mem_used / 1e6, bandwidth_gb_s=bw,
                     decode_frac_of_bw=weight_bytes * decode / (bw * 1e9), kernels_per_token=kernels,
                     threads=cpu_threads.config.threads if cpu_kernels.available(m.device) else 1,
                     llama_cpp_prefill_tok_s=reference[0], llama_cpp_decode_tok_s=reference[1])


def _reference_tokenizer(tokenizer: str | None, vocab_size: int) -> str:
  """A SentencePiece model for the reference GGUF (llama.cpp will not load a GGUF without a vocabulary): the one
  given, else the shared Llama-2 tokenizer for 32000-token shapes or the 512-token one for stories260K."""
  if tokenizer: return tokenizer
  shared = os.environ.get("TINYLLAMA2_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
  path = os.path.join(shared, "tokenizers", "llama2_tokenizer.model" if vocab_size == 32000 else "tok512.model")
  if not os.path.exists(path): raise FileNotFoundError(f"--llama-cpp needs a tokenizer.model for the GGUF: pass --tokenizer ({path} not found)")
  return path


def tune(model: str, device: str | None, dtype: str, quantize: str | None, beam: int, tokenizer: str | None = None) -> None:
  """Run BEAM search over the decode step's kernels once; results land in tinygrad's on-disk cache."""
  llm = build_model(model, device, dtype, 64, tokenizer, quantize)
  llm.decoder.beam = beam
  llm.decoder.prefill([1, 2, 3, 4])
  for pos in range(4, 8): llm.decoder.step(5, pos)


def format_table(rows: list[BenchResult]) -> str:
  head = ("model", "device", "threads", "dtype", "MB read/token", "prefill tok/s", "decode tok/s", "of bw", "TTFT cold s",
          "TTFT warm s", "kernels/tok", "peak RSS MB")
  with_ref = any(r.llama_cpp_decode_tok_s for r in rows)
  if with_ref: head += ("llama.cpp prefill", "llama.cpp decode", "prefill ratio", "decode ratio")
  lines = [" | ".join(head), " | ".join("---" for _ in head)]
  for r in rows:
    lines.append(" | ".join([r.model, r.device, str(r.threads), r.dtype, f"{r.weight_mb:.1f}", f"{r.prefill_tok_s:.1f}",
                             f"{r.decode_tok_s:.1f}", f"{r.decode_frac_of_bw:.2f}", f"{r.ttft_cold_s:.2f}",
                             f"{r.ttft_warm_s:.3f}", str(r.kernels_per_token), f"{r.peak_rss_mb:.0f}"]
                            + (_reference_cells(r) if with_ref else [])))
  return "\n".join(lines)


def _reference_cells(r: BenchResult) -> list[str]:
  if not r.llama_cpp_decode_tok_s: return ["", "", "", ""]
  return [f"{r.llama_cpp_prefill_tok_s:.1f}", f"{r.llama_cpp_decode_tok_s:.1f}",
          f"{r.prefill_tok_s / r.llama_cpp_prefill_tok_s:.2f}", f"{r.decode_tok_s / r.llama_cpp_decode_tok_s:.2f}"]
