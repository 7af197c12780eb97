"""`tinyllama2 bench`: one row per model × device × dtype × quantization × threads. A single row runs in this
process; several run one per process (bench/bench.py is this command with HCQ2=0 for --profile)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from ..benchmark import SHAPES, BenchResult, bench_one, format_table, measure_read_bandwidth
from ..devices import child_env, named_compiler
from .common import int_flag

BUG_HINT = "this is a bug"   # in the last line of a child's stderr: cli.run_cli's report of an unexpected error

HELP = "prefill/decode speed, first-token latency, memory"


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", action="append", help=f"model path, or a random-weight shape: {', '.join(SHAPES)} "
                 "(repeatable; default stories15M)")
  p.add_argument("--shape", action="append", help="alias of --model for a named shape")
  p.add_argument("--tokenizer", help="tokenizer.model for a model path (not needed for benchmarking)")
  p.add_argument("--device", action="append", help="tinygrad device(s) (repeatable; default $DEV, else CPU)")
  p.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"], help="dtype(s) (repeatable)")
  p.add_argument("--prompt-len", type=int_flag(1), default=128, help="prompt tokens for prefill")
  p.add_argument("--new-tokens", type=int_flag(4), default=128, help="decode steps (at least 4: 3 warm-up steps are not timed)")
  p.add_argument("--quantize", action="append", choices=["none", "int8", "int4"], help="weight quantization(s)")
  p.add_argument("--profile", action="store_true", help="print the kernels of one decode step with time and GB/s "
                 "(per-kernel times need HCQ2=0 in the environment; bench/bench.py sets it)")
  p.add_argument("--beam", type=int_flag(0), default=0,
                 help="compile decode with tinygrad BEAM search of this width (use after `tinyllama2 tune`)")
  p.add_argument("--threads", type=int_flag(1), action="append",
                 help="threads per CPU decode kernel (repeatable, to compare; default: every core, at most 8)")
  p.add_argument("--repeats", type=int_flag(1), default=3,
                 help="timed runs per row (and per llama.cpp reference); the best counts")
  p.add_argument("--concurrency", type=_levels, metavar="N,N,...",
                 help="instead: that many simultaneous requests of different prompt lengths on one engine, e.g. 1,2,4,8 "
                      "(aggregate decode tok/s, time to first token, inter-token latency)")
  p.add_argument("--json", help="also write results as JSON to this file ('-' for stdout only)")
  p.add_argument("--llama-cpp", metavar="PYTHON", help="also run llama.cpp on the same weights, prompt and threads "
                 "with this Python, which has llama-cpp-python installed (CPU rows; int8/int4 as Q8_0/Q4_0)")


def _levels(text: str) -> list[int]:
  """--concurrency 1,2,4,8: positive integers."""
  try: levels = [int(x) for x in text.split(",") if x.strip()]
  except ValueError: levels = []
  if not levels or min(levels) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (e.g. 1,2,4,8), got {text!r}")
  return levels


def _concurrency(a: argparse.Namespace, models: list[str], devices: list[str | None], dtypes_: list[str],
                 quants: list[str | None]) -> list:
  """The --concurrency benchmark: one table row per model × device × dtype × quantization × level."""
  from ..concurrency_bench import bench_concurrency, format_concurrency_table
  rows = []
  for m in models:
    for d in devices:
      for t in dtypes_:
        for q in quants:
          rows += bench_concurrency(m, d, t, a.concurrency, a.prompt_len, a.new_tokens, q, a.repeats)
  if a.json == "-": print(json.dumps([asdict(r) for r in rows], indent=2))
  else:
    print(format_concurrency_table(rows))
    if a.json:
      from ..fileio import write_text
      write_text(a.json, json.dumps([asdict(r) for r in rows], indent=2))
  return rows


def _bench_in_subprocess(a: argparse.Namespace, model: str, device: str | None, dtype: str,
                         quantize: str | None, threads: int | None) -> BenchResult:
  """One combination in a fresh process: its peak memory is its own and no model's buffers outlive its run."""
  import subprocess
  cmd = [sys.executable, "-m", "tinyllama2.cli", "bench", "--model", model, "--dtype", dtype, "--quantize",
         quantize or "none", "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens), "--beam",
         str(a.beam), "--repeats", str(a.repeats), "--json", "-"] + (["--device", device] if device else []) + \
        (["--tokenizer", a.tokenizer] if a.tokenizer else []) + (["--profile"] if a.profile else []) + \
        (["--threads", str(threads)] if threads else []) + (["--llama-cpp", a.llama_cpp] if a.llama_cpp else [])
  run = subprocess.run(cmd, capture_output=True, text=True, env=child_env(device) if device else None)
  if run.returncode != 0:
    what = f"bench of {model} {dtype}{'+' + quantize if quantize else ''} on {device or 'the default device'}"
    last = (run.stderr.strip().splitlines() or [""])[-1]
    if last.startswith("error: ") and BUG_HINT not in last: raise ValueError(f"{what}: {last[7:]}")   # a user error
    raise RuntimeError(f"{what} failed:\n{run.stderr[-2000:]}")
  if a.profile: print(run.stdout[:run.stdout.index("[")], end="")
  return BenchResult(**json.loads(run.stdout[run.stdout.index("["):])[0])


def _runs_here(device: str | None) -> bool:
  """Whether this process can bench `device`: tinygrad 0.14 takes a device's compiler from DEV when it opens the
  device (DEV=CPU:LLVM: LLVM instead of clang) and ignores it in a device name, so such a device gets a process
  of its own with DEV set."""
  return device is None or not named_compiler(device) or os.environ.get("DEV") == device


def _check_models_and_devices(models: list[str], devices: list[str | None]) -> None:
  """Before the bandwidth is measured and the first row runs: each model exists, each device works here."""
  from pathlib import Path

  from ..checkpoint import hub
  from ..config import PRESETS
  from ..devices import resolve_device
  for m in models:
    if m in PRESETS: continue
    if hub.is_repo_id(m) and not Path(m).expanduser().exists(): hub.resolve(m)   # cached (or downloadable), else one line
    elif not Path(m).expanduser().exists():
      raise FileNotFoundError(f"--model {m}: no such file or folder, and not a shape ({', '.join(SHAPES)})")
  for d in devices:
    if _runs_here(d): resolve_device(d)


def main(a: argparse.Namespace) -> list[BenchResult]:
  from tqdm import tqdm
  if a.json and a.json != "-":
    from ..fileio import check_out_file
    check_out_file(a.json, "--json", force=True)   # an unwritable path fails now, not after the benchmark
  models = (a.model or []) + (a.shape or []) or ["stories15M"]
  devices, dtypes_ = a.device or [None], a.dtype or ["float32"]
  _check_models_and_devices(models, devices)
  quants = [None if q == "none" else q for q in (a.quantize or ["none"])]
  if a.concurrency: return _concurrency(a, models, devices, dtypes_, quants)
  bw = measure_read_bandwidth()
  combos = [(m, d, t, q, n) for m in models for d in devices for t in dtypes_ for q in quants for n in a.threads or [None]]
  rows, failed = [], []
  for m, d, t, q, n in tqdm(combos, desc="bench", file=sys.stderr, disable=len(combos) < 2):
    if len(combos) == 1 and _runs_here(d):
      rows.append(bench_one(m, d, t, a.prompt_len, a.new_tokens, bandwidth=bw, tokenizer=a.tokenizer, quantize=q,
                            profile=a.profile, beam=a.beam, threads=n, llama_cpp=a.llama_cpp, repeats=a.repeats))
      continue
    try: rows.append(_bench_in_subprocess(a, m, d, t, q, n))
    except (RuntimeError, ValueError) as e:   # one backend that fails (a driver, a compiler) must not lose the other rows
      if len(combos) == 1: raise
      lines = str(e).splitlines()
      failed.append(lines[0] + " " + next((x for x in reversed(lines) if "Error" in x), lines[-1]).strip())
      print(failed[-1], file=sys.stderr)
  if a.json == "-": print(json.dumps([asdict(r) for r in rows], indent=2))
  else:
    print(format_table(rows))
    print(f"CPU read bandwidth (numpy, all cores): {bw:.1f} GB/s; GPU rows use a bandwidth measured on the device")
    for f in failed: print(f"not benched: {f}")
    if a.json:
      from ..fileio import write_text
      write_text(a.json, json.dumps([asdict(r) for r in rows], indent=2))
  return rows
