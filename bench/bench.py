"""Benchmark tinyllama2: python bench/bench.py --model stories15M --model stories110M --dtype float32 --dtype float16"""
import argparse
import os
import sys

if "--profile" in sys.argv:
  # per-kernel times come from tinygrad's synchronous launches; with the HCQ2 queue runtime kernels run
  # asynchronously on a worker thread and DEBUG=2 cannot time them one by one
  os.environ.setdefault("HCQ2", "0")

from tinyllama2.cli import run_cli  # noqa: E402
from tinyllama2.cli.bench import add_args, main  # noqa: E402

if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  add_args(parser)
  sys.exit(run_cli(main, parser.parse_args()))
