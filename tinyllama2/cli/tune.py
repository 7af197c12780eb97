"""`tinyllama2 tune`: BEAM search is slow, so it runs once here and later runs reuse tinygrad's cache via --beam."""
from __future__ import annotations

import argparse

from .common import int_flag

HELP = "BEAM-search the decode kernels once (slow); later runs use --beam to reuse them"


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="model path or a random-weight shape (e.g. llama2-7b)")
  p.add_argument("--tokenizer", help="tokenizer.model (not needed)")
  p.add_argument("--device", help="tinygrad device (default: $DEV, else CPU)")
  p.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"], help="dtype(s) to tune")
  p.add_argument("--quantize", choices=["int8", "int4"], help="tune the quantized kernels")
  p.add_argument("--beam", type=int_flag(1), default=2, help="BEAM width")


def main(a: argparse.Namespace) -> None:
  from .. import benchmark
  for dtype in a.dtype or ["float32"]:
    benchmark.tune(a.model, a.device, dtype, a.quantize, a.beam, a.tokenizer)
  print(f"tuned the decode kernels with BEAM={a.beam}; pass --beam {a.beam} to use them")
