"""`tinyllama2 merge`: fold a LoRA adapter into its base weights, so the result loads without the adapter."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import DEFAULT_MODEL_HELP

HELP = "fold a LoRA adapter into its base model and write a Hugging Face directory"


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help=DEFAULT_MODEL_HELP)
  p.add_argument("--adapter", required=True, help="PEFT-format LoRA adapter directory")
  p.add_argument("--tokenizer", help="tokenizer.model path when it is not beside the weights")
  p.add_argument("--out", required=True, help="output folder")


def main(a: argparse.Namespace) -> None:
  from ..llama import Llama
  from ..train.recipes import export_hf
  out = Path(a.out)
  if out.exists() and any(out.iterdir()): raise ValueError(f"{out} already exists and is not empty; choose another --out")
  llm = Llama.from_pretrained(a.model, tokenizer=a.tokenizer, adapter=a.adapter, dtype="float32")
  export_hf(llm.model, out, llm._tokenizer)
  print(f"wrote the merged model to {out}")
