"""`tinyllama2` command line: one module per subcommand, each with `add_args(p)` and `main(a)`.
User errors print one line and exit non-zero."""
from __future__ import annotations

import argparse
import sys

from . import bench, chat, convert, finetune, generate, merge, pretrain, tune, vocab

COMMANDS = (generate, chat, convert, bench, tune, pretrain, finetune, merge, vocab)   # in --help order


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="tinyllama2", description="Llama-2 on tinygrad")
  sub = p.add_subparsers(dest="command", required=True)
  for cmd in COMMANDS:
    sp = sub.add_parser(cmd.__name__.rpartition(".")[2], help=cmd.HELP)
    cmd.add_args(sp)
    sp.set_defaults(fn=cmd.main)
  return p


def run_cli(fn, a: argparse.Namespace) -> int:
  try: fn(a)
  except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130
  return 0


def main(argv: list[str] | None = None) -> int:
  a = build_parser().parse_args(argv)
  return run_cli(a.fn, a)
