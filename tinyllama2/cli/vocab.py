"""`tinyllama2 vocab train|merge|resize`: grow a model's vocabulary (as Chinese-LLaMA does) in three steps."""
from __future__ import annotations

import argparse

from .common import DEFAULT_MODEL_HELP, int_flag

HELP = "train, merge and resize vocabularies"


def add_args(p: argparse.ArgumentParser) -> None:
  vs = p.add_subparsers(dest="vocab_command", required=True)
  t = vs.add_parser("train", help="train a SentencePiece vocabulary with Llama's settings")
  t.add_argument("--input", nargs="+", required=True, help="UTF-8 text file(s)")
  t.add_argument("--vocab-size", type=int_flag(1), required=True, help="number of pieces")
  t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece model type")
  t.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
  t.add_argument("--quiet", action="store_true", help="hide sentencepiece's progress log")
  t.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.model / PREFIX.vocab")
  m = vs.add_parser("merge", help="append the pieces of ADD that BASE lacks")
  m.add_argument("base", help="the tokenizer.model to extend")
  m.add_argument("add", help="the tokenizer.model whose new pieces are appended")
  m.add_argument("--out", required=True, help="merged tokenizer.model")
  m.add_argument("--force", action="store_true", help="overwrite an existing --out file")
  r = vs.add_parser("resize", help="grow a model's embeddings and output to a tokenizer's size")
  r.add_argument("model", help=DEFAULT_MODEL_HELP)
  r.add_argument("--tokenizer", required=True, help="the (merged) tokenizer.model")
  r.add_argument("--out", required=True, help="output Hugging Face directory")
  r.add_argument("--force", action="store_true", help="write into an existing non-empty folder")


def main(a: argparse.Namespace) -> None:
  from .. import vocab
  from ..fileio import check_out_dir, check_out_file
  if a.vocab_command == "train":
    for ext in (".model", ".vocab"): check_out_file(f"{a.out}{ext}", "--out", a.force)
    path = vocab.train_vocab(a.input, a.vocab_size, a.out, model_type=a.model_type, verbose=not a.quiet)
    print(f"wrote {path}")
  elif a.vocab_command == "merge":
    check_out_file(a.out, "--out", a.force)
    n_base, n_merged = vocab.merge_vocab(a.base, a.add, a.out)
    print(f"wrote {a.out}: {n_base} + {n_merged - n_base} new pieces = {n_merged}")
  else:
    check_out_dir(a.out, "--out", a.force)
    n = vocab.resize_model(a.model, a.tokenizer, a.out, force=a.force)
    print(f"wrote {a.out} with a vocabulary of {n}")
