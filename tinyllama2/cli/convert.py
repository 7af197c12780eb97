"""`tinyllama2 convert`: any checkpoint we read to HF, GGUF or Meta; never over an existing output unless --force."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = "convert a checkpoint to another format"


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", help="source model (HF or Meta directory, .gguf or llama2.c .bin)")
  p.add_argument("--to", choices=["hf", "gguf", "meta"], required=True, help="target format")
  p.add_argument("out", help="output folder (hf, meta) or file (gguf)")
  p.add_argument("--tokenizer", help="tokenizer.model to include")
  p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], default="f32",
                 help="stored dtype (bf16: hf only; q8_0, q4_0: gguf only)")
  p.add_argument("--force", action="store_true", help="write into an existing non-empty folder")


def main(a: argparse.Namespace) -> None:
  from ..checkpoint import gguf, hf, load_checkpoint, meta
  from ..tokenizer import Tokenizer
  out = Path(a.out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.force:
    raise ValueError(f"{out} already exists{' and is not empty' if out.is_dir() else ''}; choose another path or pass --force")
  ckpt = load_checkpoint(a.src)
  tok = a.tokenizer or ckpt.tokenizer_path
  if a.to == "hf":
    if a.dtype in ("q8_0", "q4_0"): raise ValueError(f"--dtype {a.dtype} is for --to gguf; HF export takes f32, f16 or bf16")
    dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[a.dtype]
    hf.save(out, ckpt.args, ckpt.float_weights(), tokenizer_model=tok, dtype=dtype)
  elif a.to == "meta":
    if a.dtype != "f32": raise ValueError("Meta export writes f32; drop --dtype")
    meta.save(out, ckpt.args, ckpt.float_weights())
    if tok: shutil.copyfile(tok, out / "tokenizer.model")
  else:
    if a.dtype == "bf16": raise ValueError("GGUF export takes --dtype f32, f16, q8_0 or q4_0")
    tokenizer = Tokenizer(tok) if tok else (Tokenizer.from_proto(ckpt.tokenizer_proto, a.src) if ckpt.tokenizer_proto else None)
    gguf.save(out, ckpt.args, ckpt.float_weights(), tokenizer=tokenizer, dtype=a.dtype)
  print(f"wrote {a.to} model to {out}")
