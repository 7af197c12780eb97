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
  p.add_argument("--force", action="store_true", help="write into an existing non-empty folder")


def main(a: argparse.Namespace) -> None:
  from ..fileio import check_out_dir
  from ..llama import Llama
  from ..lora import check_adapter_dir
  from ..train.recipes import export_hf
  out = check_out_dir(a.out, "--out", a.force)
  check_adapter_dir(Path(a.adapter))
  llm = Llama.from_pretrained(a.model, tokenizer=a.tokenizer, adapter=a.adapter, dtype="float32")
  export_hf(llm.model, out, llm._tokenizer)
  print(f"wrote the merged model to {out}")
