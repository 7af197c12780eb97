"""`tinyllama2` command line: one module per subcommand, each with `add_args(p)` and `main(a)`.

One rule for what escapes a command: a user error (a bad flag value, a missing or unwritable file, not enough
memory, text that is not UTF-8) prints one line `error: ...` and exits 1; anything else is a bug and prints one
line that says so, with `--debug` to see the traceback. Ctrl-C exits 130. Warnings print as `warning: ...`."""
from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
import warnings
from typing import Callable, Iterator, NoReturn

from . import bench, chat, convert, dpo, finetune, generate, grpo, merge, ppo, pretrain, rag, rm, serve, tune, vocab

COMMANDS = (generate, chat, serve, rag, convert, bench, tune, pretrain, finetune, rm, dpo, ppo, grpo, merge, vocab)   # in --help order
USER_ERRORS = (ValueError, OSError, MemoryError)   # OSError: FileNotFoundError, PermissionError, IsADirectoryError, ...
BUG_HINT = "this is a bug, please report it; rerun with --debug for the traceback"


class ArgParser(argparse.ArgumentParser):
  """argparse with one-line usage errors (the usage itself is in --help)."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def add_debug_flag(p: argparse.ArgumentParser, default=False) -> None:
  p.add_argument("--debug", action="store_true", default=default, help="show the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
  p = ArgParser(prog="tinyllama2", description="Llama-2 on tinygrad")
  add_debug_flag(p)
  sub = p.add_subparsers(dest="command", required=True)
  for cmd in COMMANDS:
    sp = sub.add_parser(cmd.__name__.rpartition(".")[2], help=cmd.HELP)
    cmd.add_args(sp)
    add_debug_flag(sp, default=argparse.SUPPRESS)   # also after the subcommand, without hiding the top-level one
    sp.set_defaults(fn=cmd.main)
  return p


def one_line(e: BaseException) -> str:
  """The message of an exception on one line; OSErrors as 'PATH: reason', a bare MemoryError as 'out of memory'."""
  if isinstance(e, OSError) and e.strerror and e.filename is not None:
    msg = f"{e.filename}: {e.strerror}" + (f" (and {e.filename2})" if e.filename2 else "")
  elif isinstance(e, MemoryError) and not str(e): msg = "out of memory; try a smaller model, batch or sequence length"
  else: msg = str(e) or type(e).__name__
  return " ".join(part.strip() for part in msg.splitlines() if part.strip())


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
  """Warnings as `warning: message` lines, without the file, line and source text Python adds."""
  saved = warnings.showwarning
  warnings.showwarning = lambda message, category, *_a, **_k: print(f"warning: {message}", file=sys.stderr)
  try: yield
  finally: warnings.showwarning = saved


def run_cli(fn: Callable[[argparse.Namespace], object], a: argparse.Namespace) -> int:
  """Run a command's main(a) under the CLI's error rule; returns the exit code."""
  debug = bool(getattr(a, "debug", False))
  try:
    with contextlib.nullcontext() if debug else plain_warnings(): fn(a)
  except KeyboardInterrupt: return 130
  except USER_ERRORS as e:
    if debug: traceback.print_exc()
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 1
  except Exception as e:  # noqa: BLE001  (the one place that turns an unexpected exception into a report)
    if debug: traceback.print_exc()
    print(f"error: {type(e).__name__}: {one_line(e)} ({BUG_HINT})", file=sys.stderr)
    return 1
  return 0


def main(argv: list[str] | None = None) -> int:
  a = build_parser().parse_args(argv)
  return run_cli(a.fn, a)
