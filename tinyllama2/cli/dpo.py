"""`tinyllama2 dpo`: Direct Preference Optimization of a language model on preference pairs (trl's DPOTrainer)."""
from __future__ import annotations

import argparse

from .common import add_train_args, float_flag
from .finetune import add_tuning_args, finetune_options

HELP = "DPO: align a model on preference pairs against its frozen self"


def add_args(p: argparse.ArgumentParser) -> None:
  add_tuning_args(p, "preference pairs: trl's prompt/chosen/rejected or LLaMA-Factory's ShareGPT format (JSON or JSONL)")
  p.add_argument("--beta", type=float_flag(0, above=True), default=0.1, help="strength of the pull towards the reference")
  p.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"], default="sigmoid", help="DPO, IPO or SLiC-hinge loss")
  p.add_argument("--label-smoothing", type=float_flag(0, hi=0.5, below=True), default=0.0,
                 help="conservative DPO: the assumed share of flipped labels (--loss sigmoid)")
  p.set_defaults(lora_dropout=0.0)   # trl disables dropout for preference training
  add_train_args(p, steps=200, lr=5e-4, batch=8)


def main(a: argparse.Namespace) -> None:
  from ..train.recipes import DPOOptions, train_dpo
  train_dpo(finetune_options(a, DPOOptions, beta=a.beta, loss_type=a.loss, label_smoothing=a.label_smoothing))
