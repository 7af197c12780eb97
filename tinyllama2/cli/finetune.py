"""`tinyllama2 finetune`: supervised fine-tuning, a LoRA adapter by default or --full (examples/finetune_lora.py
reuses these; `rm` and `dpo` share its flags)."""
from __future__ import annotations

import argparse

from .common import DEFAULT_MODEL_HELP, add_train_args, float_flag, int_flag, train_config_kwargs

HELP = "LoRA or full supervised fine-tuning"


def add_tuning_args(p: argparse.ArgumentParser, data_help: str, data_required: bool = True) -> None:
  """The model, the data, and what is trained (a LoRA adapter or the weights): shared by finetune, rm and dpo."""
  p.add_argument("--model", required=True, help=DEFAULT_MODEL_HELP)
  p.add_argument("--tokenizer", help="tokenizer.model path when it is not beside the weights")
  p.add_argument("--data", required=data_required, help=data_help)
  p.add_argument("--template", choices=["llama2", "plain"], default="llama2", help="how dialogues are rendered")
  p.add_argument("--limit", type=int_flag(1), help="use only the first N records")
  p.add_argument("--full", action="store_true", help="train the weights themselves instead of a LoRA adapter")
  p.add_argument("--freeze", action="append", default=[], help="with --full: freeze weights matching this glob")
  p.add_argument("--freeze-layers", type=int_flag(0), default=0, help="with --full: freeze the embeddings and first N blocks")
  p.add_argument("--lora-r", type=int_flag(1), default=8, help="LoRA rank")
  p.add_argument("--lora-alpha", type=float_flag(0, above=True), default=16.0, help="LoRA alpha (scale = alpha / r)")
  p.add_argument("--lora-dropout", type=float_flag(0, hi=1, below=True), default=0.05, help="dropout on the LoRA input")
  p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated HF module names to adapt")


def add_args(p: argparse.ArgumentParser) -> None:
  add_tuning_args(p, "Alpaca / ShareGPT JSON (or JSONL), or a plain-text file")
  p.add_argument("--format", choices=["auto", "alpaca", "sharegpt", "text"], default="auto", help="data format")
  add_train_args(p, steps=200, lr=1e-3, batch=8)


def finetune_options(a: argparse.Namespace, cls: type | None = None, **extra):
  """FinetuneOptions (or the subclass `cls`, with its `extra` fields) from the flags of add_tuning_args."""
  from ..train.recipes import FinetuneOptions
  if (a.freeze or a.freeze_layers) and not a.full: raise ValueError("--freeze / --freeze-layers need --full")
  if not a.data: raise ValueError("--data is required for training: a preference file (JSON or JSONL)")
  return (cls or FinetuneOptions)(
    model=a.model, data=a.data, out=a.out, format=getattr(a, "format", "auto"), tokenizer=a.tokenizer,
    template=a.template, lora=not a.full, lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
    target_modules=[m.strip() for m in a.target_modules.split(",") if m.strip()], freeze=a.freeze,
    freeze_layers=a.freeze_layers, seq_len=a.seq_len, limit=a.limit, device=a.device, devices=a.devices, resume=a.resume,
    train=train_config_kwargs(a), **extra)


def main(a: argparse.Namespace) -> None:
  from ..train.recipes import finetune
  finetune(finetune_options(a))
