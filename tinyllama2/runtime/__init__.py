"""Every use of tinygrad internals lives in this package (and in the kernel modules under ops/).

Written against tinygrad 0.14. This file uses only the environment: `setup()` must run before tinygrad is
imported, because tinygrad reads HCQ2 and DEV once, at import. The other modules name the internals they use.
"""
from __future__ import annotations

import os
import sys


def setup() -> None:
  """Turn on tinygrad's HCQ2 queue runtime for CPU runs with the default clang compiler.

  tinygrad 0.14 launches CPU kernels one by one from Python (~30-50 us each, ~130 per decoded token) unless HCQ2
  is on (~7 us each: a worker thread runs the captured command ring). Its queue program does not render with LLVM
  (DEV=CPU:LLVM), so only clang gets it; a value the user chose, or tinygrad imported first, wins."""
  device, _, compiler = os.environ.get("DEV", "CPU").upper().partition(":")
  if "tinygrad" not in sys.modules and device == "CPU" and compiler in ("", "CLANG"):
    os.environ.setdefault("HCQ2", "1")


def hcq2_enabled() -> bool:
  """Whether tinygrad runs CPU graphs from its HCQ2 command queue in this process."""
  return os.environ.get("HCQ2", "0") not in ("", "0")
