"""`tinyllama2 pretrain`: a tokenizer and a Llama from scratch on plain text (examples/pretrain.py reuses these)."""
from __future__ import annotations

import argparse

from .common import add_train_args, int_flag, train_config_kwargs

HELP = "train a tokenizer and a Llama from scratch on text"


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--data", nargs="+", required=True, help="plain-text corpus file(s)")
  p.add_argument("--config", help="a preset shape (e.g. stories15M) instead of the size flags")
  p.add_argument("--dim", type=int_flag(1), default=128, help="model width")
  p.add_argument("--n-layers", type=int_flag(1), default=6, help="transformer blocks")
  p.add_argument("--n-heads", type=int_flag(1), default=4, help="attention heads")
  p.add_argument("--n-kv-heads", type=int_flag(1), default=2, help="key/value heads (GQA)")
  p.add_argument("--vocab-size", type=int_flag(1), default=512, help="size of the tokenizer trained on --data")
  p.add_argument("--tokenizer", help="use this tokenizer.model instead of training one")
  add_train_args(p, steps=1000, lr=2e-3, batch=16)


def pretrain_options(a: argparse.Namespace):
  from ..train.recipes import PretrainOptions
  return PretrainOptions(data=a.data, out=a.out, preset=a.config, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                         n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size, tokenizer=a.tokenizer, seq_len=a.seq_len,
                         device=a.device, devices=a.devices, resume=a.resume, train=train_config_kwargs(a))


def main(a: argparse.Namespace) -> None:
  from ..train.recipes import pretrain
  pretrain(pretrain_options(a))
