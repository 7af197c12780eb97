"""Benchmark tinyllama2: python bench/bench.py --model stories15M --model stories110M --dtype float32 --dtype float16"""
import argparse
import sys

from tinyllama2.benchmark import add_bench_args, main
from tinyllama2.cli import run_cli

if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  add_bench_args(parser)
  sys.exit(run_cli(main, parser.parse_args()))
